"""Training time across the segments of a resumed run, kept in the checkpoints.

A run killed at minute 50 and resumed for ten more minutes trained for an hour, not ten minutes: each
checkpoint stores the seconds trained up to it, and the resumed segment adds its own to what it loaded.
Time after the last checkpoint of a segment that died is not counted; it produced nothing the final
weights went through.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class TrainClock(Callback):
    """Count the seconds spent in ``trainer.fit``, carried over resumes in the checkpoint's callback state.

    ``segment`` is this process's fit, from its setup to its teardown; ``total`` adds what the checkpoint it
    resumed from had counted. A checkpoint written before this callback existed gives the elapsed training
    time of Lightning's ``Timer`` (``trainer.max_time``) when it holds one, else nothing is known of before.
    """

    def __init__(self) -> None:
        self.before = 0.0  # seconds counted by the segments before this one
        self._started: float | None = None
        self._stopped: float | None = None

    @classmethod
    def attach(cls, trainer: pl.Trainer) -> TrainClock:
        """A clock added to ``trainer``'s callbacks, before its checkpoint callbacks (as Lightning orders them)."""
        clock = cls()
        trainer.callbacks.insert(0, clock)
        return clock

    @property
    def segment(self) -> float:
        """Seconds this process has spent in ``fit`` (so far, while it runs)."""
        if self._started is None:
            return 0.0
        end = self._stopped if self._stopped is not None else time.perf_counter()
        return end - self._started

    @property
    def total(self) -> float:
        """Seconds of training across every segment, up to now."""
        return self.before + self.segment

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Start this segment's count (before Lightning restores a checkpoint)."""
        if stage == "fit":
            self._started, self._stopped = time.perf_counter(), None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Stop this segment's count when ``fit`` ends."""
        if stage == "fit" and self._started is not None:
            self._stopped = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: the seconds trained up to the moment it is written."""
        return {"train_seconds": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from the seconds the checkpoint counted."""
        self.before = float(state_dict.get("train_seconds", 0.0))

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint without this clock's state: take the training time Lightning's ``Timer`` stored, if any."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:
            timer = states.get("Timer") or {}
            self.before = float((timer.get("time_elapsed") or {}).get("train", 0.0))
