"""A log of structural changes to the student, so a checkpoint can rebuild the structure it was saved with.

Compression callbacks change the student's shape mid-run (pruning removes rows, sharing ties layers,
low-rank splits linears, QAT swaps modules). A checkpoint's ``state_dict`` only fits a model that went
through the same changes, and Lightning loads the model weights *before* any callback state. So every
change is recorded here as ``(kind, spec)``; the checkpoint carries the list, and on load
:class:`~distill.module.DistillModule` replays it on the fresh student before the weights go in.

Callbacks register how to replay their kind with :func:`register`. This module knows no callback,
which keeps ``distill/`` free of imports from ``callbacks/``.
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
