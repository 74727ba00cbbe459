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


def named_run_folders(folders: str | Sequence[str | Path] | None, field: str) -> dict[str, Path]:
    """Finished run folders keyed by their names (the labels of their rows), or a ConfigError naming ``field``."""
    paths = [Path(f) for f in ([folders] if isinstance(folders, str) else folders or [])]
    named = {p.name: p for p in paths}
    if len(named) < len(paths):  # rows are labelled by folder name, so two alike would share a row
        raise config_error(field, [str(p) for p in paths], "give each run folder a different name")
    absent = [str(p) for p in paths if not (p / "report.json").is_file()]
    if absent:
        raise config_error(field, absent, "each folder needs the report.json of a finished run")
    return named


def load_point(path: Path) -> dict[str, Any]:
    """One run's report, with the Hydra overrides it was launched with (``.hydra/overrides.yaml``)."""
    report = json.loads(path.read_text())
    overrides_file = path.parent / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return {
        "path": path,
        "report": report,
        "overrides": list(overrides or []),
        "teacher": report.get("metrics", {}).get("teacher", {}),
        "student": report.get("metrics", {}).get("student", {}),
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


def task_names(points: list[dict[str, Any]]) -> list[str]:
    """The tasks with an accuracy in any point, in first-seen order."""
    names: dict[str, None] = {}
    for p in points:
        for key in p["student"]:
            if key.startswith("task/") and key.endswith("/acc"):
                names[key.split("/")[1]] = None
    return list(names)


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


def _acc(metrics: dict[str, float], task: str) -> str:
    """``0.412 (0.371–0.455)``: a task's accuracy with its bootstrap 95 % interval when the report has one."""
    key = f"task/{task}/acc"
    if key not in metrics:
        return "–"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return f"{metrics[key]:.3f}" + ("" if low is None or high is None else f" ({low:.2f}–{high:.2f})")


def _ci(m: dict[str, float], key: str, fmt: str = ".3f") -> str:
    """``0.853 [0.843, 0.863]``: a held-out rate with its 95 % interval over documents, when the report has one."""
    if m.get(key) is None:
        return "–"
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return format(m[key], fmt) + ("" if low is None or high is None else f" [{low:{fmt}}, {high:{fmt}}]")


def other_sets(points: list[dict[str, Any]]) -> list[str]:
    """The held-out sets besides the test split that any point scored (their ``heldout_<name>`` groups)."""
    names: dict[str, None] = {}
    for p in points:
        for key in p["student"]:
            group = key.split("/", 1)[0]
            if group.startswith("heldout_") and key.endswith("/top1_agreement"):
                names[group.removeprefix("heldout_")] = None
    return list(names)


def _row(label: str, m: dict[str, float], run: dict[str, Any], flags: str, tasks: list[str], sets: list[str]) -> str:
    mb = lambda k: _num(None if m.get(k) is None else m[k] / 1e6, ".1f")  # noqa: E731 - a column formatter
    secs = run.get("train_seconds")
    cells = [
        label,
        mb("cost/bytes_disk"),
        _num(m.get("cost/ratio_vs_fp32_teacher"), ".2f") + "×",
        _num(m.get("cost/bits_per_weight_disk"), ".2f"),
        _ci(m, "heldout/top1_agreement"),
        _num(m.get("heldout/kl_to_teacher"), ".3f"),
        *(
            cell
            for name in sets
            for cell in (_ci(m, f"heldout_{name}/top1_agreement"), _num(m.get(f"heldout_{name}/kl_to_teacher"), ".3f"))
        ),
        _num(m.get("heldout/ppl"), ".2f"),
        *(_acc(m, t) for t in tasks),
        _num(m.get("cost/tokens_per_s"), ".1f"),
        "–" if secs is None else f"{secs / 60:.1f} min",
        flags,
    ]
    return "| " + " | ".join(c.replace("–×", "–") for c in cells) + " |"


def summary_table(points: list[dict[str, Any]], teacher: bool | None = None) -> str:
    """A markdown table, one row per point; the size column is the deployable artifact's bytes on disk.

    Quality is top-1 agreement and KL to the teacher on the test split, then on every other held-out set, each
    rate with its 95 % interval over documents. The teacher row (the teacher as the runs loaded it: quality of
    the dequantized model, size of the file it came from) comes first unless ``teacher`` is False; by default it
    is left out when the points include baseline rows, which measure the teacher's forms themselves.
    """
    tasks = task_names(points)
    sets = other_sets(points)
    columns = [
        "model",
        "disk (MB)",
        "ratio vs fp32 teacher",
        "bits/weight (disk)",
        "test top-1 agreement [95% CI]",
        "test KL",
        *(c for name in sets for c in (f"{name} top-1 agreement [95% CI]", f"{name} KL")),
        "test ppl",
        *(f"{t} acc (95% CI)" for t in tasks),
        "tokens/s (CPU)",
        "train time",
        "guard",
    ]
    head = "| " + " | ".join(columns) + " |\n| --- |" + " ---: |" * (len(columns) - 2) + " --- |"
    if teacher is None:
        teacher = not any(p["run"].get("baseline") for p in points)
    rows = []
    if teacher:
        name = points[0]["report"]["models"]["baseline"]
        rows.append(_row(f"teacher ({name})", teacher_row(points), {}, "–", tasks, sets))
    for p in points:
        if p["run"].get("unavailable"):  # a baseline that cannot run here says why instead of numbers
            rows.append(f"| {p['label']} | {p['run']['unavailable']} |" + " |" * (len(columns) - 2))
            continue
        flags = list(dict.fromkeys(f["flag"] for f in p["report"]["degradation"]["flags"]))  # once per kind
        rows.append(_row(p["label"], p["student"], p["run"], ", ".join(flags) or "ok", tasks, sets))
    return "\n".join([head, *rows])


def evaluation_note(point: dict[str, Any]) -> str:
    """Which held-out sets a report scored, with their documents and tokens (for a table's footnote)."""
    sets = point["report"].get("heldout_sets") or {}
    from distill.data.named_sets import shown_source

    parts = [
        f"{name} ({shown_source(a.get('source'))}): {a.get('documents_scored')} documents, "
        f"{a.get('tokens_scored')} tokens"
        for name, a in sets.items()
    ]
    return "; ".join(parts) if parts else "the held-out split"


def split_key(point: dict[str, Any]) -> str | None:
    """The data key of the test split a report scored (None for reports without one)."""
    sets = point["report"].get("heldout_sets") or {}
    first = next(iter(sets.values()), {})
    return (first.get("split") or {}).get("data_key")


def same_evaluation(point: dict[str, Any], reference: dict[str, Any]) -> bool:
    """Whether two reports scored their models against the same teacher on the same held-out data.

    Reports that record their test split compare its data key (the corpus, tokenizer and split settings). Older
    reports fall back on the teacher's held-out perplexity as a fingerprint of both: a different corpus,
    split, block size or teacher changes it by far more than 1e-4 (the same teacher on the same tokens moves by
    about 1e-5 between CPUs' BLAS kernels).
    """
    same_teacher = point["report"]["models"]["baseline"] == reference["report"]["models"]["baseline"]
    if point["run"].get("unavailable"):  # measured nothing, so only the teacher can be matched
        return same_teacher
    keys = split_key(point), split_key(reference)
    a, b = point["teacher"].get("heldout/ppl"), reference["teacher"].get("heldout/ppl")
    close = a is not None and b is not None and abs(a - b) <= 1e-4 * abs(b)
    if keys[0] and keys[1]:
        return same_teacher and keys[0] == keys[1] and close
    return same_teacher and close


def baseline_points(folder: str | Path | None, like: dict[str, Any]) -> list[dict[str, Any]]:
    """The baseline reports under ``folder`` (``bench/baselines.py``) that match ``like``'s evaluation, by size."""
    if folder is None or not Path(folder).is_dir():
        return []
    points = []
    for path in find_reports([folder]):
        point = load_point(path)
        if point["run"].get("baseline") and same_evaluation(point, like):
            point["label"] = f"baseline: {point['run'].get('recipe') or path.parent.name}"
            points.append(point)
    # Smallest compression first, like a size axis; the ones that could not run go last.
    return sorted(points, key=lambda p: (bool(p["run"].get("unavailable")), _size_ratio(p["student"]) or 0.0))


SAME_SIZE = 0.001  # relative difference in size below which two artifacts count as equally large
NEAR_SIZE = 0.05  # a PTQ row up to this much larger is named when it scores higher (not hidden by the size cut)


def paired(
    point: dict[str, Any], other: dict[str, Any], held: str | None = None
) -> tuple[float, float, float, int] | None:
    """``point − other`` in top-1 agreement on the documents both scored in set ``held`` (the primary by default).

    A paired bootstrap over documents (:func:`~distill.eval.heldout.paired_difference`); None when either report
    lacks per-document sums for the set.
    """
    from distill.eval.heldout import paired_difference

    rows_a, rows_b = point["report"].get("heldout_rows") or {}, other["report"].get("heldout_rows") or {}
    held = held or next(iter(rows_a), None)
    a, b = (rows_a.get(held) or {}).get("student"), (rows_b.get(held) or {}).get("student")
    if not a or not b or "doc" not in a or "doc" not in b:
        return None
    try:
        return paired_difference(a, b)
    except ValueError:
        return None


def _diff_text(diff: tuple[float, float, float, int] | None) -> str:
    """``ties`` or ``beats``/``loses to``, with the paired difference and its interval."""
    if diff is None:
        return ""
    d, low, high, n = diff
    word = "ties" if low <= 0 <= high else ("leads" if d > 0 else "trails")
    return f"{word}: {d:+.3f} [{low:+.3f}, {high:+.3f}] over {n} documents"


def ptq_verdict(point: dict[str, Any], baselines: list[dict[str, Any]]) -> str | None:
    """One sentence: ``point`` against the best PTQ baseline that is at least as small on disk, paired by document.

    "At its size" means a PTQ row whose ratio against the fp32 teacher is at least the point's, within
    :data:`SAME_SIZE` (the same grid differs by the bytes of its metadata). Quality is top-1 agreement with the
    teacher on the test split; the difference is paired over the documents both scored, with its 95 % interval,
    and "ties" when the interval holds 0. Every other held-out set both reports scored gets its own difference.
    A PTQ row up to :data:`NEAR_SIZE` larger that scores higher is named too. None when the point has no size or
    agreement to compare.
    """
    s = point["student"]
    ratio, agree = s.get("cost/ratio_vs_fp32_teacher"), s.get("heldout/top1_agreement")
    if ratio is None or agree is None:
        return None
    ptq = [b for b in baselines if str(b["run"].get("recipe", "")).startswith("ptq_") and b["student"]]
    rivals = [b for b in ptq if b["student"].get("cost/ratio_vs_fp32_teacher", 0) >= ratio * (1 - SAME_SIZE)]
    head = f"**{point['label']}** ({ratio:.2f}×, top-1 {agree:.3f})"
    if not rivals:
        head += ": no PTQ baseline is this small"
        if not ptq:
            return head + "."
        # The smallest PTQ row is larger, so beating it is the stronger claim; not beating it says little.
        best = max(ptq, key=lambda b: b["student"].get("cost/ratio_vs_fp32_teacher", 0))
        line = f"{head}; against the smallest, {_versus(point, best)}, which is larger."
    else:
        best = max(rivals, key=lambda b: b["student"]["heldout/top1_agreement"])
        line = f"{head} against {_versus(point, best)}."
    near = [
        b
        for b in ptq
        if b not in rivals
        and b is not best
        and b["student"].get("cost/ratio_vs_fp32_teacher", 0) >= ratio * (1 - NEAR_SIZE)
        and _higher_somewhere(b["student"], s)
    ]
    for b in near:
        larger = 100 * (ratio / b["student"]["cost/ratio_vs_fp32_teacher"] - 1)
        line += f" {b['run']['recipe']}, {larger:.1f} % larger, scores higher on a held-out set: {_versus(point, b)}."
    return line


def _higher_somewhere(rival: dict[str, float], student: dict[str, float]) -> bool:
    """Whether ``rival`` has the higher top-1 agreement on any held-out set both scored (the test split or another)."""
    keys = [k for k in student if k.startswith("heldout") and k.endswith("/top1_agreement") and k in rival]
    return any(rival[k] > student[k] for k in keys)


def _versus(point: dict[str, Any], rival: dict[str, Any]) -> str:
    """``rival (ratio, top-1)``: the paired difference on the test split and on every other set both scored."""
    b = rival["student"]
    text = f"{rival['run']['recipe']} ({b['cost/ratio_vs_fp32_teacher']:.2f}×, top-1 {b['heldout/top1_agreement']:.3f})"
    sets = list((point["report"].get("heldout_rows") or {}).keys())
    parts = []
    for i, held in enumerate(sets):
        diff = paired(point, rival, held)
        if diff is not None:
            parts.append(f"{'test split' if i == 0 else held} {_diff_text(diff)}")
    if not parts:  # reports without per-document sums: the point estimates only
        verdict = (
            "beats" if point["student"]["heldout/top1_agreement"] > b["heldout/top1_agreement"] else "does not beat"
        )
        return f"{text} ({verdict} it; no per-document scores to pair)"
    return f"{text}: " + "; ".join(parts)


def versus_ptq(report: str | Path, baselines: str | Path | None, label: str) -> str:
    """The line a run ends with: its student against the PTQ baseline of its size (:func:`ptq_verdict`).

    ``baselines`` is the folder of baseline reports (``python -m bench.baselines``); only those scored on the
    run's teacher and held-out data count, and the line says so when there are none.
    """
    point = load_point(Path(report))
    point["label"] = label
    rows = baseline_points(baselines, point)
    line = ptq_verdict(point, rows) if rows else None
    if line is None:
        return (
            f"{label}: no PTQ baseline was measured on this teacher and held-out data under {baselines}; "
            "python -m bench.baselines measures them"
        )
    return "versus PTQ: " + line.replace("**", "")


def _size_ratio(metrics: dict[str, float]) -> float:
    """The disk ratio against the fp32 teacher; older reports without it fall back to the memory ratio."""
    return metrics.get("cost/ratio_vs_fp32_teacher", metrics.get("cost/compression_ratio", float("nan")))


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
        shown = [p for p in points if key in p["student"]]
        xs = [_size_ratio(p["student"]) for p in shown]
        ys = [p["student"][key] for p in shown]
        ax.scatter(xs, ys, marker="o", s=40, label="student")
        for x, y, p in zip(xs, ys, shown, strict=True):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.scatter([1.0], [t.get(key, 1.0)], marker="*", s=180, color="tab:red", label="teacher")
        ax.axvline(cliff, linestyle="--", color="grey", label=f"guard: {cliff:g}× compression")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("compression ratio vs fp32 teacher (bytes on disk)")
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


def summarize(
    roots: Sequence[str | Path], out_dir: str | Path, baselines: str | Path | None = None
) -> tuple[Path, Path] | None:
    """Write ``sweep_report.md`` and ``quality_vs_size.png`` for the reports under ``roots`` into ``out_dir``.

    The baseline reports under ``baselines`` that were measured against the same teacher on the same data
    (:func:`same_evaluation`) are added as rows, so every point stands next to its alternatives.
    Returns None (and logs why) when there is no report to combine.
    """
    reports = find_reports(roots)
    if not reports:
        log.warning("no report.json under %s: nothing to combine (was eval.enabled=false?)", list(map(str, roots)))
        return None
    points = [p for p in map(load_point, reports) if not p["run"].get("baseline")]
    if not points:
        log.warning("only baseline reports under %s: nothing to combine", list(map(str, roots)))
        return None
    label_points(points)
    extra = baseline_points(baselines, points[0])
    if baselines is not None and not extra:
        log.info("no baseline report under %s matches these runs' teacher and held-out data", baselines)
    points = extra + points
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_quality_vs_size(points, out_dir / "quality_vs_size.png")
    md = out_dir / "sweep_report.md"
    lines = [
        "# Sweep summary",
        "",
        summary_table(points),
        "",
        "Sizes are the deployable artifact's bytes on disk; ratios compare them with the teacher in fp32 and "
        "with the file the teacher was loaded from. Bits per weight count the weight files over the parameters. "
        "Task accuracies carry bootstrap 95 % intervals. Baseline rows come first.",
        "",
        "Reports:",
        "",
        *(f"- `{p['label']}`: {p['path']}" for p in points),
        "",
    ]
    md.write_text("\n".join(lines))
    return md, plot


class SweepSummary(Callback):
    """Hydra callback: after a multirun, combine its points' reports (``conf/hydra/default.yaml``).

    Args:
        baselines: a folder of baseline reports (``bench/baselines.py``) to add as rows when they match.

    """

    def __init__(self, baselines: str | None = None) -> None:
        self.baselines = baselines

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the sweep's table and plot into ``hydra.sweep.dir``."""
        if not HydraConfig.initialized():
            # Hydra has left the per-job config by now; a user's sweep dir may still use ${hydra:...}.
            HydraConfig.instance().set_config(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        written = summarize([sweep_dir], sweep_dir, self.baselines)
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
    written = summarize(runs, cfg.out or runs[0], cfg.get("baselines"))
    if written is None:
        raise config_error("runs", runs, "no report.json found; run with eval.enabled=true")
    print(f"wrote {written[0]} and {written[1]}")
    return written


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="sweep")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    export_root()
    main()
