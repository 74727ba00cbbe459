"""Rebuilding a student's recorded structure changes, so a checkpoint's weights fit it again.

Each compression stage records ``(kind, spec)`` through ``DistillModule.record_structure_change``. A
checkpoint carries that log; on load, :func:`replay` re-applies every change to the fresh student
before the weights go in. The replays live next to their algorithms in :mod:`distill.compress`, so
anything that imports ``distill`` (training, ``evaluate.py``) can rebuild a checkpoint without the
Lightning callbacks that made the changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from distill.config import ConfigError

Replay = Callable[[nn.Module, dict[str, Any]], None]


def _prune(student: nn.Module, spec: dict[str, Any]) -> None:
    from distill.compress.prune.surgery import apply_spec

    apply_spec(student, spec)


def _share(student: nn.Module, spec: dict[str, Any]) -> None:
    from distill.compress.share import apply_sharing

    # The shared values are overwritten by the checkpoint right after, so the cheapest init will do.
    apply_sharing(student, spec, init="first")


def _lowrank(student: nn.Module, spec: dict[str, Any]) -> None:
    from distill.compress.lowrank import factorize

    factorize(student, spec["ranks"])


def _qat(student: nn.Module, spec: dict[str, Any]) -> None:
    from distill.compress.quant.qat import prepare
    from distill.compress.quant.schemes import QuantSpec

    prepare(student, QuantSpec.from_dict(spec))


REPLAYS: dict[str, Replay] = {"prune": _prune, "share": _share, "lowrank": _lowrank, "qat": _qat}


def replay(student: nn.Module, changes: list[dict[str, Any]]) -> None:
    """Re-apply recorded structure changes to ``student`` in order; an unknown kind is a clear error."""
    for change in changes:
        kind = change["kind"]
        if kind not in REPLAYS:
            raise ConfigError(
                f"checkpoint structure kind={kind!r}: this version of distill cannot rebuild a {kind!r} change; "
                f"use the distill version that wrote the checkpoint (known kinds: {sorted(REPLAYS)})"
            )
        REPLAYS[kind](student, change["spec"])
