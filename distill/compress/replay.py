"""Rebuilding a student's recorded structure changes, so a checkpoint's weights fit it again.

Each compression stage records ``(kind, spec)`` through ``DistillModule.record_structure_change``. A
checkpoint carries that log; on load, :func:`replay` re-applies every change to the fresh student
before the weights go in, with each stage's own ``replay`` (:class:`~distill.compress.stages.Stage`, registered
next to its algorithm), so anything that imports ``distill`` (training, ``evaluate.py``) can rebuild a checkpoint
without the Lightning callbacks that made the changes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from distill.compress.stages import registry
from distill.config import ConfigError


def replay(student: nn.Module, changes: list[dict[str, Any]]) -> None:
    """Re-apply recorded structure changes to ``student`` in order; an unknown kind is a clear error."""
    stages = registry()
    for change in changes:
        kind = change["kind"]
        if kind not in stages:
            raise ConfigError(
                f"checkpoint structure kind={kind!r}: this version of distill cannot rebuild a {kind!r} change; "
                f"use the distill version that wrote the checkpoint (known kinds: {sorted(stages)})"
            )
        stages[kind].replay(student, change["spec"])


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
