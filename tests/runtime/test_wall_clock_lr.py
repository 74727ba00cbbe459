"""The learning rate's cosine decay over the run's budget: wall clock (Lightning's Timer) or steps."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import lightning.pytorch as pl
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


class _NoPostHookOptimizer:
    """An optimizer as DeepSpeed's ZeRO wrappers present it: param groups, state and ``step``, no step hooks."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        self.param_groups = inner.param_groups
        self.state = inner.state

    def step(self, closure=None):
        return self.inner.step(closure)


def test_an_optimizer_without_step_hooks_gets_its_scheduled_rate_back_after_each_step():
    cb = WallClockCosine()
    trainer = _trainer(1, 4)  # a quarter of the steps done
    optimizer = _NoPostHookOptimizer(trainer.optimizers[0])
    trainer.optimizers = [optimizer]
    assert not hasattr(optimizer, "register_step_post_hook")
    group = optimizer.param_groups[0]
    for step in (1, 2):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, _module(), None, step)
        assert group["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * step / 4)))
        optimizer.step()
        assert group["lr"] == pytest.approx(0.05)  # put back before the scheduler reads it


class RateProbe(pl.Callback):
    """Records the first param group's rate as each optimizer step applies it.

    ``on_before_optimizer_step`` runs inside ``optimizer.step``, in the closure, before the update reads the rate,
    and after every earlier callback's hooks (``wall_clock_lr`` is listed first).
    """

    def __init__(self) -> None:
        self.used: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.used.append(optimizer.param_groups[0]["lr"])


class SwapNormAt(pl.Callback):
    """At ``step``, replace the student's final-norm weight and rebuild the optimizer, as pruning does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step:
            norm = pl_module.student.model.norm
            old, norm.weight = norm.weight, torch.nn.Parameter(norm.weight.detach().clone())
            pl_module.rebuild_optimizers({norm.weight: (old, None)})


@pytest.mark.parametrize("scheduler", ["none", "step_lr"])
def test_a_rebuilt_optimizer_carries_the_scheduled_rate_not_the_scaled_one(scheduler, tiny_cfg, tmp_path):
    steps, cut = 6, 3
    schedules = {
        "none": ["distill.scheduler=null"],  # the scheduled rate is the configured 0.01 throughout
        "step_lr": [  # chains on the current rate: 0.01 · 0.5^s at step s
            "~distill.scheduler",
            "+distill.scheduler={_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 1, gamma: 0.5}",
        ],
    }
    cfg = tiny_cfg(
        f"trainer.max_steps={steps}",
        *schedules[scheduler],
        "+callbacks.wall_clock_lr._target_=callbacks.wall_clock_lr.WallClockCosine",
        "+callbacks.swap._target_=tests.runtime.test_wall_clock_lr.SwapNormAt",  # after wall_clock_lr, like prune
        f"+callbacks.swap.step={cut}",
        "+callbacks.probe._target_=tests.runtime.test_wall_clock_lr.RateProbe",
        "trainer.val_check_interval=100",
        "eval.enabled=false",
        "export.enabled=false",
    )
    _, objects = train(cfg)
    probe = next(cb for cb in objects["trainer"].callbacks if isinstance(cb, RateProbe))
    decay = 0.5 if scheduler == "step_lr" else 1.0
    want = [0.01 * decay**s * 0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)]
    # Before the fix the rebuilt optimizer kept step 3's scaled rate as its scheduled one: every later step ran at
    # that factor times its own (0.5x at the cut here).
    assert probe.used == pytest.approx(want, rel=1e-6)
