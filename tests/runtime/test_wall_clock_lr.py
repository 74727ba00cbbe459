"""The learning rate's cosine decay over the run's budget: wall clock (Lightning's Timer) or steps."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Timer

from callbacks.wall_clock_lr import WallClockCosine
from distill.config import ConfigError
from tests.helpers import read_metrics, series
from train import train


def _trainer(step: int, max_steps: int, elapsed: float | None = None, left: float | None = None):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)  # a scheduled rate of 0.05
    callbacks = []
    if elapsed is not None:
        timer = Timer(duration="00:00:10:00")
        timer.time_elapsed = lambda stage="train": elapsed
        timer.time_remaining = lambda stage="train": left
        callbacks.append(timer)
    return SimpleNamespace(
        strategy=SimpleNamespace(broadcast=lambda value, src=0: value),
        global_step=step,
        max_steps=max_steps,
        callbacks=callbacks,
        optimizers=[optimizer],
        lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)],
    )


def _module():
    return SimpleNamespace(log=lambda *a, **k: None)


def test_progress_is_the_larger_of_time_and_steps_spent():
    assert WallClockCosine.progress(_trainer(10, 100)) == pytest.approx(0.1)
    assert WallClockCosine.progress(_trainer(10, 100, elapsed=300.0, left=300.0)) == pytest.approx(0.5)
    assert WallClockCosine.progress(_trainer(90, 100, elapsed=300.0, left=300.0)) == pytest.approx(0.9)
    assert WallClockCosine.progress(_trainer(150, 100)) == 1.0


def test_the_rate_follows_a_cosine_from_the_scheduled_rate_to_the_floor():
    cb = WallClockCosine(min_ratio=0.1)
    assert cb.factor(0.0) == pytest.approx(1.0) and cb.factor(1.0) == pytest.approx(0.1)
    assert cb.factor(0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    trainer = _trainer(0, 1000, elapsed=150.0, left=450.0)  # a quarter of the time spent
    want = 0.05 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    group = trainer.optimizers[0].param_groups[0]
    for _ in range(3):  # micro-batches of one accumulated step: the same rate, not compounded
        cb.on_train_batch_start(trainer, _module(), None, 0)
        assert group["lr"] == pytest.approx(want)
    trainer.optimizers[0].step()  # the step of the accumulated micro-batches
    assert group["lr"] == pytest.approx(0.05)  # the scheduled rate is back before the scheduler steps


def test_a_scheduler_that_chains_on_the_current_rate_never_sees_the_factor():
    cb = WallClockCosine()
    trainer = _trainer(0, 4)
    optimizer = trainer.optimizers[0]
    step_lr = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # next = current · 0.5
    trainer.lr_scheduler_configs = [SimpleNamespace(scheduler=step_lr)]
    used = []
    for step in range(4):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, _module(), None, step)
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step_lr.step()
    want = [0.05 * 0.5**s * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]  # from _trainer's 0.05
    assert used == pytest.approx(want)


def test_a_bad_floor_is_refused():
    with pytest.raises(ConfigError, match=r"callbacks.wall_clock_lr.min_ratio=1.5: give a fraction in \[0, 1\]"):
        WallClockCosine(min_ratio=1.5)


def test_a_run_logs_the_decaying_rate_it_trains_with(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "+callbacks.wall_clock_lr._target_=callbacks.wall_clock_lr.WallClockCosine",
        "eval.enabled=false",
        "export.enabled=false",
    )
    train(cfg)
    rows = read_metrics(tmp_path)
    factors = [v for _, v in series(rows, "train/lr_factor")]
    rates = [v for _, v in series(rows, "train/lr")]
    assert len(factors) == 6 and factors[0] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(factors))  # decays every step
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    # On top of the recipe's own schedule: the smoke run's cosine over max_steps (the same curve, so squared).
    assert rates == pytest.approx([0.01 * f * f for f in factors], rel=1e-5)
