"""The headline table: one row per conf/experiment recipe on the embedded default, the teacher first.

    python -m bench.headline run=true     # run every CPU recipe (skips those with a finished report), then write
    python -m bench.headline              # only regenerate the tables from the existing reports

The settings are Hydra overrides of ``conf/bench/headline.yaml``.
Each recipe runs as ``python train.py experiment=<recipe> run_name=headline_<recipe>``, so its report is
``logs/train/runs/headline_<recipe>/report.json``; ``run=true`` copies each finished report (json and md) to
``bench/results/headline_runs/headline_<recipe>/``, which is committed, and the table is always built from
there. Every figure in the table is read from those reports (distill/eval/sweep.py's reader): nothing is typed
by hand. The table replaces the text between the
``<!-- headline:start -->`` and ``<!-- headline:end -->`` markers in README.md and bench/README.md, and
bench/results/headline.md, bench/results/headline_quality_vs_size.png are written next to it.
``llama3_8b_to_1b_slurm`` is a GPU-cluster recipe and is not part of the CPU table.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bench import ROOT
from bench.studies.recipe import run_dir, run_recipe
from distill.config import config_error, exit_on_config_error
from distill.eval.sweep import (
    baseline_points,
    evaluation_note,
    load_point,
    named_run_folders,
    plot_quality_vs_size,
    ptq_verdict,
    summary_table,
)

START, END = "<!-- headline:start -->", "<!-- headline:end -->"
# The README's paragraph on what `python train.py` gives, from the default run's committed report.
DEFAULT_START, DEFAULT_END = "<!-- default-run:start -->", "<!-- default-run:end -->"


def replace_between_markers(path: Path, block: str, start: str = START, end: str = END) -> None:
    """Put ``block`` between the markers ``start`` and ``end`` of ``path`` (appending the markers if absent)."""
    text = path.read_text() if path.exists() else ""
    new = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + new + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run(cfg: DictConfig) -> None:
    """Run the recipes first when ``cfg.run`` is set, then tabulate them (``conf/bench/headline.yaml``)."""
    recipes = [cfg.recipes] if isinstance(cfg.recipes, str) else list(cfg.recipes)  # one name or a list
    reports = Path(cfg.reports)
    if cfg.run:
        runs_root = Path(cfg.runs_root)
        for recipe in recipes:
            extra = (cfg.get("overrides") or {}).get(recipe) or []
            run_recipe(recipe, runs_root, cfg.force, [str(o) for o in extra])
            keep = run_dir(reports, recipe)
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("report.json", "report.md"):
                shutil.copyfile(run_dir(runs_root, recipe) / name, keep / name)
    missing = [r for r in recipes if not (run_dir(reports, r) / "report.json").exists()]
    if missing:
        raise config_error("recipes", missing, f"no report under {reports}; run with run=true")
    longer = named_run_folders(cfg.get("longer_runs"), "longer_runs")
    readmes = [cfg.readmes] if isinstance(cfg.readmes, str) else list(cfg.readmes)
    if cfg.get("default_run") and cfg.default_run not in longer:  # refused before anything is rewritten
        raise config_error("default_run", cfg.default_run, f"not one of longer_runs ({', '.join(longer)})")
    print(tabulate(recipes, reports, Path(cfg.results_dir), [Path(r) for r in readmes], longer))
    if cfg.get("default_run"):
        block = default_run_block(load_point(longer[cfg.default_run] / "report.json"), reports)
        replace_between_markers(Path(readmes[0]), block, DEFAULT_START, DEFAULT_END)
        print(block)


def _set_score(s: dict[str, float], key: str) -> str:
    low, high = s.get(f"{key}_ci_low"), s.get(f"{key}_ci_high")
    return f"{s[key]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")


def default_run_block(point: dict, reports: Path) -> str:
    """What ``python train.py`` gave on this machine, and the best PTQ file of its size beside it, from reports."""
    s, run = point["student"], point["run"]
    sets = list((point["report"].get("heldout_rows") or {}).keys())
    other = next((k for k in sets[1:] if f"heldout_{k}/top1_agreement" in s), None)
    ratio = s["cost/ratio_vs_fp32_teacher"]
    text = (
        f"On this repository's build machine ({os.cpu_count()}-core {platform.machine()} CPU) the default run trained "
        f"{run['steps']} steps in {run['train_seconds'] / 60:.0f} minutes of `trainer.fit` and wrote a GGUF file of "
        f"{s['cost/bytes_disk'] / 1e6:.1f} MB (1/{ratio:.2f} of the fp32 teacher). Its top-1 agreement with the "
        f"teacher: **{_set_score(s, 'heldout/top1_agreement')}** on the test split"
    )
    if other:
        text += f", {_set_score(s, f'heldout_{other}/top1_agreement')} on the {other} set"
    ptq = [
        b
        for b in baseline_points(reports, point)
        if str(b["run"].get("recipe", "")).startswith("ptq_")
        and b["student"].get("cost/ratio_vs_fp32_teacher", 0) >= ratio * 0.98
    ]
    if ptq:
        best = max(ptq, key=lambda b: b["student"]["heldout/top1_agreement"])
        b = best["student"]
        text += (
            f". The best post-training file of about that size, {best['run']['recipe']} "
            f"({b['cost/bytes_disk'] / 1e6:.1f} MB), scores {_set_score(b, 'heldout/top1_agreement')}"
        )
        if other and f"heldout_{other}/top1_agreement" in b:
            text += f" and {_set_score(b, f'heldout_{other}/top1_agreement')}"
    return text + ". A faster machine fits more steps into the same 15 minutes."


def ptq_verdicts(points: list[dict], baselines: list[dict]) -> list[str]:
    """One list item per recipe: :func:`distill.eval.sweep.ptq_verdict` against the PTQ baselines."""
    return [f"- {line}" for p in points if (line := ptq_verdict(p, baselines)) is not None]


def tabulate(
    recipes: list[str], reports: Path, results: Path, readmes: list[Path], longer: dict[str, Path] | None = None
) -> str:
    """Write the table of ``recipes`` into headline.md and between the markers of ``readmes``; returns it.

    Baseline reports under ``reports`` (``python -m bench.baselines``) measured on the same teacher and data
    come first, so every recipe stands next to its alternatives. ``longer`` maps a row label to the folder of a
    run at a longer budget (its report.json); those rows follow the equal-step ones.
    """
    labelled = [(r, run_dir(reports, r) / "report.json") for r in recipes]
    labelled += [(label, folder / "report.json") for label, folder in (longer or {}).items()]
    points = [load_point(path) for _, path in labelled]
    for (label, _), p in zip(labelled, points, strict=True):
        p["label"] = label
    baselines = baseline_points(reports, points[0])
    table = summary_table(baselines + points)
    plot = plot_quality_vs_size(
        [b for b in baselines if b["student"]] + points, results / "headline_quality_vs_size.png"
    )
    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU"
    steps = ", ".join(f"{p['label']} {p['run'].get('steps')}" for p in points)
    verdicts = ptq_verdicts(points, baselines)
    longer_note = (
        f"; the rows {', '.join(longer)} are longer runs of a recipe, read from "
        + ", ".join(f"`{_shown(folder)}`" for folder in longer.values())
        if longer
        else ""
    )
    block = "\n".join(
        [
            table,
            "",
            f"Regenerated by `python -m bench.headline` on {dt.date.today().isoformat()} from the reports in "
            f"`bench/results/headline_runs/`, written by `python -m bench.baselines` (baseline rows) and "
            f"`python -m bench.headline run=true` ({cpu}; steps per run: {steps}){longer_note}. Disk is the deployable "
            "artifact (the smallest verified export of the run: plain, compact or quantized safetensors with its "
            "config and tokenizer, or a GGUF file that reloads as the student; the GGUF file for the teacher as "
            "shipped); the ratios divide the fp32 teacher "
            "(4 bytes per parameter) and the shipped GGUF by it. Bits per weight count the weight files over the "
            "parameters. Held-out scores: " + evaluation_note(points[0]) + "; brackets are 95 % intervals that "
            "resample documents. Task accuracies carry bootstrap 95 % intervals. Tokens/s "
            "is batch-1 greedy generation (median of the run's probes). Train time is `trainer.fit` wall-clock. "
            "Plot: [{link}]({link}).",
            *(
                [
                    "",
                    "Against the best PTQ row at equal or smaller size: top-1 agreement, the difference paired over "
                    'the documents both scored, with its 95 % interval ("ties" when it holds 0):',
                    "",
                    *verdicts,
                ]
                if verdicts
                else []
            ),
        ]
    )
    (results / "headline.md").write_text("# Headline\n\n" + block.format(link=plot.name) + "\n")
    for readme in readmes:
        link = Path(os.path.relpath(plot, readme.parent)).as_posix()
        replace_between_markers(readme, block.format(link=link))
    return block.format(link=plot)


def _shown(folder: Path) -> str:
    """``folder`` relative to the repository when it lies inside it (how the committed table names it)."""
    return folder.relative_to(ROOT).as_posix() if folder.is_relative_to(ROOT) else folder.as_posix()


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/headline")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    # The repository, wherever the script is started from: the reports, tables and Hydra's record live there.
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
