"""The compression report: teacher vs student on every metric, what was changed, and a degradation guard.

``report.json`` and ``report.md`` go into the run directory, with ``training_curves.png`` and
``quality_vs_size.png``. The guard raises flags (and ``evaluate.py fail_on_degradation=true`` exits non-zero)
when the compression ratio exceeds a limit, when task accuracy falls below a fraction of the
teacher's, or when perplexity looks stable while task accuracy dropped ("perplexity lies").
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

HIGHER_IS_BETTER = {"top1_agreement", "acc", "acc_norm", "exact_match", "token_agreement", "tokens_per_s"}


def _higher_is_better(metric: str) -> bool | None:
    leaf = metric.rsplit("/", 1)[-1]
    if leaf in HIGHER_IS_BETTER:
        return True
    if leaf in {"ppl", "kl_to_teacher"}:
        return False
    return None


def compare(teacher: Mapping[str, float], student: Mapping[str, float]) -> list[dict[str, Any]]:
    """Rows of (metric, teacher, student, absolute delta, relative delta); a side may lack a metric (None)."""
    rows = []
    for metric in [*teacher, *(k for k in student if k not in teacher)]:
        t, s = teacher.get(metric), student.get(metric)
        if t is None and s is None:
            continue
        delta = None if t is None or s is None else float(s) - float(t)
        rel = None if delta is None or not t else delta / abs(float(t))
        rows.append(
            {
                "metric": metric,
                "teacher": t,
                "student": s,
                "delta": delta,
                "rel_delta": rel,
                "higher_is_better": _higher_is_better(metric),
            }
        )
    return rows


def degradation_flags(
    teacher: Mapping[str, float],
    student: Mapping[str, float],
    *,
    max_compression_ratio: float = 8.0,
    min_task_fraction: float = 0.9,
    ppl_stable_rel: float = 0.1,
    task_drop_abs: float = 0.05,
) -> list[dict[str, Any]]:
    """The guard: each flag names what tripped and the numbers behind it."""
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
    task_keys = [k for k in teacher if k.startswith("task/") and k.endswith("/acc") and k in student]
    for k in task_keys:
        if teacher[k] > 0 and student[k] < min_task_fraction * teacher[k]:
            flags.append(
                {
                    "flag": "task_accuracy",
                    "metric": k,
                    "value": student[k],
                    "teacher": teacher[k],
                    "limit": min_task_fraction,
                    "message": f"{k}: {student[k]:.3f} < {min_task_fraction} × teacher's {teacher[k]:.3f}",
                }
            )
    if task_keys and "heldout/ppl" in teacher and "heldout/ppl" in student:
        ppl_rel = (student["heldout/ppl"] - teacher["heldout/ppl"]) / teacher["heldout/ppl"]
        drop = sum(teacher[k] - student[k] for k in task_keys) / len(task_keys)
        if ppl_rel <= ppl_stable_rel and drop >= task_drop_abs:
            flags.append(
                {
                    "flag": "perplexity_lies",
                    "ppl_rel_change": ppl_rel,
                    "task_drop": drop,
                    "message": f"perplexity within {100 * ppl_stable_rel:.0f}% of the teacher's but task "
                    f"accuracy down {drop:.3f} on average",
                }
            )
    return flags


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


def to_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report."""
    lines = [
        f"# Compression report ({report['created']})",
        "",
        f"Baseline: `{report['models']['baseline']}`; compressed: `{report['models']['compressed']}`.",
        "",
        "| metric | teacher | student | Δ | Δ % |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["comparison"]:
        rel = None if r["rel_delta"] is None else 100 * r["rel_delta"]
        lines.append(
            f"| {r['metric']} | {_fmt(r['teacher'])} | {_fmt(r['student'])} | {_fmt(r['delta'])} | {_fmt(rel)} |"
        )
    lines += ["", "## Modifications, in the order applied", ""]
    for i, m in enumerate(report["modifications"], 1):
        lines.append(f"{i}. **{m['kind']}**: `{json.dumps(m.get('config', {}), default=str)}`")
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


def write_report(report: Mapping[str, Any], run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    js, md = run_dir / "report.json", run_dir / "report.md"
    js.write_text(json.dumps(report, indent=2, default=str))
    md.write_text(to_markdown(report))
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
    fig.savefig(run_dir / "quality_vs_size.png", dpi=100)
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
