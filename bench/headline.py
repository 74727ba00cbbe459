"""The headline table: one row per conf/experiment recipe on the embedded default, the teacher first.

    python bench/headline.py --run        # run every CPU recipe (skips those with a finished report), then write
    python bench/headline.py              # only regenerate the tables from the existing reports

Each recipe runs as ``python train.py experiment=<recipe> run_name=headline_<recipe>``, so its report is
``logs/train/runs/headline_<recipe>/report.json``; ``--run`` copies each finished report (json and md) to
``bench/results/headline_runs/headline_<recipe>/``, which is committed, and the table is always built from
there. Every figure in the table is read from those reports (distill/sweep.py's reader): nothing is typed
by hand. The table replaces the text between the
``<!-- headline:start -->`` and ``<!-- headline:end -->`` markers in README.md and bench/README.md, and
bench/results/headline.md, bench/results/headline_quality_vs_size.png are written next to it.
``llama3_8b_to_1b_slurm`` is a GPU-cluster recipe and is not part of the CPU table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.eval.sweep import load_point, plot_quality_vs_size, summary_table  # noqa: E402

RECIPES = ["distill_only", "distill_prune", "distill_share", "distill_prune_qat4", "stacked_max"]
START, END = "<!-- headline:start -->", "<!-- headline:end -->"


def run_dir(runs_root: Path, recipe: str) -> Path:
    """Where ``recipe``'s headline run lives."""
    return runs_root / f"headline_{recipe}"


def run_recipe(recipe: str, runs_root: Path, force: bool) -> None:
    """Run one recipe to completion unless a finished report already exists (``--force`` starts it over)."""
    # The datasets cache and the teacher are shared, so each run's wall-clock time is its own.
    folder = run_dir(runs_root, recipe)
    if (folder / "report.json").exists() and not force:
        print(f"{recipe}: report exists, skipped (use --force to rerun)", flush=True)
        return
    if folder.exists():
        shutil.rmtree(folder)  # a half-finished or forced run starts over, so its time is one whole run
    cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={recipe}", f"run_name=headline_{recipe}"]
    cmd += ["callbacks.progress_bar=null"]
    print(f"{recipe}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"{recipe}: done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)


def replace_between_markers(path: Path, block: str) -> None:
    """Put ``block`` between the headline markers of ``path`` (appending the markers if absent)."""
    text = path.read_text() if path.exists() else ""
    new = f"{START}\n{block}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + new + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """Run (optionally) and tabulate the recipes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run the recipes that have no finished report first")
    parser.add_argument("--force", action="store_true", help="with --run: rerun every recipe from scratch")
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help="recipes to include, in table order")
    parser.add_argument("--runs-root", type=Path, default=ROOT / "logs" / "train" / "runs", help="where --run runs")
    parser.add_argument(
        "--reports", type=Path, default=ROOT / "bench" / "results" / "headline_runs", help="reports the table reads"
    )
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--readmes", type=Path, nargs="*", default=[ROOT / "README.md", ROOT / "bench" / "README.md"])
    args = parser.parse_args(argv)
    if args.run:
        for recipe in args.recipes:
            run_recipe(recipe, args.runs_root, args.force)
            keep = run_dir(args.reports, recipe)
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("report.json", "report.md"):
                shutil.copyfile(run_dir(args.runs_root, recipe) / name, keep / name)
    missing = [r for r in args.recipes if not (run_dir(args.reports, r) / "report.json").exists()]
    if missing:
        print(f"error: recipes={missing}: no report under {args.reports}; run with --run", file=sys.stderr)
        return 2
    points = [load_point(run_dir(args.reports, r) / "report.json") for r in args.recipes]
    for recipe, p in zip(args.recipes, points, strict=True):
        p["label"] = recipe
    table = summary_table(points)
    results = args.results_dir
    plot = plot_quality_vs_size(points, results / "headline_quality_vs_size.png")
    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU"
    steps = ", ".join(f"{p['label']} {p['run'].get('steps')}" for p in points)
    block = "\n".join(
        [
            table,
            "",
            f"Regenerated by `python bench/headline.py` on {dt.date.today().isoformat()} from the reports in "
            f"`bench/results/headline_runs/`, written by `python bench/headline.py --run` ({cpu}, nothing else "
            f"running; steps per run: {steps}). Memory is the student as it "
            "runs after training (real int4/int8 weights for the QAT recipes), the compression ratio's basis. "
            "Task accuracy is the mean of distill_lastword and distill_cloze accuracy. Tokens/s is greedy "
            "generation, median of the run's speed probes; the teacher's is the median over all runs. Train "
            "time is `trainer.fit` wall-clock (teacher load and evaluation not included). "
            "Plot: [{link}]({link}).",
        ]
    )
    (results / "headline.md").write_text("# Headline\n\n" + block.format(link=plot.name) + "\n")
    for readme in args.readmes:
        link = Path(os.path.relpath(plot, readme.parent)).as_posix()
        replace_between_markers(readme, block.format(link=link))
    print(block.format(link=plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
