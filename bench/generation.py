"""Off-policy, on-policy (GKD) and sequence-level KD on the embedded default, at equal wall-clock time.

    python -m bench.generation run=true     # train every variant that has no kept report, then tabulate
    python -m bench.generation              # tabulate from the kept reports

Every variant is ``python train.py experiment=<recipe> trainer.max_time=<max_time>`` with its
``distill.generation`` overrides, so sampling continuations costs training steps: the comparison is at equal
time, not equal steps. Each run's end-of-run evaluation scores the student against the teacher (held-out top-1
agreement and KL with 95 % intervals, perplexity, task accuracy with intervals). Settings: Hydra overrides of
``conf/bench/generation.yaml``. Writes ``bench/results/generation.md`` and ``generation.json``; the reports
are kept in ``bench/results/generation_runs/<variant>/``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from bench import ROOT
from bench.studies.recipe import run_recipe
from distill.config import exit_on_config_error


def _ci(metrics: dict[str, Any], key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    value = metrics.get(key)
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" ({low:.3f}–{high:.3f})" if low is not None and high is not None else "")


def _generated(folder: Path) -> tuple[float | None, float | None]:
    """Mean generated-token share and mean seconds spent generating per step, over the steps metrics.csv logged."""
    files = sorted(folder.glob("csv/version_*/metrics.csv"))
    if not files:
        return None, None
    share, seconds = [], []
    with files[-1].open() as handle:
        for row in csv.DictReader(handle):
            if row.get("train/generated_share"):
                share.append(float(row["train/generated_share"]))
            if row.get("train/generation_s"):
                seconds.append(float(row["train/generation_s"]))
    return (sum(share) / len(share) if share else None), (sum(seconds) / len(seconds) if seconds else None)


def _row(name: str, folder: Path) -> dict[str, Any]:
    report = json.loads((folder / "report.json").read_text())
    student = report["metrics"]["student"]
    tasks = {
        k.split("/", 1)[1]: _ci(student, k)
        for k in student
        if k.startswith("task/") and "_ci_" not in k and not k.endswith("/n")
    }
    share, per_step = _generated(folder)
    steps, seconds = report.get("run", {}).get("steps"), report.get("run", {}).get("train_seconds")
    return {
        "variant": name,
        "steps": steps,
        "train_seconds": seconds,
        "generated_share_logged_steps": share,
        "generation_seconds_per_step": per_step,
        # Estimated from the logged steps' mean: metrics.csv holds every log_every_n_steps-th step only.
        "generation_share_of_train_time": per_step * steps / seconds if per_step and steps and seconds else 0.0,
        "top1": _ci(student, "heldout/top1_agreement"),
        "kl": student.get("heldout/kl_to_teacher"),
        "ppl": student.get("heldout/ppl"),
        # Greedy continuations of a few held-out prompts against the teacher's: the one score that reads the
        # student's own text, but coarse (8 prompts x 16 tokens by default) and without an interval.
        "greedy_token_agreement": student.get("fidelity/token_agreement"),
        "tasks": tasks,
    }


def run(cfg: DictConfig) -> None:
    """Run the variants first when ``cfg.run`` is set, then tabulate them."""
    reports, runs_root = Path(cfg.reports), Path(cfg.runs_root)
    for name, extra in cfg.variants.items():
        if cfg.run and (cfg.force or not (reports / name / "report.json").exists()):
            overrides = [f"trainer.max_time={cfg.max_time}", *cfg.common, *extra]
            run_recipe(cfg.recipe, runs_root, cfg.force, overrides, name=f"generation_{name}")
            (reports / name).mkdir(parents=True, exist_ok=True)
            src = runs_root / f"generation_{name}"
            for kept in ("report.json", "report.md"):
                shutil.copy(src / kept, reports / name / kept)
            for found in src.glob("csv/version_*/metrics.csv"):
                (reports / name / "csv" / found.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(found, reports / name / "csv" / found.parent.name / "metrics.csv")
    rows = [_row(n, reports / n) for n in cfg.variants if (reports / n / "report.json").exists()]
    task_names = sorted({t for r in rows for t in r["tasks"]})
    head = (
        "| variant | steps | generated share | generating, s/step | share of train time |"
        " top-1 agreement (95 % CI) | KL | ppl | greedy agreement |"
    )
    lines = [head + "".join(f" {t} |" for t in task_names), "|" + " --- |" * (9 + len(task_names))]
    for r in rows:
        share, per_step = r["generated_share_logged_steps"] or 0.0, r["generation_seconds_per_step"] or 0.0
        cells = [r["variant"], str(r["steps"]), f"{share:.2f}", f"{per_step:.1f}"]
        cells += [f"{r['generation_share_of_train_time']:.0%}", r["top1"], f"{r['kl']:.3f}", f"{r['ppl']:.2f}"]
        greedy = r["greedy_token_agreement"]
        cells.append("–" if greedy is None else f"{greedy:.3f}")
        cells += [r["tasks"].get(t, "–") for t in task_names]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    results = Path(cfg.results_dir)
    title = f"# Off-policy, on-policy and sequence-level KD, {cfg.max_time} of training each (bench/generation.py)\n\n"
    (results / "generation.md").write_text(title + table + "\n")
    (results / "generation.json").write_text(json.dumps(rows, indent=2) + "\n")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/generation")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))  # Hydra's record goes to the repository's logs/
    main()
