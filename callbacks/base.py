"""The shared base of the compression callbacks: the :class:`~distill.compress.stages.CompressionStage` protocol.

A subclass sets ``stage`` and ``start_step``/``end_step`` and implements its Lightning hooks; the
algorithms it calls live in :mod:`distill.compress`. Callbacks never call each other: their order
within a step is the stages' order (:func:`~distill.compress.stages.stage_names`), which ``train.py`` gives the
callback list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import config_error
from distill.export.compact import compact_unless_quantized, plain_copy


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

    def artifacts(self) -> list[Any]:
        """Typed objects for the exporters (see the protocol); none by default."""
        return []


class OneShotCompression(CompressionCallback):
    """A stage that changes the student once, at ``start_step`` (sharing, low-rank, QAT).

    At ``start_step`` 0 the change happens in ``setup``, before the strategy wraps the model, so DDP or
    FSDP wrap the changed student. Later it happens in ``on_train_batch_start`` of that step, with
    ``rebuild=True`` so the subclass rebuilds the optimizer around the new Parameters. A resumed run whose
    checkpoint already holds the change got it from the structure log and is not changed again.
    Subclasses implement :meth:`apply` and, to refuse bad settings before any change, :meth:`check`.
    """

    #: The change, as a gerund ("tying"), when it cannot happen after step 0 under several processes
    #: (the strategy would have to re-wrap the model); None allows that.
    mid_run_refused: ClassVar[str | None] = None

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse settings that do not fit the student or the run (nothing to check by default)."""

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rebuild: bool) -> None:
        """Change ``pl_module.student`` in place and record the change; ``rebuild``: mid-run, rebuild the optimizer."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply()")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the settings, then apply now when ``start_step`` is 0 (before the strategy wraps the model)."""
        self.check(trainer, pl_module)
        if self.start_step > 0 and trainer.world_size > 1 and self.mid_run_refused:
            raise config_error(
                f"callbacks.{self.stage}.start_step",
                self.start_step,
                f"{self.mid_run_refused} mid-run under a multi-process strategy would need the model re-wrapped; "
                "use start_step=0 with DDP (the change happens before wrapping)",
            )
        if self.start_step == 0 and not self.is_applied(pl_module.structure):
            self.apply(trainer, pl_module, rebuild=False)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Apply at ``start_step`` (a resumed run that already did got its structure from the checkpoint)."""
        if self.start_step > 0 and trainer.global_step >= self.start_step and not self.is_applied(pl_module.structure):
            self.apply(trainer, pl_module, rebuild=True)


class CompactCompression(OneShotCompression):
    """A one-shot stage whose compact form is the ``distill-compact`` folder (sharing, low-rank).

    Its plain form has shared weights cloned per layer, factors multiplied back and LoRA deltas merged
    (:func:`~distill.export.compact.plain_copy`); its compact form stores each shared tensor
    once, plus the structure and a self-contained loader (:func:`~distill.export.compact.save_compact`).
    """

    compact_dir: str = "student_compact"

    def make_plain(self, model: PreTrainedModel) -> PreTrainedModel:
        """A plain copy for ``save_pretrained``: ties cloned, factors multiplied back, LoRA merged."""
        return plain_copy(model)

    def export_compact(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path | None:
        """Write the compact folder ``compact_dir`` under ``run_dir`` (skipped for a quantized student)."""
        return compact_unless_quantized(model, tokenizer, Path(run_dir) / self.compact_dir, type(self).__name__)
