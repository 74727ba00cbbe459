"""The default recipe's llama.cpp type map chosen with and without the KL probe, at its budget, with no training.

Each map is chosen among every QAT grid's type, or among each list of types in ``type_sets``.

``experiment=qad_q4_mix`` (the default run) chooses a llama.cpp type per tensor for 1/7 of the fp32 teacher's bytes
by llama.cpp's importance-weighted error alone (:mod:`distill.compress.quant.type_map`). The torchao budget found that
rule starves the tied table (``bench/results/grid_budget.md``); ``callbacks.qat.budget_probe=true`` scales each
tensor's error curve by the KL its rounding alone causes (:mod:`distill.compress.quant.probe`). This chooses the map
both ways for the embedded teacher at the recipe's budget and rounds the teacher by each map, round-to-nearest (where
QAD starts, ``init=rtn``) and llama.cpp's importance-weighted rounding (``llama-quantize --imatrix``'s values, the
PTQ file a llama.cpp user would make), then scores every copy against the teacher on validation batches (the tuning
split; never the test split): top-1 agreement and KL, 95 % intervals over documents, and the file's estimated bytes.

    python -m bench.gguf_probe [batches=12]

Writes ``bench/results/gguf_probe.{json,md}``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from distill.config import exit_on_config_error


def run(cfg: DictConfig) -> dict[str, Any]:
    """Choose both maps, round the teacher four ways, score the copies on the validation batches."""
    import torch

    from bench.studies.baselines import QAT_CONF, prepare
    from distill.compress.quant import gguf_grid, qat, schemes
    from distill.compress.quant.type_map import calibrated_type_map, check_target
    from distill.eval.heldout import heldout_metrics

    torch.set_num_threads(cfg.threads)
    bench = prepare(cfg)  # seed, teacher and data as train.py sets them up
    teacher, dm, tokenizer = bench.teacher, bench.datamodule, bench.teacher.tokenizer
    node = OmegaConf.load(QAT_CONF / f"{cfg.qat_config}.yaml")
    spec = schemes.make_spec(node.scheme, node.group_size, ["*norm*"], "", ["linear", "embedding"])
    target = check_target(spec, node.get("target_ratio"), None, node.get("target_bytes"))
    names = schemes.targets(teacher.model, spec.skip, spec.modules)
    probe_kind = schemes.get_scheme(spec.scheme).gguf
    models, rows = {}, {}
    for (types, kinds), (label, probe) in itertools.product(
        cfg.type_sets.items(), (("imatrix", None), ("kl_probe", probe_kind))
    ):
        chosen = calibrated_type_map(
            teacher.model, names, dm.train_set, dm.block_size, target, tuple(kinds or gguf_grid.KINDS), tokenizer,
            node.get("calibration_batches", 8), probe,
        )  # fmt: skip
        print(f"{types}, {label}: {chosen.summary()}", flush=True)
        mapped = dataclasses.replace(spec, gguf_types=tuple(sorted(chosen.types.items())))
        counts = Counter(chosen.types[n] for n in names if n != "model.embed_tokens")  # a tied table once
        facts = {
            "type_set": types,
            "map": label,
            "file_bytes": chosen.file_bytes,
            "budget": chosen.budget,
            "table": chosen.types["lm_head"],
            "types": ", ".join(f"{n} {k.upper()}" for k, n in counts.most_common()),
        }
        for rounding in ("rtn", "imatrix"):
            model = copy.deepcopy(teacher.model).eval()
            if rounding == "imatrix":  # the values llama-quantize --imatrix stores
                qat.start_from_imatrix(model, mapped, chosen.importance)
            else:  # the grids' own rounding, as QAT's prepare and convert leave the weights (a tied table once)
                qat.prepare(model, mapped)
                qat.convert(model, mapped)
            models[f"{types}_{label}_{rounding}"] = model
            rows[f"{types}_{label}_{rounding}"] = {**facts, "rounding": rounding}
    batches = dm.heldout_dataloader("val", cfg.batches)  # tuning data: the choice is made on it
    scores = heldout_metrics(models, teacher, batches, teacher.vocab_size, eos_token_id=tokenizer.eos_token_id)
    result = {"qat_config": cfg.qat_config, "batches": cfg.batches, "rows": {k: {**rows[k], **scores[k]} for k in rows}}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_probe.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "gguf_probe.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """``gguf_probe.md``: one row per map and rounding."""
    first = next(iter(result["rows"].values()))
    lines = [
        "# The default recipe's llama.cpp type map, with and without the KL probe",
        "",
        f"`python -m bench.gguf_probe`: the embedded teacher rounded by the type map `{result['qat_config']}` chooses "
        f"at its budget ({first['budget']:,} bytes), no training; top-1 agreement and KL with the teacher on "
        f"{result['batches']} validation batches ({int(first['documents'])} documents, {int(first['tokens']):,} "
        "tokens), 95 % intervals over documents. Bytes are the map's estimate of the GGUF file.",
        "",
        "| types allowed | map | rounding | file bytes (est.) | table | types (tensors) | validation top-1 [95 %] | "
        "validation KL |",
        "| --- | --- | --- | ---: | --- | --- | ---: | ---: |",
    ]
    for r in result["rows"].values():
        top1 = f"{r['top1_agreement']:.3f} [{r['top1_agreement_ci_low']:.3f}, {r['top1_agreement_ci_high']:.3f}]"
        lines.append(
            f"| {r['type_set']} | `{r['map']}` | {r['rounding']} | {r['file_bytes']:,} | {r['table'].upper()} | "
            f"{r['types']} | {top1} | {r['kl_to_teacher']:.3f} |"
        )
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/gguf_probe")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    main()
