"""The compression report: teacher vs student on every metric, what was changed, and a degradation guard.

``report.json`` and ``report.md`` go into the run directory, with ``training_curves.png`` and
``quality_vs_size.png``. The guard raises flags (and ``evaluate.py fail_on_degradation=true`` exits non-zero)
when the compression ratio exceeds a limit, when task accuracy falls below a fraction of the
teacher's, when perplexity looks stable while task accuracy dropped ("perplexity lies"), or when the
student lost much more of the teacher's accuracy on rare tokens than on common ones ("long tail").
Task comparisons use the metrics' 95 % intervals (``<metric>_ci_low`` / ``<metric>_ci_high``) when the
report has them, and the point estimates otherwise.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from distill.compress.describe import short
from distill.compress.stages import registry
from distill.eval.heldout import MIN_DOC_TOKENS, TAIL_BUCKETS
from distill.runtime.files import atomic_file, atomic_write_text

HIGHER_IS_BETTER = {
    "top1_agreement",
    "top1_agreement_min",
    "top1_agreement_p10",
    "top1_agreement_median",
    "accuracy",
    "acc",
    "acc_norm",
    "exact_match",
    "token_agreement",
    "tokens_per_s",
}
CI_SUFFIXES = ("_ci_low", "_ci_high")


def _higher_is_better(metric: str) -> bool | None:
    leaf = metric.rsplit("/", 1)[-1]
    if leaf in HIGHER_IS_BETTER:
        return True
    if leaf in {"ppl", "kl_to_teacher"}:
        return False
    return None  # counts (tokens, n), interval bounds, sizes: no better direction


def _ci_base(metric: str) -> str | None:
    """The metric an interval bound belongs to (``task/x/acc`` for ``task/x/acc_ci_low``), else None."""
    for suffix in CI_SUFFIXES:
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return None


def interval(side: Mapping[str, float], metric: str) -> tuple[float, float] | None:
    """The 95 % interval of ``metric`` on one side, or None when the report has no interval for it."""
    lo, hi = side.get(f"{metric}_ci_low"), side.get(f"{metric}_ci_high")
    return None if lo is None or hi is None else (float(lo), float(hi))


def compare(teacher: Mapping[str, float], student: Mapping[str, float]) -> list[dict[str, Any]]:
    """Rows of (metric, teacher, student, absolute delta, relative delta); a side may lack a metric (None).

    Interval bounds (``<metric>_ci_low`` / ``_ci_high``) get no rows of their own: they go into their
    metric's row as ``teacher_ci`` / ``student_ci`` (``[low, high]`` or None), since a delta of bounds means
    nothing.
    """
    rows = []
    for metric in [*teacher, *(k for k in student if k not in teacher)]:
        base = _ci_base(metric)
        if base is not None and (base in teacher or base in student):
            continue
        t, s = teacher.get(metric), student.get(metric)
        if t is None and s is None:
            continue
        delta = None if t is None or s is None else float(s) - float(t)
        rel = None if delta is None or not t else delta / abs(float(t))
        row = {
            "metric": metric,
            "teacher": t,
            "student": s,
            "delta": delta,
            "rel_delta": rel,
            "higher_is_better": _higher_is_better(metric),
        }
        t_ci, s_ci = interval(teacher, metric), interval(student, metric)
        if t_ci or s_ci:
            row["teacher_ci"] = list(t_ci) if t_ci else None
            row["student_ci"] = list(s_ci) if s_ci else None
        rows.append(row)
    return rows


def retention(teacher: Mapping[str, float], student: Mapping[str, float], bucket: str) -> float | None:
    """Student / teacher accuracy on one long-tail bucket; None when either is missing or the teacher's is 0."""
    t, s = teacher.get(f"tail/{bucket}/accuracy"), student.get(f"tail/{bucket}/accuracy")
    return None if t is None or s is None or t <= 0 else s / t


def degradation_flags(
    teacher: Mapping[str, float],
    student: Mapping[str, float],
    *,
    max_compression_ratio: float = 8.0,
    min_task_fraction: float = 0.9,
    ppl_stable_rel: float = 0.1,
    task_drop_abs: float = 0.05,
    max_tail_gap: float = 0.15,
) -> list[dict[str, Any]]:
    """The guard: each flag names what tripped and the numbers behind it.

    With 95 % intervals for a task metric on both sides, ``task_accuracy`` fires only when the student's
    whole interval lies below ``min_task_fraction`` × the teacher's lower bound, and ``perplexity_lies``
    counts a task's drop only when the two intervals do not overlap. Without intervals (older reports, hub
    tasks without per-sample scores) both fall back to the point estimates and their messages say so.
    ``long_tail`` fires when the student's accuracy retention (student / teacher accuracy) on common
    tokens exceeds that on rare tokens by more than ``max_tail_gap``.
    """
    flags = []
    ratio = teacher.get("cost/bytes_memory", 0) / max(student.get("cost/bytes_memory", 0), 1)
    if ratio > max_compression_ratio:
        flags.append(
            {
                "flag": "compression_ratio",
                "value": ratio,
                "limit": max_compression_ratio,
                "message": f"compressed {ratio:.1f}× (> {max_compression_ratio}×): past the usual quality cliff",
            }
        )
    # Only the accuracies themselves: their `_ci_low` / `_ci_high` / `n` companions end otherwise.
    task_keys = [k for k in teacher if k.startswith("task/") and k.endswith("/acc") and k in student]
    flags += [f for k in task_keys if (f := _task_flag(k, teacher, student, min_task_fraction))]
    if task_keys and "heldout/ppl" in teacher and "heldout/ppl" in student:
        flag = _perplexity_lies(task_keys, teacher, student, ppl_stable_rel, task_drop_abs)
        if flag:
            flags.append(flag)
    r_common, r_rare = retention(teacher, student, "common"), retention(teacher, student, "rare")
    if r_common is not None and r_rare is not None and r_common - r_rare > max_tail_gap:
        flags.append(
            {
                "flag": "long_tail",
                "retention_common": r_common,
                "retention_rare": r_rare,
                "limit": max_tail_gap,
                "message": f"the student keeps {r_rare:.3f} of the teacher's accuracy on rare tokens but "
                f"{r_common:.3f} on common ones (gap {r_common - r_rare:.3f} > {max_tail_gap})",
            }
        )
    return flags


def _task_flag(
    k: str, teacher: Mapping[str, float], student: Mapping[str, float], fraction: float
) -> dict[str, Any] | None:
    """The ``task_accuracy`` flag of one task metric, by intervals when both sides have them, else by points."""
    t_ci, s_ci = interval(teacher, k), interval(student, k)
    flag = {"flag": "task_accuracy", "metric": k, "value": student[k], "teacher": teacher[k], "limit": fraction}
    if t_ci and s_ci:
        if s_ci[1] < fraction * t_ci[0]:
            return {
                **flag,
                "basis": "intervals",
                "student_ci": list(s_ci),
                "teacher_ci": list(t_ci),
                "message": f"{k}: student's 95% interval [{s_ci[0]:.3f}, {s_ci[1]:.3f}] lies below {fraction} × "
                f"the teacher's lower bound (teacher [{t_ci[0]:.3f}, {t_ci[1]:.3f}])",
            }
        return None
    if teacher[k] > 0 and student[k] < fraction * teacher[k]:
        return {
            **flag,
            "basis": "points",
            "message": f"{k}: {student[k]:.3f} < {fraction} × teacher's {teacher[k]:.3f} "
            "(point estimates: the report has no intervals for this task)",
        }
    return None


def _perplexity_lies(
    task_keys: Sequence[str],
    teacher: Mapping[str, float],
    student: Mapping[str, float],
    ppl_stable_rel: float,
    task_drop_abs: float,
) -> dict[str, Any] | None:
    """The "perplexity lies" flag: perplexity close to the teacher's while task accuracy dropped on average."""
    ppl_rel = (student["heldout/ppl"] - teacher["heldout/ppl"]) / teacher["heldout/ppl"]
    drops, by_points = [], []
    for k in task_keys:
        t_ci, s_ci = interval(teacher, k), interval(student, k)
        if t_ci and s_ci:
            # Overlapping intervals: the drop may be sampling noise, so it counts as none.
            drops.append(teacher[k] - student[k] if s_ci[1] < t_ci[0] else 0.0)
        else:
            drops.append(teacher[k] - student[k])
            by_points.append(k)
    drop = sum(drops) / len(drops)
    if ppl_rel > ppl_stable_rel or drop < task_drop_abs:
        return None
    basis = (
        "counting only drops whose 95% intervals separate"
        if not by_points
        else f"point estimates for {', '.join(by_points)} (no intervals)"
    )
    return {
        "flag": "perplexity_lies",
        "ppl_rel_change": ppl_rel,
        "task_drop": drop,
        "message": f"perplexity within {100 * ppl_stable_rel:.0f}% of the teacher's but task "
        f"accuracy down {drop:.3f} on average ({basis})",
    }


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("distill", "torch", "transformers", "lightning", "torchao", "lm_eval", "datasets"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, stable hash of the resolved config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _target(config: Mapping[str, Any]) -> str | None:
    """The class or function a Hydra node builds, without its module path."""
    target = config.get("_target_")
    return str(target).rsplit(".", 1)[-1] if target else None


def _settings(config: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    """``key=value`` for the set (non-None) settings of a node, lists and dicts by their size."""
    return ", ".join(
        f"{k}={short(v)}" for k, v in config.items() if v is not None and k != "_target_" and k not in skip
    )


def _distillation(config: Mapping[str, Any]) -> str:
    teacher, student = config.get("teacher") or {}, config.get("student") or {}
    objective, optimizer = config.get("objective") or {}, config.get("optimizer") or {}
    name = teacher.get("name") or teacher.get("path") or teacher.get("package") or _target(teacher) or "?"
    target = str(student.get("_target_") or "?").split(".")
    # Student builders are module-level ``build`` functions: the module names the recipe.
    builder = target[-2] if target[-1] == "build" and len(target) > 1 else target[-1]
    # Calibration settings only matter when from_teacher measures which layers to keep.
    unused = ("calibration_batches", "calibration_tokens") if student.get("select") == "even" else ()
    parts = [f"teacher {name} → student {builder}({_settings(student, skip=unused)})"]
    loss = f"{objective.get('loss', '?')} loss"
    knobs = [f"α={objective[k]}" for k in ("alpha",) if objective.get(k) is not None]
    knobs += [f"T={objective['temperature']}"] if objective.get("temperature") is not None else []
    hidden = objective.get("hidden") or {}
    if hidden.get("weight"):
        knobs.append(f"hidden {hidden.get('kind', 'mse')} ×{hidden['weight']}")
    parts.append(loss + (f" ({', '.join(knobs)})" if knobs else ""))
    if optimizer:
        parts.append(f"{_target(optimizer) or 'optimizer'} lr {optimizer.get('lr', '?')}")
    if config.get("steps") is not None:
        parts.append(f"{config['steps']} steps")
    return "; ".join(parts)


def _callback_prune(config: Mapping[str, Any]) -> str:
    targets = [f"{k} {short(config[k])}" for k in ("heads", "channels", "layers", "target") if config.get(k)]
    how = [f"{config.get('importance', '?')} importance", f"{config.get('schedule', '?')} schedule"]
    steps = f"steps {config.get('start_step', '?')}–{config.get('end_step', '?')}"
    if config.get("every_n_steps"):
        steps += f" every {config['every_n_steps']}"
    extras = ["bias compensation"] if config.get("bias_compensation") else []
    return f"{_target(config) or 'pruning'}: {', '.join(targets)} ({', '.join([*how, steps, *extras])})"


def _layer_selection(config: Mapping[str, Any]) -> str:
    """The teacher layers a measured from_teacher student kept, and the scores of those it dropped."""
    kept, scores = list(config.get("kept") or []), list(config.get("scores") or [])
    dropped = [i for i in range(len(scores)) if i not in kept]
    text = f"kept teacher layers {kept} of {len(scores) or '?'} by {config.get('select', '?')}"
    if dropped:
        text += " (dropped " + ", ".join(f"{i}: {scores[i]:.4g}" for i in dropped) + ")"
    if config.get("tokens"):
        text += f" on {config['tokens']} training tokens"
    return text


def summarize_modifications(modifications: Sequence[Mapping[str, Any]]) -> list[str]:
    """One readable line per modification, in order (the full records stay in report.json).

    ``distillation``, ``layer_selection``, ``callback:prune`` and each registered compression stage with a
    ``summarize`` (:class:`~distill.compress.stages.Stage`) get a summary of what changed; any other kind lists
    its set scalar settings, with lists as "N items".
    """
    stages = registry()
    state: dict[str, dict] = {}  # per stage, what its summaries carry from one change to the next (pruning's counts)
    lines = []
    for m in modifications:
        kind, config = m.get("kind", "?"), m.get("config") or {}
        if not isinstance(config, Mapping):
            text = short(config, 80)
        elif kind == "distillation":
            text = _distillation(config)
        elif kind in stages and stages[kind].summarize is not None:
            text = stages[kind].summarize(config, state.setdefault(kind, {}))
        elif kind == "callback:prune":
            text = _callback_prune(config)
        elif kind == "layer_selection":
            text = _layer_selection(config)
        else:
            name = _target(config)
            text = (f"{name}: " if name else "") + (_settings(config) or "no settings")
        lines.append(text)
    return lines


def build_report(
    teacher: Mapping[str, float],
    student: Mapping[str, float],
    modifications: list[dict[str, Any]],
    config: Mapping[str, Any],
    guard: Mapping[str, float],
    names: tuple[str, str] = ("teacher", "student"),
) -> dict[str, Any]:
    """Everything the report files hold, as one JSON-able dict."""
    flags = degradation_flags(teacher, student, **guard)
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "models": {"baseline": names[0], "compressed": names[1]},
        "metrics": {"teacher": dict(teacher), "student": dict(student)},
        "comparison": compare(teacher, student),
        "modifications": modifications,
        "degradation": {"flags": flags, "degraded": bool(flags), "settings": dict(guard)},
        "versions": versions(),
        "config_hash": config_hash(config),
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _with_ci(x: Any, ci: Sequence[float] | None) -> str:
    """A value and its 95 % interval, ``0.412 [0.371, 0.455]``; the value alone without one."""
    return _fmt(x) if not ci else f"{_fmt(x)} [{ci[0]:.3g}, {ci[1]:.3g}]"


def _cell(text: str) -> str:
    """Plain text shown as is in markdown: no emphasis from ``*embed*`` globs, no broken table cells."""
    return "".join("\\" + c if c in "\\`*_[]<>|#" else c for c in text)


def _tail_table(report: Mapping[str, Any]) -> list[str]:
    teacher, student = report["metrics"]["teacher"], report["metrics"]["student"]
    if not any(f"tail/{b}/tokens" in student for b in TAIL_BUCKETS):
        return []
    lines = [
        "",
        "## Long tail",
        "",
        "Held-out tokens bucketed by how often the label token occurs in the training split: ranked by count, "
        "`common` are the most frequent ids that together make up the first third of the training tokens, "
        "`middle` the next third, `rare` the last third and ids never seen in training. Retention is student "
        "accuracy / teacher accuracy.",
        "",
        "| bucket | tokens | teacher acc | student acc | retention | student top-1 agreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in reversed(TAIL_BUCKETS):
        tokens = student.get(f"tail/{b}/tokens")
        lines.append(
            f"| {b} | {_fmt(None if tokens is None else int(tokens))} | {_fmt(teacher.get(f'tail/{b}/accuracy'))} "
            f"| {_fmt(student.get(f'tail/{b}/accuracy'))} | {_fmt(retention(teacher, student, b))} "
            f"| {_fmt(student.get(f'tail/{b}/top1_agreement'))} |"
        )
    return lines


def _sets_table(report: Mapping[str, Any]) -> list[str]:
    """One row per held-out set: what it is, how much was scored, and the student against the teacher on it."""
    sets = report.get("heldout_sets") or {}
    if not sets:
        return []
    teacher, student = report["metrics"]["teacher"], report["metrics"]["student"]
    lines = [
        "",
        "## Held-out sets",
        "",
        "Each set scored separately; brackets are 95 % intervals that resample whole documents.",
        "",
        "| set | source | documents | tokens | teacher ppl | student ppl | KL to teacher | top-1 agreement |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, about in sets.items():
        g = about.get("metrics", "heldout")

        def ci(side: Mapping[str, float], metric: str, g: str = g) -> str:
            return _with_ci(side.get(f"{g}/{metric}"), interval(side, f"{g}/{metric}"))

        lines.append(
            f"| {name} | {_cell(str(about.get('source', '')))} | {_fmt(about.get('documents_scored'))} "
            f"| {_fmt(about.get('tokens_scored'))} | {_fmt(teacher.get(f'{g}/ppl'))} | {ci(student, 'ppl')} "
            f"| {ci(student, 'kl_to_teacher')} | {ci(student, 'top1_agreement')} |"
        )
    return lines


def _documents_table(report: Mapping[str, Any], worst: int = 5) -> list[str]:
    docs = report.get("documents") or []
    if not docs:
        return []
    long_enough = [d for d in docs if d["tokens"] >= MIN_DOC_TOKENS] or list(docs)
    ranked = sorted(long_enough, key=lambda d: (d["student_top1_agreement"], d["index"]))[:worst]
    s = report["metrics"]["student"]
    spread = (
        f"student top-1 agreement over the {int(s['docs/n'])} with ≥ {MIN_DOC_TOKENS} scored tokens: "
        f"min {_fmt(s['docs/top1_agreement_min'])}, 10th percentile {_fmt(s['docs/top1_agreement_p10'])}, "
        f"median {_fmt(s['docs/top1_agreement_median'])}"
        if "docs/n" in s
        else f"none has {MIN_DOC_TOKENS} scored tokens"
    )
    lines = [
        "",
        "## Held-out documents",
        "",
        f"Documents scored: {len(docs)}; {spread}. The {len(ranked)} with the lowest agreement:",
        "",
        "| doc | tokens | student top-1 agreement | student acc | teacher acc | starts with |",
        "| ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for d in ranked:
        start = _cell(d["text"]) if d.get("text") else f"document {d['index']}"
        lines.append(
            f"| {d['index']} | {d['tokens']} | {_fmt(d['student_top1_agreement'])} | {_fmt(d['student_accuracy'])} "
            f"| {_fmt(d['teacher_accuracy'])} | {start} |"
        )
    return lines


def to_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report: metrics (with 95 % intervals where measured), long tail, documents, changes."""
    lines = [
        f"# Compression report ({report['created']})",
        "",
        f"Baseline: `{report['models']['baseline']}`; compressed: `{report['models']['compressed']}`.",
        "",
        "| metric | teacher | student | Δ | Δ % |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["comparison"]:
        if r["metric"].startswith("tail/"):  # in the long-tail table below
            continue
        rel = None if r["rel_delta"] is None else 100 * r["rel_delta"]
        teacher, student = _with_ci(r["teacher"], r.get("teacher_ci")), _with_ci(r["student"], r.get("student_ci"))
        lines.append(f"| {r['metric']} | {teacher} | {student} | {_fmt(r['delta'])} | {_fmt(rel)} |")
    if any(r.get("teacher_ci") or r.get("student_ci") for r in report["comparison"]):
        lines += ["", "Brackets: 95 % bootstrap intervals."]
    lines += _sets_table(report)
    lines += _tail_table(report)
    lines += _documents_table(report)
    lines += ["", "## Modifications, in the order applied", ""]
    summaries = summarize_modifications(report["modifications"])
    lines += [
        f"{i}. **{m['kind']}**: {text}"
        for i, (m, text) in enumerate(zip(report["modifications"], summaries, strict=True), 1)
    ]
    if report["modifications"]:
        lines += ["", "The full records are in report.json."]
    if report.get("llama_cpp"):
        lines += _llama_cpp_lines(report)
    flags = report["degradation"]["flags"]
    lines += ["", "## Degradation guard", "", "No flags." if not flags else ""]
    lines += [f"- ⚠ **{f['flag']}**: {f['message']}" for f in flags]
    if report.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in report["notes"])]
    run = report.get("run") or {}
    if run:
        lines += ["", "## Run", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in run.items() if v is not None]
    lines += ["", "## Provenance", "", f"- config hash: `{report['config_hash']}`"]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]
    return "\n".join(lines) + "\n"


def _llama_cpp_lines(report: Mapping[str, Any]) -> list[str]:
    """llama.cpp's score of the GGUF file (``eval.llama_cpp_bin``), beside torch's on the same windows."""
    from distill.eval.llama_cpp import table

    result = report["llama_cpp"]
    sets = ", ".join(f"{k}: {v['chunks']} chunks of {v['n_ctx']} tokens" for k, v in result["sets"].items())
    return [
        "",
        "## llama.cpp's own score",
        "",
        f"`llama-perplexity --kl-divergence` on the GGUF file against {result['base']} ({sets}; it scores the second "
        "half of each chunk), and torch on the same tokens and windows. Same-top is top-1 agreement.",
        "",
        table(result),
    ]


def write_report(report: Mapping[str, Any], run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``run_dir``, each whole or not at all (a full disk, a kill)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    js, md = run_dir / "report.json", run_dir / "report.md"
    texts = json.dumps(report, indent=2, default=str), to_markdown(report)  # both built before either is written
    atomic_write_text(js, texts[0])
    atomic_write_text(md, texts[1])
    return js, md


def _read_csv_metrics(run_dir: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for f in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with f.open() as fh:
            rows += list(csv.DictReader(fh))
    return rows


def plot_run(run_dir: str | Path, teacher: Mapping[str, float], student: Mapping[str, float]) -> list[Path]:
    """Training curves and quality vs size (student over the run's validations, teacher marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = _read_csv_metrics(run_dir)
    written = []
    if rows:
        written.append(_plot_curves(plt, rows, run_dir / "training_curves.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [
        (float(r["student/params"]), float(r["val/ppl"])) for r in rows if r.get("student/params") and r.get("val/ppl")
    ]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="o", label="student during training (val)")
    if "cost/params" in student and "heldout/ppl" in student:
        ax.scatter([student["cost/params"]], [student["heldout/ppl"]], marker="s", s=60, label="student (final)")
    if "cost/params" in teacher and "heldout/ppl" in teacher:
        ax.scatter([teacher["cost/params"]], [teacher["heldout/ppl"]], marker="*", s=150, label="teacher")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out perplexity")
    ax.legend()
    ax.set_title("quality vs size")
    fig.tight_layout()
    with atomic_file(run_dir / "quality_vs_size.png") as tmp:  # a killed run leaves the old plot or none, whole
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    written.append(run_dir / "quality_vs_size.png")
    return written


def _plot_curves(plt: Any, rows: list[dict[str, str]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train/loss", "val/loss"):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="." if key.startswith("val") else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("training curves")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
