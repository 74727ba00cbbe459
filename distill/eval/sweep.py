"""Combine the compression reports of several runs: one table and one quality-vs-size plot.

A Hydra multirun (``python train.py -m experiment=distill_prune callbacks.prune.target=0.25,0.5,0.75``)
writes one ``report.json`` per point; :class:`SweepSummary`, registered in ``conf/hydra/default.yaml``,
then writes ``sweep_report.md`` and ``quality_vs_size.png`` into the sweep directory. The same summary
can be drawn for any set of finished runs::

    python -m distill.eval.sweep runs=logs/train/multiruns/<name>            # every report.json below it
    python -m distill.eval.sweep 'runs=[runA,runB,runC]' out=comparison/     # chosen runs

(Hydra overrides of ``conf/sweep.yaml``; ``out`` defaults to the first of ``runs``.)

``bench/headline.py`` uses the same reader and plot for the headline table.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distill.config import config_error, exit_on_config_error
from distill.runtime.paths import export_root

log = logging.getLogger("distill.eval.sweep")

DEFAULT_CLIFF = 8.0  # the guard's default max_compression_ratio (conf/eval/default.yaml)


def find_reports(roots: Sequence[str | Path]) -> list[Path]:
    """Every ``report.json`` at or below ``roots`` (a run directory or a folder of runs), in path order."""
    found: list[Path] = []
    for root in map(Path, roots):
        if root.is_file() and root.name == "report.json":
            found.append(root)
        elif (root / "report.json").is_file():
            found.append(root / "report.json")
        else:
            found += sorted(root.rglob("report.json"), key=lambda p: (len(p.parts), str(p)))
    return found


def load_point(path: Path) -> dict[str, Any]:
    """One run's report, with the Hydra overrides it was launched with (``.hydra/overrides.yaml``)."""
    report = json.loads(path.read_text())
    overrides_file = path.parent / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return {
        "path": path,
        "report": report,
        "overrides": list(overrides or []),
        "teacher": report["metrics"]["teacher"],
        "student": report["metrics"]["student"],
        "run": report.get("run") or {},
    }


def label_points(points: list[dict[str, Any]]) -> None:
    """Name each point by what sets it apart: its recipe and the overrides not shared by every point."""
    common = set.intersection(*(set(p["overrides"]) for p in points)) if points else set()
    for p in points:
        own = [o for o in p["overrides"] if o not in common and not o.startswith("experiment=")]
        recipe = p["run"].get("recipe")
        parts = ([recipe] if recipe and len({q["run"].get("recipe") for q in points}) > 1 else []) + own
        p["label"] = " ".join(parts) or recipe or p["path"].parent.name


def task_accuracy(metrics: dict[str, float]) -> float | None:
    """Mean accuracy over the tasks in ``metrics`` (``task/<name>/acc``), or None when none ran."""
    accs = [v for k, v in metrics.items() if k.startswith("task/") and k.endswith("/acc")]
    return sum(accs) / len(accs) if accs else None


def teacher_row(points: list[dict[str, Any]]) -> dict[str, float]:
    """The teacher's metrics: quality from the first report, tokens/s as the median over all reports.

    Quality does not vary between runs on the same data; speed is re-measured in each run, so the median
    is less sensitive to what else the machine was doing.
    """
    teacher = dict(points[0]["teacher"])
    speeds = [p["teacher"]["cost/tokens_per_s"] for p in points if "cost/tokens_per_s" in p["teacher"]]
    if speeds:
        teacher["cost/tokens_per_s"] = statistics.median(speeds)
    return teacher


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def summary_table(points: list[dict[str, Any]]) -> str:
    """A markdown table: the teacher first, then one row per point."""
    head = (
        "| model | memory (MB) | ratio vs teacher | held-out ppl | top-1 agreement | task acc | tokens/s (CPU) "
        "| train time | guard |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    t = teacher_row(points)
    rows = [
        f"| teacher ({points[0]['report']['models']['baseline']}) | {t['cost/bytes_memory'] / 1e6:.1f} | 1.00× "
        f"| {t['heldout/ppl']:.2f} | 1.000 | {_num(task_accuracy(t), '.3f')} "
        f"| {_num(t.get('cost/tokens_per_s'), '.1f')} | – | – |"
    ]
    for p in points:
        s, run = p["student"], p["run"]
        flags = list(dict.fromkeys(f["flag"] for f in p["report"]["degradation"]["flags"]))  # once per kind
        secs = run.get("train_seconds")
        rows.append(
            f"| {p['label']} | {s['cost/bytes_memory'] / 1e6:.1f} | {_num(s.get('cost/compression_ratio'), '.2f')}× "
            f"| {s['heldout/ppl']:.2f} | {s['heldout/top1_agreement']:.3f} | {_num(task_accuracy(s), '.3f')} "
            f"| {_num(s.get('cost/tokens_per_s'), '.1f')} | {_num(None if secs is None else secs / 60, '.1f')} min "
            f"| {', '.join(flags) or 'ok'} |"
        )
    return "\n".join([head, *rows])


def plot_quality_vs_size(points: list[dict[str, Any]], path: str | Path, cliff: float | None = None) -> Path:
    """Held-out perplexity and top-1 agreement against compression ratio, teacher marked, cliff line drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if cliff is None:
        settings = points[0]["report"]["degradation"].get("settings") or {}
        cliff = float(settings.get("max_compression_ratio", DEFAULT_CLIFF))
    t = teacher_row(points)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name, log_y in (
        (axes[0], "heldout/ppl", "held-out perplexity", True),
        (axes[1], "heldout/top1_agreement", "top-1 agreement with the teacher", False),
    ):
        xs = [p["student"].get("cost/compression_ratio", float("nan")) for p in points]
        ys = [p["student"][key] for p in points]
        ax.scatter(xs, ys, marker="o", s=40, label="student")
        for x, y, p in zip(xs, ys, points, strict=True):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.scatter([1.0], [t.get(key, 1.0)], marker="*", s=180, color="tab:red", label="teacher")
        ax.axvline(cliff, linestyle="--", color="grey", label=f"guard: {cliff:g}× compression")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("compression ratio vs teacher (memory bytes)")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    fig.suptitle("quality vs size")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)  # never leave a half-written plot where a good one was
    return path


def summarize(roots: Sequence[str | Path], out_dir: str | Path) -> tuple[Path, Path] | None:
    """Write ``sweep_report.md`` and ``quality_vs_size.png`` for the reports under ``roots`` into ``out_dir``.

    Returns None (and logs why) when there is no report to combine.
    """
    reports = find_reports(roots)
    if not reports:
        log.warning("no report.json under %s: nothing to combine (was eval.enabled=false?)", list(map(str, roots)))
        return None
    points = [load_point(p) for p in reports]
    label_points(points)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_quality_vs_size(points, out_dir / "quality_vs_size.png")
    md = out_dir / "sweep_report.md"
    lines = [
        "# Sweep summary",
        "",
        summary_table(points),
        "",
        "Memory bytes are the compression ratio's basis. Task accuracy is the mean over the run's tasks.",
        "",
        "Reports:",
        "",
        *(f"- `{p['label']}`: {p['path']}" for p in points),
        "",
    ]
    md.write_text("\n".join(lines))
    return md, plot


class SweepSummary(Callback):
    """Hydra callback: after a multirun, combine its points' reports (``conf/hydra/default.yaml``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the sweep's table and plot into ``hydra.sweep.dir``."""
        if not HydraConfig.initialized():
            # Hydra has left the per-job config by now; a user's sweep dir may still use ${hydra:...}.
            HydraConfig.instance().set_config(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        written = summarize([sweep_dir], sweep_dir)
        if written:
            log.info("sweep summary: %s, %s", *written)


def run(cfg: DictConfig) -> tuple[Path, Path]:
    """Summarize the runs ``cfg`` names (``conf/sweep.yaml``) and print what was written.

    Raises:
        ConfigError: ``runs`` missing, naming a folder that does not exist, or holding no report.

    """
    if OmegaConf.is_missing(cfg, "runs"):
        raise config_error("runs", None, "required: python -m distill.eval.sweep 'runs=[<run dir>,...]' [out=<folder>]")
    runs = [cfg.runs] if isinstance(cfg.runs, str) else [str(r) for r in cfg.runs]
    missing = [r for r in runs if not Path(r).exists()]
    if missing:
        raise config_error("runs", missing, "no such folder; pass run directories or a multirun folder")
    written = summarize(runs, cfg.out or runs[0])
    if written is None:
        raise config_error("runs", runs, "no report.json found; run with eval.enabled=true")
    print(f"wrote {written[0]} and {written[1]}")
    return written


@hydra.main(version_base="1.3", config_path="../../conf", config_name="sweep")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    export_root()
    main()
