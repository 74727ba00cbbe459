"""The sweep summary's command line: the reports of finished runs combined into one table and one plot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distill.config import ConfigError
from distill.eval.sweep import run

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "results" / "sweep_prune"  # three real runs' reports (a prune sweep)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """A copy of the benchmark sweep's reports, without the summary written from them."""
    shutil.copytree(BENCH, tmp_path / "sweep", ignore=shutil.ignore_patterns("*.png", "sweep_report.md"))
    return tmp_path / "sweep"


def _rows(markdown: str) -> dict[str, str]:
    """Table rows by their first cell (the header and the separator left out)."""
    lines = markdown.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| model", "| ---"))]
    return {row.split(" | ")[0].removeprefix("| "): row for row in rows}


def _sweep(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill.eval.sweep", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
        capture_output=True,
        timeout=300,
    )


def test_sweep_cli_combines_chosen_runs(runs, tmp_path):
    out = tmp_path / "comparison"
    proc = _sweep([f"runs=[{runs / '0'},{runs / '2'}]", f"out={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(f"wrote {out / 'sweep_report.md'} and {out / 'quality_vs_size.png'}")
    rows, bench = _rows((out / "sweep_report.md").read_text()), _rows((BENCH / "sweep_report.md").read_text())
    # Two points, labelled by the override that tells them apart; the numbers are the runs' own.
    points = ["callbacks.prune.target=0.25", "callbacks.prune.target=0.75"]
    assert [k for k in rows if not k.startswith("teacher")] == points
    for label in points:
        assert rows[label] == bench[label]
    assert (out / "quality_vs_size.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "logs" / "sweep" / "runs").glob("*/.hydra/overrides.yaml"))  # Hydra's record of the call

    proc = _sweep([f"runs=[{tmp_path / 'nope'},{runs}]"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: runs=[{str(tmp_path / 'nope')!r}]: no such folder; pass run directories or a multirun folder"
    )


def test_sweep_of_one_folder_writes_into_it(runs, tmp_path, capsys):
    md, plot = run(OmegaConf.create({"runs": str(runs), "out": None}))  # one path: every report below it
    assert (md, plot) == (runs / "sweep_report.md", runs / "quality_vs_size.png")
    assert len(_rows(md.read_text())) == 4  # the teacher and three points
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"runs=\[.*empty'\]: no report.json found; run with eval.enabled=true"):
        run(OmegaConf.create({"runs": [str(tmp_path / "empty")], "out": None}))
    with pytest.raises(ConfigError, match=r"runs=None: required: python -m distill.eval.sweep"):
        run(OmegaConf.create({"runs": "???", "out": None}))


def _report(folder: Path, teacher_ppl: float, student: dict, run: dict, teacher: str = "T") -> Path:
    folder.mkdir(parents=True)
    report = {
        "models": {"baseline": teacher, "compressed": "student"},
        "metrics": {"teacher": {"heldout/ppl": teacher_ppl, "cost/bytes_memory": 400.0}, "student": student},
        "degradation": {"flags": [], "settings": {}},
        "run": run,
    }
    (folder / "report.json").write_text(__import__("json").dumps(report))
    return folder


def test_baseline_rows_join_only_runs_scored_on_the_same_teacher_and_data(tmp_path):
    student = {
        "heldout/ppl": 30.0,
        "heldout/top1_agreement": 0.5,
        "cost/bytes_disk": 50e6,
        "cost/bytes_memory": 60e6,
        "cost/ratio_vs_fp32_teacher": 8.0,
        "task/x/acc": 0.4,
        "task/x/acc_ci_low": 0.35,
        "task/x/acc_ci_high": 0.45,
    }
    runs = tmp_path / "runs"
    _report(runs / "a", 25.0, student, {"recipe": "r"})
    base = tmp_path / "base"
    _report(
        base / "baseline_ptq_int4",
        25.0,
        {**student, "heldout/top1_agreement": 0.7},
        {"recipe": "ptq_int4", "baseline": True},
    )
    _report(
        base / "baseline_other_data", 26.0, student, {"recipe": "ptq_int8", "baseline": True}
    )  # other held-out data
    _report(base / "baseline_other_teacher", 25.0, student, {"recipe": "ptq_int3", "baseline": True}, teacher="U")
    _report(base / "baseline_bnb_nf4", 0.0, {}, {"recipe": "bnb_nf4", "baseline": True, "unavailable": "no CPU kernel"})
    md, _ = run(OmegaConf.create({"runs": [str(runs)], "out": str(tmp_path / "out"), "baselines": str(base)}))
    rows = _rows(md.read_text())
    assert list(rows) == ["baseline: ptq_int4", "baseline: bnb_nf4", "r"]  # baselines first; mismatches left out
    assert "| 0.700 |" in rows["baseline: ptq_int4"] and "| 8.00× |" in rows["r"]
    assert "0.400 (0.35–0.45)" in rows["r"]  # the task accuracy with its interval
    assert "no CPU kernel" in rows["baseline: bnb_nf4"]
    header = next(line for line in md.read_text().splitlines() if line.startswith("| model"))
    assert all(row.count("|") == header.count("|") for row in rows.values())


def test_headline_verdict_compares_with_the_best_ptq_row_at_least_as_small():
    sys_path = str(ROOT / "bench")
    import sys

    sys.path.insert(0, sys_path)
    try:
        from headline import ptq_verdicts
    finally:
        sys.path.remove(sys_path)

    def point(label: str, ratio: float, agree: float, baseline: bool = False) -> dict:
        run = {"recipe": label, "baseline": baseline}
        return {
            "label": label,
            "run": run,
            "student": {"cost/ratio_vs_fp32_teacher": ratio, "heldout/top1_agreement": agree},
        }

    ptq = [point("ptq_int8", 4.0, 0.97, True), point("ptq_int4", 7.0, 0.65, True), point("ptq_int3", 9.0, 0.18, True)]
    lines = ptq_verdicts([point("small", 8.0, 0.30), point("mid", 5.0, 0.60), point("tiny", 20.0, 0.1)], ptq)
    assert "**small** (8.00×, top-1 0.300) beats ptq_int3" in lines[0]
    assert "**mid** (5.00×, top-1 0.600) does not beat ptq_int4" in lines[1]
    # Smaller than every PTQ row: set against the smallest one, which is larger.
    assert lines[2].endswith(
        "no PTQ baseline is this small; it does not beat the smallest, ptq_int3 (9.00×, top-1 0.180), which is larger."
    )
    lines = ptq_verdicts([point("tiny", 20.0, 0.5)], ptq)
    assert "; it beats the smallest, ptq_int3 (9.00×" in lines[0]
    assert ptq_verdicts([point("tiny", 20.0, 0.5)], [])[0].endswith("no PTQ baseline is this small.")


def test_a_run_ends_with_one_line_against_the_ptq_baseline_of_its_size(tmp_path):
    from distill.eval.sweep import versus_ptq

    reports = ROOT / "bench" / "results" / "headline_runs"
    line = versus_ptq(reports / "headline_distill_prune_qat4" / "report.json", reports, "distill_prune_qat4")
    # The committed baselines scored on the same teacher and held-out data; the best PTQ row at >= 4.32x.
    assert line.startswith("versus PTQ: distill_prune_qat4 (4.32×, top-1 0.213) does not beat ptq_gguf_q4_mix (7.01×")
    report = json.loads((reports / "headline_distill_prune_qat4" / "report.json").read_text())
    report["metrics"]["teacher"]["heldout/ppl"] *= 1.01  # another corpus or split: no baseline is comparable
    (tmp_path / "report.json").write_text(json.dumps(report))
    line = versus_ptq(tmp_path / "report.json", reports, "mine")
    assert line.startswith("mine: no PTQ baseline was measured on this teacher and held-out data")
    assert versus_ptq(tmp_path / "report.json", None, "mine").startswith("mine: no PTQ baseline")
