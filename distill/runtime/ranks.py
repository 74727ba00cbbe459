"""What every rank must agree on under a sharded strategy: one choice made once, and names without wrapper parts.

A leaf module (it imports nothing of ``distill``), so compression code and the strategy helpers can both use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# What FSDP and activation checkpointing insert into the dotted names of the modules they wrap.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """``name`` of a module or tensor as in the unwrapped model (FSDP's and checkpointing's wrapper parts removed)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def is_distributed() -> bool:
    """Whether a process group of more than one rank is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def computed_on_rank_zero(compute: Callable[[], T]) -> T:
    """``compute()`` run on rank 0 only, its (picklable) result sent to every rank; just ``compute()`` alone.

    For what depends on the student's weights before FSDP wraps it: ranks > 0 may hold them empty then
    (:mod:`distill.runtime.rank_zero_load`), and every rank must still make the same choice. A collective.
    """
    if not is_distributed():
        return compute()
    import torch.distributed as dist

    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]
