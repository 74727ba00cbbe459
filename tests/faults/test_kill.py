"""Real SIGKILLs of ``python train.py`` halfway through a write, then the same command again.

The killed process runs no cleanup at all: what it leaves is what a preempted or OOM-killed job leaves.
Each writer is stopped after half of its file is on disk (tests/faults/inject.py ``HaltHalfway``) and the
test kills it from outside. The rerun takes over the dead run's lock, resumes, and must end with the
weights of an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from distill.runtime.files import host_name
from distill.runtime.resume import is_whole
from tests.faults.checks import assert_published_whole, assert_same_weights, export_weights, temporaries
from tests.helpers import run_train_cli

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["experiment=smoke", "eval.enabled=false", "callbacks.progress_bar=null", "distill.scheduler.num_warmup_steps=0"]


def _halt(target: str, match: str, call: int = 1, path_arg: int = 1) -> list[str]:
    prefix = "+callbacks.halt."
    return [
        f"{prefix}_target_=tests.faults.inject.HaltHalfway",
        f"{prefix}target={target}",
        f"{prefix}match={match}",
        f"{prefix}call={call}",
        f"{prefix}path_arg={path_arg}",
    ]


def _kill_halfway(args: list[str], cwd: Path, cache_dir: Path, env: dict[str, str] | None = None) -> str:
    """Run ``train.py <args>`` until it reports a write stopped halfway, then SIGKILL it; returns its output."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *args,
        f"paths.cache_dir={cache_dir}",
        f"data.cache_dir={cache_dir}/data",
    ]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "halfway " in line:  # a progress bar may share the line
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    out = "".join(lines) + proc.stdout.read()
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """The weights of the same command, never killed."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    run_train_cli([*ARGS, "run_name=ref"], cwd, cache_dir)
    return export_weights(cwd / "logs/train/runs/ref")


@pytest.mark.slow
def test_killed_while_a_checkpoint_is_copied_into_place(tmp_path, cache_dir, uninterrupted):
    """Lightning writes a checkpoint to $TMPDIR and moves it; on another file system the move is a copy."""
    shm = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    if shm is None or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a temporary folder on another file system than the run (/dev/shm)")
    run = tmp_path / "logs/train/runs/cut"
    try:
        # The step-10 checkpoint is killed halfway through its copy: a truncated step000010.ckpt is left.
        _kill_halfway(
            [*ARGS, "run_name=cut", *_halt("shutil:copyfile", ".ckpt", call=2)],
            tmp_path,
            cache_dir,
            {"TMPDIR": str(shm)},
        )
        assert not is_whole(run / "checkpoints" / "step000010.ckpt") and is_whole(
            run / "checkpoints" / "step000005.ckpt"
        )
        rerun = run_train_cli([*ARGS, "run_name=cut"], tmp_path, cache_dir)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    out = rerun.stdout + rerun.stderr
    assert "resume=auto: removing" in out and "step000010.ckpt, a checkpoint cut short" in out
    assert "resuming from" in out and "step000005.ckpt" in out
    assert "taking over the lock of pid" in out and f"on host {host_name()}" in out and "its process is gone" in out
    assert_published_whole(run)
    assert temporaries(run) == [] and not (run / "run.lock").exists()
    assert_same_weights(export_weights(run), uninterrupted)


@pytest.mark.slow
def test_killed_while_the_student_is_exported(tmp_path, cache_dir, uninterrupted):
    run = tmp_path / "logs/train/runs/cut"
    halt = _halt("transformers.modeling_utils:safe_save_file", "model.safetensors")
    _kill_halfway([*ARGS, "run_name=cut", *halt], tmp_path, cache_dir)
    assert not (run / "student").exists()
    (left,) = temporaries(run)  # the killed writer's half-written folder, under a name no reader opens
    assert left.startswith(f".student.{host_name()}-")
    run_train_cli([*ARGS, "run_name=cut"], tmp_path, cache_dir)  # resumes at step 10 and exports
    assert_published_whole(run)
    assert temporaries(run) == []  # the dead writer's folder was removed
    assert_same_weights(export_weights(run), uninterrupted)
    before = (run / "student" / "model.safetensors").read_bytes()
    _kill_halfway([*ARGS, "run_name=cut", *halt], tmp_path, cache_dir)  # killed again, with an export in place
    assert (run / "student" / "model.safetensors").read_bytes() == before
    assert_published_whole(run)
