"""A log of structural changes to the student, so a checkpoint can rebuild the structure it was saved with.

Compression callbacks change the student's shape mid-run (pruning removes rows, sharing ties layers,
low-rank splits linears, QAT swaps modules). A checkpoint's ``state_dict`` only fits a model that went
through the same changes, and Lightning loads the model weights *before* any callback state. So every
change is recorded here as ``(kind, spec)``; the checkpoint carries the list, and on load
:class:`~distill.module.DistillModule` replays it on the fresh student before the weights go in.

Callbacks register how to replay their kind with :func:`register`. This module knows no callback,
which keeps ``distill/`` free of imports from ``callbacks/``.

Compression stages also have a fixed order, :data:`STAGES`: prune → share → lowrank → qat. Quantization
goes last because every other stage rewrites the weights it would have to quantize again; pruning goes
first because sharing and factorising a matrix that is then sliced wastes the work. A change of an
earlier stage after a later one is refused, and :func:`check_schedule` refuses configs whose step
windows overlap in the wrong order before training starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from distill.errors import ConfigError

Replay = Callable[[nn.Module, dict[str, Any]], None]
_REPLAYS: dict[str, Replay] = {}


def register(kind: str) -> Callable[[Replay], Replay]:
    """Decorator: ``fn(student, spec)`` re-applies a recorded change of this kind to a fresh student."""

    def wrap(fn: Replay) -> Replay:
        _REPLAYS[kind] = fn
        return fn

    return wrap


STAGES = ("prune", "share", "lowrank", "qat")


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


def check_schedule(callbacks: list[Any]) -> None:
    """Check, before training, that compression callbacks are scheduled in :data:`STAGES` order.

    A compression callback declares ``stage`` (one of STAGES), ``start_step`` (first step it changes the
    student) and ``end_step`` (step by which its structure is final). A later stage must not start before
    an earlier stage has finished; two callbacks of one stage are refused.
    """
    staged = [cb for cb in callbacks if getattr(cb, "stage", None) in STAGES]
    seen: dict[str, Any] = {}
    for cb in staged:
        if cb.stage in seen:
            raise ConfigError(f"callbacks: two {cb.stage!r} callbacks are configured; keep one")
        seen[cb.stage] = cb
    ordered = sorted(staged, key=lambda cb: STAGES.index(cb.stage))
    for i, later in enumerate(ordered):
        for earlier in ordered[:i]:
            if later.start_step < earlier.end_step:
                raise ConfigError(
                    f"callbacks.{later.stage}.start_step={later.start_step}: {later.stage} must start at or after "
                    f"the step where {earlier.stage} finishes (its end_step={earlier.end_step}), because compression "
                    f"runs in the order {' → '.join(STAGES)}; raise start_step or lower {earlier.stage}'s end_step"
                )


def replay(student: nn.Module, changes: list[dict[str, Any]]) -> None:
    """Re-apply recorded changes in order; a kind nobody registered is a clear error."""
    for change in changes:
        kind = change["kind"]
        if kind not in _REPLAYS:
            raise ConfigError(
                f"checkpoint structure kind={kind!r}: the checkpoint was saved after a {kind!r} change to the "
                "student, but no callback that can rebuild it is active; resume with the same callbacks "
                f"(known kinds: {sorted(_REPLAYS) or 'none'})"
            )
        _REPLAYS[kind](student, change["spec"])
