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

from distill.compress.lowrank import factorize
from distill.compress.prune.surgery import apply_spec
from distill.compress.quant.qat import prepare
from distill.compress.quant.schemes import QuantSpec
from distill.compress.share import apply_sharing
from distill.config import ConfigError

Replay = Callable[[nn.Module, dict[str, Any]], None]

REPLAYS: dict[str, Replay] = {
    "prune": apply_spec,
    # The shared values are overwritten by the checkpoint right after, so the cheapest init will do.
    "share": lambda student, spec: apply_sharing(student, spec, init="first"),
    "lowrank": lambda student, spec: factorize(student, spec["ranks"]),
    # Weight sparsity changes no shape: the zeros are in the checkpoint's weights, the masks in the callback's state.
    "sparsity": lambda _student, _spec: None,
    "qat": lambda student, spec: prepare(student, QuantSpec.from_dict(spec)),
}


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


def rebuilt_student(initial_config: Any, changes: list[dict[str, Any]], dtype: Any = None) -> nn.Module:
    """An untrained student with a run's modules: built from its config as built, then ``changes`` replayed.

    Args:
        initial_config: the student's config before any stage changed it (a ``PretrainedConfig``).
        changes: the run's structure log, in order.
        dtype: the parameters' dtype (None: the config's default).

    """
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(initial_config, dtype=dtype)
    replay(plain, changes)
    return plain
