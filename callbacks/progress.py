"""A progress bar that shows the budget a run actually stops at: wall-clock time when ``trainer.max_time`` is set.

Lightning's bar counts batches toward ``max_steps``. A run budgeted by ``trainer.max_time`` (the default run:
15 minutes, with ``max_steps: 1000`` only sizing the data sampler) stops long before that count, so the bar
would show a step total that is never reached and an ETA of a day. Here such a run's bar counts seconds of
its time budget, and says how many steps it has done and at how many tokens per second.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.callbacks.progress import TQDMProgressBar


class BudgetProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar; with a wall-clock budget it counts elapsed seconds out of the budget."""

    @staticmethod
    def budget(trainer: pl.Trainer) -> tuple[float, float] | None:
        """``(elapsed, total)`` training seconds when a Timer bounds the run, else None."""
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        if timer is None:
            return None
        elapsed, left = timer.time_elapsed("train"), timer.time_remaining("train")
        return None if left is None else (elapsed, elapsed + left)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        """The bar's total: the time budget in seconds (or Lightning's batch count without one)."""
        super().on_train_epoch_start(trainer, *args)
        budget = self.budget(trainer)
        if budget is not None and self.train_progress_bar is not None:
            self.train_progress_bar.total = round(budget[1])
            self.train_progress_bar.unit = "s"
            self.train_progress_bar.set_description("Training (time budget, s)")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Advance by seconds spent under a time budget; the postfix names the steps done and the metrics."""
        budget = self.budget(trainer)
        if budget is None or self.train_progress_bar is None:
            super().on_train_batch_end(trainer, pl_module, *args)
            return
        bar = self.train_progress_bar
        bar.n = min(round(budget[0]), bar.total or 0)
        bar.set_postfix({"step": trainer.global_step, **self.get_metrics(trainer, pl_module)})
        if self.is_enabled:
            bar.refresh()
