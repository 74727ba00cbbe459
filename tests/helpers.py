"""Callbacks and utilities used by tests through the config (``callbacks.<name>._target_``)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl


class CrashAtStep(pl.Callback):
    """Raise at the start of a given global step, to simulate a job killed mid-run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise SystemExit(f"simulated crash at step {self.step}")


def read_metrics(output_dir: Path) -> list[dict[str, str]]:
    """All rows of every CSVLogger metrics.csv under ``output_dir``, in version order."""
    rows: list[dict[str, str]] = []
    for f in sorted(Path(output_dir).glob("csv/version_*/metrics.csv")):
        with f.open() as fh:
            rows += list(csv.DictReader(fh))
    return rows


def series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric."""
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
