"""The order of the compression stages, and the protocol every compression callback implements.

Compression callbacks change the student's shape mid-run (pruning removes rows, sharing ties layers,
low-rank splits linears, QAT swaps modules). A checkpoint's ``state_dict`` only fits a model that went
through the same changes, and Lightning loads the model weights *before* any callback state. So every
change is recorded as ``(kind, spec)`` in ``DistillModule.structure``; the checkpoint carries that log,
and on load :class:`~distill.module.DistillModule` replays it on the fresh student before the weights go in.

How to replay each kind lives in :mod:`distill.compress.replay`, next to the algorithms, so a
checkpoint can be rebuilt by anything that imports ``distill`` (``evaluate.py`` too) without the callbacks.
Every compression callback implements :class:`CompressionStage`; the export, the schedule check, the
modification log and ``evaluate.py`` talk to callbacks only through it.

Compression stages also have a fixed order, :data:`STAGES`: prune → share → lowrank → sparsity → qat.
Quantization goes last because every other stage rewrites the weights it would have to quantize again; pruning
goes first because sharing and factorising a matrix that is then sliced wastes the work; weight sparsity
zeroes weights of the final shapes, and quantization keeps its zeros (zero is exact on every grid here). A change of an
earlier stage after a later one is refused, and :func:`check_schedule` refuses configs whose step
windows overlap in the wrong order before training starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import ConfigError

STAGES = ("prune", "share", "lowrank", "sparsity", "qat")


@runtime_checkable
class CompressionStage(Protocol):
    """What every compression callback offers to the rest of the framework.

    ``stage`` is one of :data:`STAGES`; ``start_step`` is the first optimizer step at which the stage
    changes the student and ``end_step`` the step by which its structure is final (equal for one-shot
    stages). The structure spec a stage records with ``DistillModule.record_structure_change(stage, spec)``
    is replayed on resume by :func:`distill.compress.replay.replay`.
    """

    stage: str
    start_step: int
    end_step: int

    def is_applied(self, structure: list[dict[str, Any]]) -> bool:
        """Whether the structure log (``DistillModule.structure``) already holds this stage's change."""
        ...

    def make_plain(self, model: PreTrainedModel) -> PreTrainedModel:
        """An equivalent model in the plain Hugging Face form of its config (``model`` itself if it is one)."""
        ...

    def export_compact(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path | None:
        """Write this stage's compact form under ``run_dir`` and return its folder, or None when it has none."""
        ...


def compression_stages(callbacks: Iterable[Any]) -> list[CompressionStage]:
    """The compression stages among ``callbacks``, in :data:`STAGES` order."""
    staged = [cb for cb in callbacks if isinstance(cb, CompressionStage)]
    for cb in staged:
        if cb.stage not in STAGES:
            raise ConfigError(f"{type(cb).__name__}.stage={cb.stage!r}: a compression stage must be one of {STAGES}")
    return sorted(staged, key=lambda cb: STAGES.index(cb.stage))


def check_stage_order(applied: list[str], kind: str) -> None:
    """Refuse a structure change of ``kind`` after a change of a later stage (see :data:`STAGES`)."""
    if kind not in STAGES:
        return
    later = [k for k in applied if k in STAGES and STAGES.index(k) > STAGES.index(kind)]
    if later:
        raise ConfigError(
            f"callbacks.{kind}: a {kind!r} change came after {later[-1]!r} was applied; compression runs in the "
            f"order {' → '.join(STAGES)}, so schedule {kind!r} to finish before {later[-1]!r} starts"
        )


def check_schedule(callbacks: Iterable[Any]) -> None:
    """Check, before training, that compression callbacks are scheduled in :data:`STAGES` order.

    A later stage must not start before
    an earlier stage has finished; two callbacks of one stage are refused.
    """
    ordered = compression_stages(callbacks)
    seen: set[str] = set()
    for cb in ordered:
        if cb.stage in seen:
            raise ConfigError(f"callbacks: two {cb.stage!r} callbacks are configured; keep one")
        seen.add(cb.stage)
    for i, later in enumerate(ordered):
        for earlier in ordered[:i]:
            if later.start_step < earlier.end_step:
                raise ConfigError(
                    f"callbacks.{later.stage}.start_step={later.start_step}: {later.stage} must start at or after "
                    f"the step where {earlier.stage} finishes (its end_step={earlier.end_step}), because compression "
                    f"runs in the order {' → '.join(STAGES)}; raise start_step or lower {earlier.stage}'s end_step"
                )
