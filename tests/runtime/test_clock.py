"""Training time across a resumed run's segments: the report's train_seconds counts them all."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import crash_at
from train import train

SLOW = ("+callbacks.slow._target_=tests.faults.inject.SlowSteps", "+callbacks.slow.seconds=0.1")


def _crash_and_resume(tiny_cfg, tmp_path, *overrides: str) -> tuple[float, dict]:
    """10 steps of at least 0.1 s, killed at step 7 and resumed from the step-5 checkpoint; returns what the
    step-5 checkpoint counted and the resumed run's objects."""
    crash_at(tiny_cfg(*SLOW, *overrides), 7)
    saved = torch.load(tmp_path / "checkpoints" / "step000005.ckpt", weights_only=True)["callbacks"]["TrainClock"]
    assert saved["train_seconds"] >= 5 * 0.1  # the five steps before the checkpoint, at least
    _, objects = train(tiny_cfg(*SLOW, *overrides))
    return saved["train_seconds"], objects


def test_a_resumed_run_reports_the_training_time_of_every_segment(tiny_cfg, tmp_path):
    before, objects = _crash_and_resume(tiny_cfg, tmp_path, "eval.tasks=[]", "export.verify=false")
    run = objects["report"]["run"]
    assert run["resumed_from"].endswith("step000005.ckpt")
    assert run["train_seconds_segment"] >= 5 * 0.1  # steps 5..9 in this process
    # The total is this segment plus what the checkpoint had counted (the work lost after it is not counted).
    assert run["train_seconds"] == pytest.approx(before + run["train_seconds_segment"], abs=1e-6)
    assert "- train_seconds_segment: " in (tmp_path / "report.md").read_text()
    final = torch.load(tmp_path / "checkpoints" / "step000010.ckpt", weights_only=True)["callbacks"]["TrainClock"]
    assert before + 5 * 0.1 <= final["train_seconds"] <= run["train_seconds"]


def test_a_checkpoint_from_before_the_clock_continues_from_lightnings_timer():
    from distill.runtime.clock import TrainClock

    clock = TrainClock()
    clock.on_load_checkpoint(None, None, {"callbacks": {"Timer": {"time_elapsed": {"train": 3000.0}}}})
    assert clock.total == 3000.0
    clock.on_load_checkpoint(None, None, {"callbacks": {}})  # neither: nothing is known of before
    assert clock.total == 0.0
    clock.on_load_checkpoint(None, None, {"callbacks": {"TrainClock": {"train_seconds": 7.0}}})
    clock.load_state_dict({"train_seconds": 7.0})  # Lightning calls both; the clock's own state wins
    assert clock.total == 7.0
