"""Cosine decay of the learning rate over the run's budget, whichever of wall clock or steps runs out first.

A run budgeted by ``trainer.max_time`` stops at a step nobody knows in advance (machines differ by 3x), so a
schedule sized by ``max_steps`` either stops at a high rate or decays too early. Quantization-aware training
needs the decay: at a constant rate the latent weights keep crossing rounding boundaries and the grid values
oscillate. This callback scales the optimizer's scheduled rate (warm-up included) by
``min_ratio + (1 - min_ratio) · (1 + cos(π·p)) / 2``, where ``p`` is the larger of the fraction of
``max_time`` spent (Lightning's Timer, which checkpoints save and restore) and of ``max_steps`` done; a run
with neither budget never decays. Rank 0's progress is broadcast, so every DDP replica takes the same step.
The scaled rate is set before each micro-batch and the scheduled one put back right after the optimizer
steps (a torch step post-hook, since Lightning steps the scheduler before any later callback hook; DeepSpeed's
ZeRO optimizers have no step hooks, so their ``step`` is wrapped instead), so schedulers that compute the next
rate from the current one (StepLR, ReduceLROnPlateau) never see the factor. An optimizer rebuilt during the
batch's hooks (pruning, after this callback's batch start) starts at the scheduled rate
(``DistillModule.rebuild_optimizers``) and is scaled just before its first step.

Lightning's own schedulers step by count only, and no maintained library schedules by wall clock, so this is
written here. A resumed run continues the schedule from the restored elapsed time, but wall-clock progress is
not bit-reproducible: two runs (or a run and its resumption) see different timings, hence slightly different
rates. Give ``trainer.max_time=null`` for a step-only schedule that is.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Timer

from distill.config import config_error


class WallClockCosine(Callback):
    """Scale the scheduled learning rate by a cosine of the run's progress (wall clock or steps)."""

    def __init__(self, min_ratio: float = 0.0) -> None:
        super().__init__()
        if not isinstance(min_ratio, int | float) or isinstance(min_ratio, bool) or not 0 <= min_ratio <= 1:
            raise config_error("callbacks.wall_clock_lr.min_ratio", min_ratio, "give a fraction in [0, 1]")
        self.min_ratio = float(min_ratio)
        # Per optimizer, the scheduled rates before scaling; a step post-hook puts them back after each step,
        # before Lightning steps the scheduler (which may build the next rate from the current one).
        # Keyed by the optimizer itself, weakly: a rebuilt optimizer (pruning) may reuse a freed one's id.
        self._scheduled: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[float]] = weakref.WeakKeyDictionary()
        self._hooked: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._scale = 1.0  # the factor of the step under way (set at each batch start)

    @staticmethod
    def progress(trainer: pl.Trainer) -> float:
        """How much of the budget is spent, in [0, 1]: the larger of the time and the step fractions."""
        done = 0.0
        if trainer.max_steps and trainer.max_steps > 0:
            done = trainer.global_step / trainer.max_steps
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        if timer is not None:
            elapsed, left = timer.time_elapsed("train"), timer.time_remaining("train")
            if left is not None and elapsed + left > 0:
                done = max(done, elapsed / (elapsed + left))
        return min(max(done, 0.0), 1.0)

    def factor(self, progress: float) -> float:
        """The multiplier at ``progress``: 1 at the start, ``min_ratio`` at the end."""
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Scale each group's scheduled rate by the cosine factor until the optimizer has stepped."""
        if not trainer.optimizers:
            return
        # Each rank's clock differs a little; DDP replicas must take the same step, so rank 0's progress rules.
        self._scale = self.factor(float(trainer.strategy.broadcast(self.progress(trainer), src=0)))
        self._scale_rates(trainer.optimizers)
        # LearningRateMonitor may read the groups before this hook runs; these are the rates the step uses.
        pl_module.log("train/lr_factor", self._scale, on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Scale an optimizer rebuilt since the batch started (pruning), which starts at the scheduled rate."""
        if optimizer not in self._hooked:
            self._scale_rates([optimizer])

    def _scale_rates(self, optimizers: list[Any]) -> None:
        for optimizer in optimizers:
            if optimizer not in self._hooked:  # a rebuilt optimizer (pruning) gets its own hook
                _after_each_step(optimizer, self._restore)
                self._hooked.add(optimizer)
            # Micro-batches of one accumulated step scale the same scheduled rate, never an already scaled one.
            rates = self._scheduled.setdefault(optimizer, [group["lr"] for group in optimizer.param_groups])
            for group, rate in zip(optimizer.param_groups, rates, strict=False):
                group["lr"] = rate * self._scale

    def _restore(self, optimizer: Any, *args: Any) -> None:
        """Right after ``optimizer.step()``, before the scheduler steps: put the scheduled rates back."""
        rates = self._scheduled.pop(optimizer, None)
        if rates is not None:
            for group, rate in zip(optimizer.param_groups, rates, strict=False):
                group["lr"] = rate


def _after_each_step(optimizer: Any, hook: Callable[..., None]) -> None:
    """Call ``hook(optimizer)`` right after each of ``optimizer``'s steps, before anything else reads its rates.

    A torch optimizer takes a step post-hook. DeepSpeed's ZeRO optimizers (what ``trainer.optimizers`` holds under
    ``trainer=deepspeed_stage_2``) have no hooks; the engine calls their ``step`` right after the backward, so the
    instance's ``step`` is wrapped instead. The hook runs even when the step raises, so no scaled rate outlives it.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.register_step_post_hook(hook)
        return
    step = optimizer.step

    @functools.wraps(step)
    def stepped(*args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        finally:
            hook(optimizer)

    optimizer.step = stepped
