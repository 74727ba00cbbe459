"""Does KD earn its place? Each recipe against its CE-only control: same student, steps, data and seed.

    python -m bench.kd_vs_ce run=true    # train both sides of every pair (sides with a kept report are skipped)
    python -m bench.kd_vs_ce             # only compare, from the kept reports

A pair is two ``train.py`` runs that differ only in the objective: the recipe (KD) and the same recipe with
``distill.objective.alpha=0`` (hard labels only). Both are scored by the end-of-run evaluation on the same
test documents, so the comparison is paired: every bootstrap resample draws the same test documents
for both sides, and the interval is that of the difference KD − CE (top-1 agreement and KL to the teacher,
and perplexity on the held-out labels, which is CE's own objective). Task accuracies, where the pair ran
tasks, are compared by their separate intervals. Settings: Hydra overrides of ``conf/bench/kd_vs_ce.yaml``.
Writes ``bench/results/kd_vs_ce.md`` and ``kd_vs_ce.json``; the reports are kept in
``bench/results/kd_vs_ce_runs/<pair>_<side>/``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from bench import ROOT
from bench.studies.recipe import run_recipe
from distill.config import config_error, exit_on_config_error
from distill.eval.intervals import resample_interval

SIDES = ("kd", "ce")
# Held-out metric → (per-row key, transform of the token mean, higher is better).
HELDOUT: dict[str, tuple[str, Callable[[float], float], bool]] = {
    "top1_agreement": ("agree", float, True),
    "kl_to_teacher": ("kl", float, False),
    "ppl": ("nll", math.exp, False),
}


def _rows(report: dict[str, Any], side: str, where: Path) -> dict[str, np.ndarray]:
    """One side's per-document held-out sums on the report's test split (its first held-out set)."""
    sets = report.get("heldout_rows") or {}
    rows = next(iter(sets.values()), {}).get(side)
    if not rows or not rows.get("tokens"):
        raise config_error(
            "pairs", str(where), "the report has no per-sequence held-out sums (heldout_rows); rerun the side"
        )
    return {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}


def paired_difference(kd: dict[str, Any], ce: dict[str, Any], where: tuple[Path, Path]) -> dict[str, Any]:
    """KD − CE on each held-out metric, with a 95 % interval from resampling the shared held-out sequences.

    Raises:
        ConfigError: when the two reports did not score the same held-out sequences against the same teacher.

    """
    t_kd, t_ce = _rows(kd, "teacher", where[0]), _rows(ce, "teacher", where[1])
    same = np.array_equal(t_kd["tokens"], t_ce["tokens"]) and np.allclose(t_kd["nll"], t_ce["nll"], rtol=1e-4)
    if not same:
        raise config_error(
            "pairs",
            f"{where[0].parent.name} / {where[1].parent.name}",
            "the two sides were scored on different held-out data or teachers; run both with the same seed and data",
        )
    s_kd, s_ce = _rows(kd, "student", where[0]), _rows(ce, "student", where[1])
    tokens = s_kd["tokens"]
    out: dict[str, Any] = {}
    for metric, (key, fn, higher) in HELDOUT.items():

        def mean(rows: dict[str, np.ndarray], idx: np.ndarray, key: str = key, fn: Callable = fn) -> float:
            return fn(float(rows[key][idx].sum() / tokens[idx].sum()))

        every = np.arange(len(tokens))
        low, high = resample_interval(lambda idx: mean(s_kd, idx) - mean(s_ce, idx), len(tokens))
        out[metric] = {
            "kd": mean(s_kd, every),
            "ce": mean(s_ce, every),
            "difference": mean(s_kd, every) - mean(s_ce, every),
            "ci": [low, high],
            "winner": _winner(low, high, higher),
        }
    out["sequences"] = len(tokens)
    return out


def _winner(low: float, high: float, higher_is_better: bool) -> str:
    """``kd`` or ``ce`` when the interval of KD − CE excludes 0, else ``neither``."""
    if low > 0:
        return "kd" if higher_is_better else "ce"
    if high < 0:
        return "ce" if higher_is_better else "kd"
    return "neither"


def task_comparison(kd: dict[str, Any], ce: dict[str, Any]) -> dict[str, Any]:
    """Each task accuracy both sides ran: values, intervals, and which side wins when the intervals separate."""
    s_kd, s_ce = kd["metrics"]["student"], ce["metrics"]["student"]
    out = {}
    for k in sorted(s_kd):
        if not (k.startswith("task/") and k.endswith("/acc")) or k not in s_ce:
            continue
        ci_kd = [s_kd.get(f"{k}_ci_low"), s_kd.get(f"{k}_ci_high")]
        ci_ce = [s_ce.get(f"{k}_ci_low"), s_ce.get(f"{k}_ci_high")]
        winner = "neither"
        if None not in ci_kd and None not in ci_ce:
            winner = "kd" if ci_kd[0] > ci_ce[1] else "ce" if ci_ce[0] > ci_kd[1] else "neither"
        out[k] = {"kd": s_kd[k], "ce": s_ce[k], "kd_ci": ci_kd, "ce_ci": ci_ce, "winner": winner}
    return out


def compare(name: str, folder: Path) -> dict[str, Any]:
    """The comparison of pair ``name`` from its kept reports ``folder/<name>_kd`` and ``folder/<name>_ce``."""
    paths = tuple(folder / f"{name}_{side}" / "report.json" for side in SIDES)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise config_error("pairs", name, f"no report at {', '.join(missing)}; run with run=true")
    kd, ce = (json.loads(p.read_text()) for p in paths)
    return {
        "pair": name,
        "steps": [r.get("run", {}).get("steps") for r in (kd, ce)],
        "train_seconds": [r.get("run", {}).get("train_seconds") for r in (kd, ce)],
        "heldout": paired_difference(kd, ce, paths),
        "tasks": task_comparison(kd, ce),
    }


def _ci(ci: list[float | None]) -> str:
    return "–" if None in ci else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def to_markdown(results: list[dict[str, Any]], pairs: DictConfig) -> str:
    """One table per pair: KD, CE, KD − CE with its paired 95 % interval, and who wins."""
    lines = [
        "# KD against CE-only",
        "",
        "Each pair: the same student, steps, data and seed, trained with the recipe's distillation loss (KD) "
        "or on the hard labels alone (CE, `distill.objective.alpha=0`). Held-out rows are paired: the 95 % "
        "interval of KD − CE resamples the same held-out sequences for both sides (1,000 resamples). A side "
        "wins only where the interval excludes 0. Regenerated by `python -m bench.kd_vs_ce`.",
    ]
    for r in results:
        spec = pairs[r["pair"]]
        h = r["heldout"]
        lines += [
            "",
            f"## {r['pair']}",
            "",
            f"KD: `{spec.kd.recipe}` {' '.join(spec.kd.overrides)}; CE: `{spec.ce.recipe}` "
            f"{' '.join(spec.ce.overrides)}. Steps {r['steps'][0]} / {r['steps'][1]}; "
            f"{h['sequences']} held-out sequences.",
            "",
            "| metric | KD | CE | KD − CE [95 %] | better |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for metric in HELDOUT:
            m = h[metric]
            lines.append(
                f"| held-out {metric} | {m['kd']:.4g} | {m['ce']:.4g} | {m['difference']:+.4g} {_ci(m['ci'])} "
                f"| {m['winner']} |"
            )
        for task, t in r["tasks"].items():
            lines.append(
                f"| {task} | {t['kd']:.3f} {_ci(t['kd_ci'])} | {t['ce']:.3f} {_ci(t['ce_ci'])} "
                f"| {t['kd'] - t['ce']:+.3f} | {t['winner']} (separate intervals) |"
            )
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Train the pairs when ``cfg.run`` is set, then compare them and write the results."""
    names = list(cfg.only) if cfg.get("only") else list(cfg.pairs)
    unknown = [n for n in names if n not in cfg.pairs]
    if unknown:
        raise config_error("only", unknown, f"choose among {list(cfg.pairs)}")
    kept = Path(cfg.reports)
    if cfg.run:
        runs_root = Path(cfg.runs_root)
        for name in names:
            for side in SIDES:
                spec = cfg.pairs[name][side]
                run_name = f"kdce_{name}_{side}"
                overrides = [str(o) for o in [*spec.overrides, *cfg.eval_overrides]]
                run_recipe(spec.recipe, runs_root, cfg.force, overrides, name=run_name)
                keep = kept / f"{name}_{side}"
                keep.mkdir(parents=True, exist_ok=True)
                for f in ("report.json", "report.md"):
                    shutil.copyfile(runs_root / run_name / f, keep / f)
    results = [compare(name, kept) for name in names]
    out = Path(cfg.results_dir)
    (out / "kd_vs_ce.json").write_text(json.dumps(results, indent=2) + "\n")
    text = to_markdown(results, cfg.pairs)
    (out / "kd_vs_ce.md").write_text(text)
    print(text)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/kd_vs_ce")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
