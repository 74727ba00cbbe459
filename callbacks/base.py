"""The shared base of the compression callbacks: the :class:`~distill.compress.stages.CompressionStage` protocol.

A subclass sets ``stage`` and ``start_step``/``end_step`` and implements its Lightning hooks; the
algorithms it calls live in :mod:`distill.compress`. Callbacks never call each other: their order
within a step is :data:`~distill.compress.stages.STAGES` order, which ``train.py`` gives the callback list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from transformers import PreTrainedModel, PreTrainedTokenizerBase


class CompressionCallback(pl.Callback):
    """A Lightning callback that is one compression stage (see :class:`~distill.compress.stages.CompressionStage`)."""

    stage: ClassVar[str]
    start_step: int = 0
    end_step: int = 0

    def is_applied(self, structure: list[dict[str, Any]]) -> bool:
        """Whether the structure log already holds this stage's change (now, or in the resumed checkpoint)."""
        return any(change["kind"] == self.stage for change in structure)

    def make_plain(self, model: PreTrainedModel) -> PreTrainedModel:
        """The plain Hugging Face form of ``model``; stages that keep the plain form return it unchanged."""
        return model

    def export_compact(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path | None:
        """Write the compact export of this stage; stages without one write nothing and return None."""
        return None
