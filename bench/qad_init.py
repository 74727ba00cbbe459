"""Where QAD starts: the grid's round-to-nearest rule against llama.cpp's importance-weighted rounding.

``callbacks.qat.init=imatrix`` sets the student's weights to the values ``llama-quantize --imatrix`` stores for the
run's type map before the grid's own rule takes over (:func:`distill.compress.quant.qat.start_from_imatrix`). This
measures, before any training, on the default recipe's byte-budgeted map of the embedded teacher:

- ``rtn``: the grid's rule on the weights as they are (``init=rtn``, the start before);
- ``imatrix``: the imatrix PTQ file's values themselves (what a llama.cpp user ships with no training);
- ``imatrix_then_rule``: the grid's rule on those values (``init=imatrix``: what the first step trains on);
- ``imatrix_learned``: ``init=imatrix learn_scales=true``'s start: the 32-block types keep llama.cpp's stored scales
  as trainable ones (:class:`~distill.compress.quant.learned_scales.LearnedScaleQuantizer`), each weight on its
  nearest level under them; the K-quants and the tied embedding keep the rule (as in training).

For each: the importance-weighted squared rounding error summed over the weights (relative to ``rtn``), and top-1
agreement and KL with the teacher on the first ``batches`` validation batches (never the test split).

    python -m bench.qad_init [batches=6 imatrix_batches=32]

Writes ``bench/results/qad_init.{json,md}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from distill.config import exit_on_config_error

VARIANTS = ("rtn", "imatrix", "imatrix_then_rule", "imatrix_learned")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Round the teacher three ways under the default map; score each; write and print the table."""
    import gguf
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn

    from distill.compress.depth import calibration_batches
    from distill.compress.quant import llama_quants, schemes
    from distill.compress.quant.gguf_grid import fake_quantize
    from distill.compress.quant.learned_scales import LEARNABLE, LearnedScaleQuantizer, stored_scales
    from distill.compress.quant.type_map import check_target, collect_importance, spec_on_budget
    from distill.config import build

    torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed)
    teacher = build(cfg.teacher)
    dm = build(cfg.data, tokenizer=teacher.tokenizer)
    dm.setup("fit")
    model = teacher.model
    q = cfg.qat
    spec = schemes.make_spec(q.scheme, q.group_size, list(q.skip), "", list(q.modules), None)
    target = check_target(spec, q.target_ratio, q.get("gguf_types"), q.get("target_bytes"))
    spec, tmap = spec_on_budget(
        model, spec, dm.train_set, dm.block_size, target, teacher.tokenizer, q.calibration_batches
    )
    names = schemes.targets(model, spec.skip, spec.modules)
    batches = calibration_batches(dm.train_set, batches=cfg.imatrix_batches, rows=4, tokens=dm.block_size)
    importance = collect_importance(model, names, batches)
    values: dict[str, dict[str, torch.Tensor]] = {v: {} for v in VARIANTS}
    error = dict.fromkeys(VARIANTS, 0.0)
    for name in names:
        module = model.get_submodule(name)
        w = module.weight.detach().float()
        kind = spec.gguf_kind(name)
        embedding = isinstance(module, nn.Embedding)
        imp = importance[name].float()
        raw = llama_quants.quantize(w.numpy(), kind, None if embedding else imp.numpy(), name)
        decoded = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind.upper()]).reshape(w.shape)
        ptq = torch.from_numpy(decoded).float()
        values["rtn"][name] = fake_quantize(w, kind, name)
        values["imatrix"][name] = ptq
        values["imatrix_then_rule"][name] = fake_quantize(ptq, kind, name)
        learned = kind in LEARNABLE and not embedding  # the tied embedding/head keeps the rule (qat._prepare_gguf)
        values["imatrix_learned"][name] = (
            LearnedScaleQuantizer(ptq, kind, name, start=stored_scales(raw, kind)).parts(ptq)[3]
            if learned
            else values["imatrix_then_rule"][name]
        )
        weigh = imp[:, None] if embedding else imp[None, :]  # rows by token counts, or columns by input energy
        for v in VARIANTS:
            error[v] += float(((values[v][name] - w) ** 2 * weigh).sum())
    val = [b for _, b in zip(range(cfg.batches), dm.val_dataloader(), strict=False)]
    with torch.inference_mode():
        reference = [F.log_softmax(model(input_ids=b["input_ids"]).logits.float(), -1) for b in val]
    original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    rows: dict[str, dict[str, float]] = {}
    for v in VARIANTS:
        for n in names:
            model.get_submodule(n).weight.data.copy_(values[v][n])
        agree = kl = tokens = 0.0
        with torch.inference_mode():
            for b, t in zip(val, reference, strict=True):
                s = F.log_softmax(model(input_ids=b["input_ids"]).logits.float(), -1)
                mask = b["labels"] != -100  # padding rows and padded tails score nothing
                agree += float(((t.argmax(-1) == s.argmax(-1)) & mask).sum())
                kl += float(((t.exp() * (t - s)).sum(-1) * mask).sum())
                tokens += float(mask.sum())
        rows[v] = {"error_vs_rtn": error[v] / error["rtn"], "top1": agree / tokens, "kl": kl / tokens}
    for n in names:
        model.get_submodule(n).weight.data.copy_(original[n])
    result = {"map": tmap.summary(), "validation_tokens": int(tokens), "batches": len(val), "rows": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qad_init.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "qad_init.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """``qad_init.md``: one row per start."""
    lines = [
        "# Where QAD starts",
        "",
        f"`python -m bench.qad_init`: the default recipe's map of the embedded teacher ({result['map']}), no training; "
        f"top-1 agreement and KL with the teacher on {result['batches']} validation batches "
        f"({result['validation_tokens']:,} tokens).",
        "",
        "| start | importance-weighted error (vs rtn) | validation top-1 | validation KL |",
        "| --- | ---: | ---: | ---: |",
    ]
    names = {
        "rtn": "the grid's rule on the weights (`init=rtn`)",
        "imatrix": "llama.cpp's imatrix rounding (the PTQ file)",
        "imatrix_then_rule": "the grid's rule on the imatrix values (`init=imatrix`)",
        "imatrix_learned": "llama.cpp's scales as learned ones (`init=imatrix learn_scales=true`)",
    }
    for v, r in result["rows"].items():
        lines.append(f"| {names[v]} | {r['error_vs_rtn']:.3f} | {r['top1']:.4f} | {r['kl']:.4f} |")
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/qad_init")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    main()
