"""Weight sparsity on the embedded default: Wanda against magnitude, 50 % unstructured and 2:4, healed or not.

    python -m bench.sparsity run=true     # train every variant that has no kept report, then tabulate
    python -m bench.sparsity              # tabulate from the kept reports

Every variant is ``python train.py experiment=distill_sparse`` (the SmolLM2 teacher's full-depth copy) with
the importance and the pattern set. ``oneshot`` cuts the masks at step 2 after two calibration batches and
trains with a zero learning rate, so the student is the teacher with its weights zeroed; ``healed`` prunes
progressively to step 14 and distils to step 30. Each run's end-of-run evaluation scores it against the
teacher on the held-out split (top-1 agreement and KL with 95 % intervals, perplexity). The table puts the
PTQ rows of ``bench/results/headline.md`` next to them. A sparse model stored densely is as large as the
teacher (1.0×); the sizes that sparsity could reach need a sparse format, which this does not write.
Settings: Hydra overrides of ``conf/bench/sparsity.yaml``. Writes ``bench/results/sparsity.md`` and
``sparsity.json``; the reports are kept in ``bench/results/sparsity_runs/<variant>/``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from bench import ROOT
from bench.studies.recipe import run_recipe
from distill.compress.sparsity import SPARSITY
from distill.config import exit_on_config_error


def variants(cfg: DictConfig) -> dict[str, list[str]]:
    """Variant name → the train.py overrides that make it."""
    out = {}
    for importance in cfg.importances:
        for pattern in cfg.patterns:
            for healing in cfg.healing:
                name = f"{importance}_{pattern.replace(':', 'of')}_{healing}"
                overrides = [f"callbacks.sparsity.importance={importance}"]
                if pattern == "2:4":
                    overrides.append("callbacks.sparsity.pattern=2:4")
                if healing == "oneshot":
                    overrides += list(cfg.oneshot_overrides)
                out[name] = overrides + list(cfg.eval_overrides)
    return out


def _row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    student = report["metrics"]["student"]
    final = [m for m in report["modifications"] if m["kind"] == SPARSITY.name][-1]["config"]
    return {
        "variant": name,
        "sparsity": final["zeros"],
        "top1": student["heldout/top1_agreement"],
        "top1_ci": [student.get("heldout/top1_agreement_ci_low"), student.get("heldout/top1_agreement_ci_high")],
        "kl": student["heldout/kl_to_teacher"],
        "ppl": student["heldout/ppl"],
        "train_seconds": report.get("run", {}).get("train_seconds"),
    }


def ptq_rows(headline: Path) -> list[str]:
    """The PTQ baseline rows of the headline table (name, size ratio, ppl, top-1), as Markdown rows."""
    rows = []
    for line in headline.read_text().splitlines() if headline.exists() else []:
        if line.startswith("| baseline: ptq_"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append(f"| {cells[0]} | {cells[2]} | – | {cells[7]} | {cells[8]} | {cells[6]} |")
    return rows


def run(cfg: DictConfig) -> None:
    """Run the variants first when ``cfg.run`` is set, then tabulate them with the PTQ rows."""
    reports = Path(cfg.reports)
    plan = variants(cfg)
    if cfg.run:
        for name, overrides in plan.items():
            if (reports / name / "report.json").exists() and not cfg.force:
                continue
            run_recipe("distill_sparse", Path(cfg.runs_root), cfg.force, overrides, name=f"sparsity_{name}")
            (reports / name).mkdir(parents=True, exist_ok=True)
            for kept in ("report.json", "report.md"):
                shutil.copy(Path(cfg.runs_root) / f"sparsity_{name}" / kept, reports / name / kept)
    rows = [_row(n, json.loads((reports / n / "report.json").read_text())) for n in plan if (reports / n).exists()]
    lines = [
        "| model | size vs fp32 teacher | zero weights (decoder linears) | top-1 agreement (95 % CI) | KL | ppl |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        low, high = r["top1_ci"]
        ci = f" ({low:.3f}–{high:.3f})" if low is not None else ""
        lines.append(
            f"| {r['variant']} | 1.00× (dense) | {r['sparsity']:.1%} | {r['top1']:.3f}{ci} | {r['kl']:.3f} | "
            f"{r['ppl']:.2f} |"
        )
    lines += ptq_rows(Path(cfg.baselines))
    table = "\n".join(lines)
    print(table)
    results = Path(cfg.results_dir)
    title = "# Weight sparsity on the embedded default (bench/sparsity.py)\n\n"
    (results / "sparsity.md").write_text(title + table + "\n")
    (results / "sparsity.json").write_text(json.dumps(rows, indent=2) + "\n")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/sparsity")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))  # Hydra's record goes to the repository's logs/
    main()
