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
BENCH = ROOT / "tests" / "fixtures" / "sweep_prune"  # three runs' reports (a prune sweep; an old evaluation)


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


@pytest.mark.slow  # a fresh interpreter; the sweep summary is built in-process by the other tests here
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


def _point(label: str, ratio: float, agree_by_doc: list[float], baseline: bool = False, key: str = "k1") -> dict:
    """A report point: per-document agreements (10 tokens each) on the test split and an English set."""
    docs = list(range(len(agree_by_doc)))
    rows = {"doc": docs, "agree": [10 * a for a in agree_by_doc], "tokens": [10.0] * len(docs)}
    mean = sum(agree_by_doc) / len(agree_by_doc)
    report = {
        "models": {"baseline": "teacher"},
        "heldout_sets": {"test": {"split": {"data_key": key}}},
        "heldout_rows": {"test": {"student": rows}, "english": {"student": rows}},
    }
    return {
        "label": label,
        "report": report,
        "run": {"recipe": label, "baseline": baseline},
        "teacher": {"heldout/ppl": 20.0},
        "student": {"cost/ratio_vs_fp32_teacher": ratio, "heldout/top1_agreement": mean},
    }


def test_the_ptq_verdict_pairs_documents_says_ties_and_names_a_slightly_larger_better_row():
    from distill.eval.sweep import ptq_verdict

    base = [0.2, 0.5, 0.8, 0.4, 0.6, 0.3, 0.7, 0.5]
    ptq = [
        _point("ptq_int8", 4.0, [min(1.0, a + 0.3) for a in base], True),
        _point("ptq_int4", 7.0, base, True),
        _point("ptq_big", 6.8, [a + 0.05 for a in base], True),  # 3 % larger and better
        _point("ptq_int3", 9.0, [a / 4 for a in base], True),
    ]
    better = ptq_verdict(_point("small", 8.0, [a + 0.02 for a in base]), ptq)
    assert "against ptq_int3 (9.00×, top-1 0.125): test split leads" in better  # the best row as small: int3
    line = ptq_verdict(_point("mid", 7.0, [a + 0.02 for a in base]), ptq)
    # Every document moves by +0.02: a paired interval excludes 0 even though the documents spread widely.
    assert "against ptq_int4 (7.00×, top-1 0.500): test split leads: +0.020 [+0.020, +0.020] over 8 documents" in line
    assert "; english leads: +0.020" in line
    assert "ptq_big, 2.9 % larger, scores higher on a held-out set" in line and "test split trails: -0.030" in line
    noisy = [a + (0.1 if i % 2 else -0.1) for i, a in enumerate(base)]
    assert "test split ties: +0.000" in ptq_verdict(_point("noisy", 7.0, noisy), ptq)
    tiny = ptq_verdict(_point("tiny", 20.0, base), ptq)
    assert "no PTQ baseline is this small; against the smallest, ptq_int3 (9.00×" in tiny and tiny.endswith("larger.")
    assert ptq_verdict(_point("tiny", 20.0, base), []).endswith("no PTQ baseline is this small.")


def test_a_slightly_larger_row_that_wins_only_out_of_domain_is_named():
    from distill.eval.sweep import ptq_verdict

    base = [0.2, 0.5, 0.8, 0.4, 0.6, 0.3]
    student = _point("qad", 7.0, [a + 0.1 for a in base])
    rival = _point("ptq_imatrix", 6.94, base, True)  # lower on the test split
    student["student"]["heldout_english/top1_agreement"] = 0.40
    rival["student"]["heldout_english/top1_agreement"] = 0.45  # higher on the English set
    same = _point("ptq_rtn", 7.0, [a - 0.1 for a in base], True)  # the same size, lower everywhere
    line = ptq_verdict(student, [rival, same])
    assert "against ptq_rtn" in line and "ptq_imatrix, 0.9 % larger, scores higher on a held-out set" in line
    rival["student"]["heldout_english/top1_agreement"] = 0.35
    assert "larger" not in ptq_verdict(student, [rival, same])  # lower everywhere: not named


def test_a_run_ends_with_one_line_against_the_ptq_baseline_of_its_size(tmp_path):
    from distill.eval.sweep import versus_ptq

    base = [0.2, 0.5, 0.8, 0.4]
    folder = tmp_path / "baselines" / "baseline_ptq_int4"
    folder.mkdir(parents=True)
    rival = _point("ptq_int4", 7.0, base, True)
    (folder / "report.json").write_text(
        json.dumps(
            {
                **rival["report"],
                "metrics": {"teacher": rival["teacher"], "student": rival["student"]},
                "run": rival["run"],
            }
        )
    )
    mine = _point("mine", 7.0, [a + 0.1 for a in base])
    (tmp_path / "report.json").write_text(
        json.dumps({**mine["report"], "metrics": {"teacher": mine["teacher"], "student": mine["student"]}, "run": {}})
    )
    line = versus_ptq(tmp_path / "report.json", tmp_path / "baselines", "mine")
    assert line.startswith(
        "versus PTQ: mine (7.00×, top-1 0.575) against ptq_int4 (7.00×, top-1 0.475): test split leads"
    )
    other = _point("mine", 7.1, base, key="k2")  # scored on another split: no baseline is comparable
    (tmp_path / "report.json").write_text(
        json.dumps(
            {**other["report"], "metrics": {"teacher": other["teacher"], "student": other["student"]}, "run": {}}
        )
    )
    assert versus_ptq(tmp_path / "report.json", tmp_path / "baselines", "mine").startswith(
        "mine: no PTQ baseline was measured"
    )
    assert versus_ptq(tmp_path / "report.json", None, "mine").startswith("mine: no PTQ baseline")
