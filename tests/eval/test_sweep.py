"""The sweep summary's command line: the reports of finished runs combined into one table and one plot."""

from __future__ import annotations

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
