"""Cross-layer weight sharing as a Lightning callback; the surgery is :mod:`distill.compress.share`."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from torch import nn

from callbacks.base import CompactCompression
from distill.compress.layers import decoder_layers
from distill.compress.share import (
    DEFAULT_LORA_TARGETS,
    FIELD,
    SHARE,
    apply_sharing,
    check_init,
    check_pattern,
    sharing_spec,
)
from distill.config import config_error
from distill.cost import parameter_count
from distill.runtime.rank_zero_load import has_meta_tensors

log = logging.getLogger(__name__)


class CrossLayerSharing(CompactCompression):
    """Tie decoder layers into shared blocks, at the start of training or at ``start_step``.

    Args:
        pattern: ``all``, ``groups``, ``cycle`` or an explicit list of layer groups
            (see :func:`distill.compress.share.share_groups`).
        group_size: k for ``groups`` / ``cycle``.
        init: shared value from the members' ``mean``, the ``first`` member, or an int position in each group.
        start_step: the optimizer step at which to tie (0: before training, when the model is set up).
        lora_rank: rank of the per-layer LoRA relaxation on shared layers (0: none).
        lora_alpha: LoRA scale numerator (scaling = alpha / rank); default = 2 × rank.
        lora_targets: projection names that get a LoRA delta.
        lora_init: ``zeros`` (B = 0: the relaxed model starts as the tied one) or ``svd`` (each delta starts as
            the best rank-r approximation of that layer's weight minus the shared weight).
        compact_dir: folder name, under the run directory, of the compact export.

    """

    stage = SHARE.name
    mid_run_refused = "tying"

    def __init__(
        self,
        pattern: str | list[list[int]] = "groups",
        group_size: int | None = 2,
        init: str | int = "mean",
        start_step: int = 0,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS,
        lora_init: str = "zeros",
        compact_dir: str = "student_compact",
    ) -> None:
        check_pattern(pattern)
        if not isinstance(start_step, int) or start_step < 0:
            raise config_error(f"{FIELD}.start_step", start_step, "must be a step number ≥ 0")
        if not isinstance(lora_rank, int) or lora_rank < 0:
            raise config_error(f"{FIELD}.lora_rank", lora_rank, "must be an int ≥ 0 (0 switches LoRA off)")
        if lora_init not in ("zeros", "svd"):
            raise config_error(f"{FIELD}.lora_init", lora_init, "use 'zeros' (peft's default) or 'svd'")
        check_init(init)
        self.pattern = pattern if isinstance(pattern, str) else [list(g) for g in pattern]
        self.group_size = group_size
        self.init = init
        self.start_step = self.end_step = start_step
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha) if lora_alpha is not None else 2.0 * lora_rank
        self.lora_targets = list(lora_targets)
        self.lora_init = lora_init
        self.compact_dir = compact_dir
        self.groups: list[list[int]] | None = None

    def spec_for(self, model: nn.Module) -> dict[str, Any]:
        """The structure spec recorded in checkpoints (depends on the config only, not on the weights)."""
        n = len(decoder_layers(model, FIELD))
        return sharing_spec(n, self.pattern, self.group_size, self.lora_rank, self.lora_alpha, self.lora_targets)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bad group sizes for this student fail before any training."""
        self.spec_for(pl_module.student)

    def compress(self, student: nn.Module) -> tuple[dict[str, Any], dict[nn.Parameter, nn.Parameter]]:
        """Tie ``student`` in place as configured; returns the recorded spec and the tie sources."""
        spec = self.spec_for(student)
        # A student built empty (FSDP ranks > 0, distill/runtime/rank_zero_load.py) receives rank 0's values when
        # FSDP wraps it, so it needs only the shapes: an SVD of its empty weights cannot run.
        lora_init = "zeros" if has_meta_tensors(student) else self.lora_init
        return spec, apply_sharing(student, spec, self.init, lora_init)

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rebuild: bool) -> None:
        """Tie the student and record it; mid-run, each shared Parameter keeps its source's Adam moments."""
        student = pl_module.student
        before = parameter_count(student)
        spec, sources = self.compress(student)
        pl_module.record_structure_change(self.stage, spec)
        self.groups = spec["groups"]
        if rebuild:
            # Each shared Parameter continues the Adam moments of the member its value came from.
            pl_module.rebuild_optimizers({new: (old, None) for new, old in sources.items()})
        log.info(
            "shared layers %s at step %d: %d → %d unique student parameters",
            spec["groups"],
            trainer.global_step,
            before,
            parameter_count(student),
        )
