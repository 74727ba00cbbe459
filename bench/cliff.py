"""The seed's cliff, measured: quality retained against the compression ratio on disk, PTQ curve and recipes.

    python -m bench.cliff                 # measure PTQ of the teacher at each width, then draw with the reports
    python -m bench.cliff measure=false   # redraw from bench/results/cliff.json

PTQ of the whole teacher (every Linear and the embedding, torchao) at bf16, int8, int6, int5, int4, int3 and
int2 is scored on the recipes' held-out batches (top-1 agreement and KL to the fp32 teacher); the points of
the recipe and baseline reports in ``bench/results/headline_runs`` are placed on the same axes. Task-accuracy
retention (student accuracy / teacher accuracy, averaged over the local tasks) comes from the reports that
ran the tasks. Writes ``bench/results/cliff.json`` (the curve), ``cliff.md`` (the table) and ``cliff.png``.
Settings: Hydra overrides of ``conf/bench/cliff.yaml``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from bench import ROOT
from distill.config import config_error, exit_on_config_error
from distill.eval.sweep import find_reports, load_point, named_run_folders


def task_retention(point: dict[str, Any]) -> float | None:
    """Mean over tasks of student accuracy / teacher accuracy (None when the report ran no task)."""
    keys = [k for k in point["teacher"] if k.startswith("task/") and k.endswith("/acc") and k in point["student"]]
    ratios = [point["student"][k] / point["teacher"][k] for k in keys if point["teacher"][k] > 0]
    return sum(ratios) / len(ratios) if ratios else None


def report_points(folder: Path, by_folder: bool = False) -> list[dict[str, Any]]:
    """One point per report under ``folder`` that measured something: label, kind, ratio, agreement, retention.

    The label is the run's recipe, or with ``by_folder`` the run folder's name (a longer run of a recipe that is
    already on the plot at equal steps keeps a label of its own).
    """
    points = []
    for path in find_reports([folder]):
        p = load_point(path)
        s = p["student"]
        if p["run"].get("unavailable") or "cost/ratio_vs_fp32_teacher" not in s:
            continue
        points.append(
            {
                "label": path.parent.name if by_folder else p["run"].get("recipe") or path.parent.name,
                "kind": "baseline" if p["run"].get("baseline") else "recipe",
                "ratio": s["cost/ratio_vs_fp32_teacher"],
                "top1_agreement": s["heldout/top1_agreement"],
                "kl_to_teacher": s["heldout/kl_to_teacher"],
                "task_retention": task_retention(p),
            }
        )
    return points


def measure_curve(cfg: DictConfig) -> list[dict[str, Any]]:
    """PTQ of the teacher at every width in ``cfg.widths``, scored on held-out data only."""
    from bench.studies.baselines import prepare, ptq_curve

    bench = prepare(cfg)
    rows = ptq_curve(bench, list(cfg.widths), group_size=cfg.group_size)
    params4 = 4 * sum(p.numel() for p in bench.teacher.model.parameters())
    for row in rows:
        # The reports' definition: the fp32 teacher's 4 bytes per parameter over the artifact folder on disk.
        row["ratio"] = params4 / row["disk_bytes"]
    return rows


def curve_labels(curve: list[dict[str, Any]]) -> set[str]:
    """The baseline labels that measure a curve width (``ptq_int4`` is the curve's int4; ``ptq_gguf_q4_0`` is not)."""
    return {f"ptq_{row['width']}" for row in curve}


def table(curve: list[dict[str, Any]], points: list[dict[str, Any]]) -> str:
    """Markdown: the PTQ curve (with task retention where a baseline report ran the tasks), then the reports."""
    by_label = {p["label"]: p for p in points}
    lines = [
        "| model | ratio vs fp32 teacher (disk) | bits/weight (disk) | top-1 agreement | KL to teacher "
        "| task-accuracy retention |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in curve:
        if row["width"] == "fp32":
            continue
        measured = by_label.get(f"ptq_{row['width']}") or by_label.get(f"teacher_{row['width']}")
        retention = measured["task_retention"] if measured else None
        lines.append(
            f"| PTQ {row['width']} | {row['ratio']:.2f}× | {row['bits_per_weight_disk']:.2f} "
            f"| {row['top1_agreement']:.3f} | {row['kl_to_teacher']:.3f} "
            f"| {'–' if retention is None else f'{retention:.2f}'} |"
        )
    on_curve = curve_labels(curve)
    for p in sorted(points, key=lambda q: q["ratio"]):
        if p["label"] in on_curve:
            continue  # already a curve row; other grids (GGUF, groups of 192) are rows of their own
        retention = "–" if p["task_retention"] is None else f"{p['task_retention']:.2f}"
        lines.append(
            f"| {p['kind']}: {p['label']} | {p['ratio']:.2f}× | – | {p['top1_agreement']:.3f} "
            f"| {p['kl_to_teacher']:.3f} | {retention} |"
        )
    return "\n".join(lines)


def plot(curve: list[dict[str, Any]], points: list[dict[str, Any]], path: Path) -> Path:
    """Two panels against the ratio on disk: top-1 agreement and task-accuracy retention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ptq = [r for r in curve if r["width"] != "fp32"]
    axes[0].plot([r["ratio"] for r in ptq], [r["top1_agreement"] for r in ptq], marker="o", label="PTQ of the teacher")
    for r in ptq:
        axes[0].annotate(r["width"], (r["ratio"], r["top1_agreement"]), textcoords="offset points", xytext=(4, 4))
    # The right panel's line: the PTQ baselines that ran the tasks (the fp32 teacher anchors it at 1.0).
    on_curve = curve_labels(curve)
    measured = [p for p in points if p["label"] in on_curve and p["task_retention"] is not None]
    measured.sort(key=lambda p: p["ratio"])
    axes[1].plot(
        [p["ratio"] for p in measured], [p["task_retention"] for p in measured], marker="o", label="PTQ of the teacher"
    )
    rest = [p for p in points if p["label"] not in on_curve and p["label"] != "teacher_fp32"]
    groups = (
        ([p for p in rest if p["label"].startswith("ptq_")], "^", "tab:green", "PTQ, other grids"),
        ([p for p in rest if not p["label"].startswith("ptq_")], "s", "tab:orange", "recipes, baselines"),
    )
    for ax, key in ((axes[0], "top1_agreement"), (axes[1], "task_retention")):
        for group, marker, color, label in groups:
            shown = [p for p in group if p[key] is not None]
            ax.scatter([p["ratio"] for p in shown], [p[key] for p in shown], marker=marker, color=color, label=label)
            for p in shown:
                ax.annotate(p["label"], (p["ratio"], p[key]), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the 2×, 4×, 8×, 16× labels
        ax.set_xlim(1.5, 20)
        ax.set_xticks([2, 4, 8, 16])
        ax.set_xticklabels(["2×", "4×", "8×", "16×"])
        ax.set_xlabel("compression ratio vs fp32 teacher (bytes on disk)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("top-1 agreement with the teacher")
    axes[1].set_ylabel("task accuracy / teacher's (mean of local tasks)")
    fig.suptitle("the cliff: quality retained against size")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def run(cfg: DictConfig) -> str:
    """Measure (or read) the curve, then write cliff.json, cliff.md and cliff.png; returns the table."""
    curve_file = Path(cfg.curve_file)
    if cfg.measure:
        curve = measure_curve(cfg)
        tmp = curve_file.with_name(curve_file.name + ".tmp")
        tmp.write_text(json.dumps({"settings": OmegaConf.to_container(cfg.widths), "rows": curve}, indent=2))
        tmp.replace(curve_file)
    elif not curve_file.is_file():
        raise config_error("curve_file", str(curve_file), "no measured curve there; run with measure=true first")
    curve = json.loads(curve_file.read_text())["rows"]
    points = report_points(Path(cfg.reports))
    for folder in named_run_folders(cfg.get("longer_runs"), "longer_runs").values():
        points += report_points(folder, by_folder=True)
    results = Path(cfg.results_dir)
    md = table(curve, points)
    plot(curve, points, results / "cliff.png")
    (results / "cliff.md").write_text(
        "# The cliff\n\n" + md + "\n\nWritten by `python -m bench.cliff`. PTQ rows: the teacher quantized after "
        "training (torchao, every Linear and the embedding), scored on the recipes' held-out batches. Task "
        "retention is shown where a report ran the tasks. The curve's artifacts hold weights and config without the "
        "tokenizer (about 3.5 MB), so its ratios run slightly above the reports' (int8: 3.96× here, 3.86× in its "
        "report).\n"
    )
    return md


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/cliff")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        print(run(cfg))


if __name__ == "__main__":
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
