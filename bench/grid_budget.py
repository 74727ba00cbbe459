"""A byte-budgeted torchao grid map against the hand-made one, at equal bytes, with no training.

``experiment=qad_int3_emb4`` sets its grids by hand (layers int3 g192, the tied table int4 g96).
:mod:`distill.compress.quant.grid_budget` chooses a grid per tensor for a byte budget instead. This rounds the
embedded teacher (all 30 layers; ``depths=[30,24]`` adds the 24 the recipe keeps) each way at the hand map's
exact bytes and scores every copy against the teacher on validation batches (the tuning split; never the test split):

- ``hand``: the recipe's grids;
- ``budget_kl``: the budgeted map, each tensor's error curve scaled by the KL its int3 g192 rounding causes alone
  (what ``callbacks.qat.target_bytes`` does on a torchao scheme);
- ``budget_imatrix``: the same without the probe (importance-weighted relative errors, as the llama.cpp map).

Each row gives the export's bytes on disk (written by :func:`distill.export.quantized.save_quantized`, tokenizer
and config included), the map's grids, and top-1 agreement and KL with the teacher, 95 % intervals over documents.

    python -m bench.grid_budget [batches=12] ['depths=[30,24]']

Writes ``bench/results/grid_budget.{json,md}``.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from distill.config import exit_on_config_error

LAYERS, TABLE_GRID = ("int3_weight_only", 192), ("int4_weight_only", 96)  # qad_int3_emb4's


def exported_bytes(model: Any, tokenizer: Any, spec: Any) -> int:
    """Bytes on disk of ``model``'s compact export (what the report's size column counts)."""
    from distill.cost import disk_bytes
    from distill.export.quantized import save_quantized

    with tempfile.TemporaryDirectory() as tmp:
        return int(disk_bytes(save_quantized(model, tokenizer, Path(tmp) / "q", spec)))


def grids_of(spec: Any, names: list[str]) -> str:
    """``n × scheme/group`` counts of the targets' grids, most common first."""
    from distill.compress.quant.grid_budget import grid_label

    counts = Counter(grid_label(spec.scheme_for(n)) for n in names)
    return ", ".join(f"{n} {label}" for label, n in counts.most_common())


def run(cfg: DictConfig) -> dict[str, Any]:
    """Round each student each way at the hand map's bytes, score all copies on the validation batches."""
    import torch

    from bench.studies.baselines import depth_student, prepare, table_schemes
    from distill.compress.depth import calibration_batches
    from distill.compress.quant import schemes
    from distill.compress.quant.grid_budget import DEFAULT_GRIDS, choose_grids, map_schemes, measure_grids
    from distill.compress.quant.type_map import ByteTarget
    from distill.eval.heldout import heldout_metrics

    torch.set_num_threads(cfg.threads)
    bench = prepare(cfg)  # seed, teacher and data as train.py sets them up
    teacher, dm, tokenizer = bench.teacher, bench.datamodule, bench.teacher.tokenizer
    skip, kinds = ["*norm*"], ["linear", "embedding"]
    calibration = calibration_batches(dm.train_set, batches=cfg.calibration_batches, rows=4, tokens=dm.block_size)
    models, rows = {}, {}
    for depth in cfg.depths:
        base = teacher.model if depth == teacher.config.num_hidden_layers else depth_student(bench, depth)
        hand = schemes.make_spec(*LAYERS, skip, "", kinds, None, table_schemes(TABLE_GRID))
        names = schemes.targets(base, hand.skip, hand.modules)
        specs = {"hand": hand}
        hand_model = schemes.ptq(copy.deepcopy(base).eval(), hand)
        budget = exported_bytes(hand_model, tokenizer, hand)
        measured = measure_grids(copy.deepcopy(base).eval(), names, calibration, DEFAULT_GRIDS, LAYERS)
        for label, calibrated in (("budget_kl", True), ("budget_imatrix", False)):
            chosen = choose_grids(base, measured, ByteTarget(bytes=budget), tokenizer, calibrated)
            print(f"{depth} layers, {label}: {chosen.summary()}", flush=True)
            per_module = map_schemes(chosen, DEFAULT_GRIDS)
            specs[label] = schemes.QuantSpec(*LAYERS, tuple(skip), tuple(kinds), (), None, per_module)
        for label, spec in specs.items():
            key = f"{depth}layers_{label}"
            model = hand_model if label == "hand" else schemes.ptq(copy.deepcopy(base).eval(), spec)
            models[key] = model
            rows[key] = {"layers": depth, "map": label, "budget": budget, "grids": grids_of(spec, names)}
            rows[key]["bytes"] = budget if label == "hand" else exported_bytes(model, tokenizer, spec)
            rows[key]["table"] = grids_of(spec, ["lm_head"])
    batches = dm.heldout_dataloader("val", cfg.batches)  # tuning data: the choice is made on it
    scores = heldout_metrics(models, teacher, batches, teacher.vocab_size, eos_token_id=tokenizer.eos_token_id)
    result = {"batches": cfg.batches, "rows": {k: {**rows[k], **scores[k]} for k in rows}}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid_budget.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "grid_budget.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """``grid_budget.md``: one row per student and map."""
    first = next(iter(result["rows"].values()))
    lines = [
        "# A byte-budgeted torchao grid map against the hand-made one",
        "",
        f"`python -m bench.grid_budget`: torchao weight-only PTQ of the embedded teacher (and of its 24 most "
        f"influential layers), no training; top-1 agreement and KL with the teacher on {result['batches']} "
        f"validation batches ({int(first['documents'])} documents, {int(first['tokens']):,} tokens), 95 % intervals "
        "over documents. Each budgeted map is given the hand map's bytes on disk.",
        "",
        "| layers | map | bytes on disk | table | grids (tensors) | validation top-1 [95 %] | validation KL |",
        "| ---: | --- | ---: | --- | --- | ---: | ---: |",
    ]
    for r in result["rows"].values():
        top1 = f"{r['top1_agreement']:.3f} [{r['top1_agreement_ci_low']:.3f}, {r['top1_agreement_ci_high']:.3f}]"
        lines.append(
            f"| {r['layers']} | `{r['map']}` | {r['bytes']:,} | {r['table']} | {r['grids']} | {top1} | "
            f"{r['kl_to_teacher']:.3f} |"
        )
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/grid_budget")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    main()
