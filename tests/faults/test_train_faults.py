"""Faults injected into a tiny run at each writer, then the same command again.

After each fault nothing published is half-written (every checkpoint, export, GGUF file, report and
generation shard that exists loads), an export that existed before is still there, whole, and the re-run
ends with the weights of an uninterrupted run. A full disk is real (``RLIMIT_FSIZE``, tests/faults/inject.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from distill.data.generation import Generation
from distill.export import gguf as gguf_export
from distill.export import hf
from distill.recipe import export as recipe_export
from tests.faults.checks import assert_published_whole, assert_same_weights, export_weights, temporaries
from tests.faults.inject import fail_call
from train import train

RUN = ("eval.enabled=false",)
GENERATION = (
    *RUN,
    "distill.generation.student_fraction=0.5",
    "distill.generation.teacher_fraction=0.25",
    "distill.generation.max_new_tokens=12",
    "distill.generation.teacher_cache=${paths.output_dir}/seqkd",
)


def _digest(folder: Path) -> dict[str, str]:
    """Every file of a folder by content: an export that must not change."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _reports(run_dir: Path) -> tuple[bytes, bytes]:
    return (run_dir / "report.json").read_bytes(), (run_dir / "report.md").read_bytes()


def _after_fault(run_dir: Path) -> None:
    assert_published_whole(run_dir)
    assert temporaries(run_dir) == []  # the failed writer removed its own temporary files


def _rerun_matches(cfg, run_dir: Path, expected) -> None:
    """The same command again finishes the run, with an uninterrupted run's weights and nothing left over."""
    train(cfg)
    assert_published_whole(run_dir)
    assert temporaries(run_dir) == []
    assert_same_weights(export_weights(run_dir), expected)


def test_disk_full_while_writing_a_checkpoint(tiny_cfg, tmp_path, monkeypatch, reference):
    from lightning.fabric.plugins.io import torch_io

    calls = fail_call(monkeypatch, torch_io, "_atomic_save", call=2, disk_bytes=100_000)  # the step-10 save
    cfg = tiny_cfg(*RUN)
    with pytest.raises(OSError, match="File too large"):
        train(cfg)
    assert calls == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step000005.ckpt"]
    assert not (tmp_path / "student").exists()
    _after_fault(tmp_path)
    monkeypatch.undo()
    _rerun_matches(cfg, tmp_path, reference(*RUN))  # resumes from step 5


HF_FAULTS = {
    "disk_full": lambda mp: fail_call(mp, recipe_export, "export_student", disk_bytes=4096),
    "reload_differs": lambda mp: fail_call(mp, hf, "check_reload", error=RuntimeError("does not reproduce")),
}


@pytest.mark.parametrize("fault", sorted(HF_FAULTS))
def test_a_failed_hf_export_publishes_nothing_and_keeps_the_previous_one(
    fault, tiny_cfg, tmp_path, monkeypatch, reference
):
    cfg = tiny_cfg(*RUN)
    HF_FAULTS[fault](monkeypatch)
    with pytest.raises(Exception, match="File too large|does not reproduce"):
        train(cfg)  # trained to the end, then the export failed
    assert not (tmp_path / "student").exists()
    _after_fault(tmp_path)
    monkeypatch.undo()
    _rerun_matches(cfg, tmp_path, reference(*RUN))  # resumes from step 10 and exports
    before = _digest(tmp_path / "student")
    HF_FAULTS[fault](monkeypatch)
    with pytest.raises(Exception, match="File too large|does not reproduce"):
        train(cfg)
    assert _digest(tmp_path / "student") == before  # the previous export, untouched
    _after_fault(tmp_path)


GGUF_FAULTS = {
    "disk_full_in_write": lambda mp: fail_call(mp, gguf_export, "write_gguf", disk_bytes=4096),
    "verification_fails": lambda mp: fail_call(mp, gguf_export, "verify_gguf", error=RuntimeError("gguf differs")),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(GGUF_FAULTS))
def test_a_failed_gguf_export_keeps_the_previous_file(fault, tiny_cfg, tmp_path, monkeypatch, reference):
    pytest.importorskip("gguf")
    cfg = tiny_cfg(*RUN, "export.formats=[hf,gguf]")
    train(cfg)
    before = _digest(tmp_path / "student_gguf")
    GGUF_FAULTS[fault](monkeypatch)
    with pytest.raises(Exception, match="File too large|gguf differs"):
        train(cfg)  # resumed at step 10; the HF export is written, the GGUF one fails
    assert _digest(tmp_path / "student_gguf") == before
    _after_fault(tmp_path)
    monkeypatch.undo()
    _rerun_matches(cfg, tmp_path, reference(*RUN))
    assert _digest(tmp_path / "student_gguf") == before  # the same student, written again


@pytest.mark.slow
def test_disk_full_during_the_generation_cache_flush(tiny_cfg, tmp_path, monkeypatch, reference):
    calls = fail_call(monkeypatch, Generation, "flush", call=2, disk_bytes=256)  # at the step-10 checkpoint
    cfg = tiny_cfg(*GENERATION)
    with pytest.raises(OSError, match="File too large"):
        train(cfg)
    assert calls == [1, 2]
    shards = sorted((tmp_path / "seqkd").glob("*/shard-*"))
    assert len(shards) == 1  # the step-5 flush, whole; the failed one published nothing
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step000005.ckpt"]
    _after_fault(tmp_path)
    monkeypatch.undo()
    _rerun_matches(cfg, tmp_path, reference(*GENERATION))  # reads the step-5 shard, as the first run had


@pytest.mark.slow
def test_disk_full_while_writing_the_report_keeps_the_previous_report(tiny_cfg, tmp_path, monkeypatch, reference):
    from distill.eval import assess

    cfg = tiny_cfg("eval.tasks=[]")
    train(cfg)
    before = _reports(tmp_path)
    fail_call(monkeypatch, assess, "write_report", disk_bytes=4096)
    with pytest.raises(OSError, match="File too large"):
        train(cfg)
    assert _reports(tmp_path) == before  # both files of the previous report, whole
    _after_fault(tmp_path)
    monkeypatch.undo()
    _rerun_matches(cfg, tmp_path, reference(*RUN))
