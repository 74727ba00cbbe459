"""A flag for forwards that sample continuations inside a training step (``distill.generation``).

Calibration hooks (pruning importance) run on the training forwards of the steps they collect in; the
student's sampling forwards (prompt prefills, one-token decode steps) happen inside the same step and must not
count. A context variable says which is which without coupling the hooks to the generation code.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_SAMPLING = contextvars.ContextVar("distill_sampling", default=False)


@contextmanager
def sampling() -> Iterator[None]:
    """Mark the forwards run inside the block as sampling forwards."""
    token = _SAMPLING.set(True)
    try:
        yield
    finally:
        _SAMPLING.reset(token)


def generating() -> bool:
    """Whether the current forward samples a continuation (inside :func:`sampling`)."""
    return _SAMPLING.get()
