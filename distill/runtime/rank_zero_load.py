"""Load the teacher once, on rank 0, and give every other FSDP rank only its shards.

Without this every rank reads the whole teacher before FSDP shards it, so a 70B teacher on 8 ranks needs
8 × 140 GB of host memory for a moment. Here only global rank 0 reads the checkpoint. Every other rank builds
the same modules with their parameters on the meta device (:func:`empty_weights`; buffers stay real, so
rotary tables are computed as usual), which costs no memory. When FSDP wraps the model, each unit is filled
from rank 0 by broadcast just before FSDP flattens and shards it (:func:`filling_policy`), so a rank holds at
most one unit whole at a time, then only its shard.

torch's own way, ``sync_module_states=True`` with a ``param_init_fn``, does the same per unit but refuses
tensors in host memory, and so cannot run under ``trainer=fsdp_sim``; one code path for both is the one the
CPU tests can check. The student is built the same way on the other ranks (it is copied from the teacher,
or seeded) and receives rank 0's weights in the same broadcast, so every rank starts from rank 0's model.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

_EMPTY = False  # set by empty_weights(): checkpoints are not read, parameters are created on the meta device


def launch_rank() -> int:
    """The global rank the launcher gave this process, before any process group exists (0 if none did)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key):
            return int(os.environ[key])
    # Lightning's own launcher starts ranks > 0 with LOCAL_RANK and NODE_RANK set.
    local, node = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("NODE_RANK", 0))
    return local if node == 0 else node * 1_000_000 + local  # any node > 0 is not rank 0


def peak_host_mib() -> float:
    """Peak resident memory of this process, in MiB, since it started its program.

    Linux's ``VmHWM``, not ``getrusage``'s ``ru_maxrss``: the latter survives ``execve``, so a rank that
    Lightning launched from rank 0 would report rank 0's peak at launch time as its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource  # not Linux: the closest measure there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def weights_are_empty() -> bool:
    """Whether models built now must skip reading weights (inside :func:`empty_weights`)."""
    return _EMPTY


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build models with parameters on the meta device and without reading any checkpoint's weights."""
    from accelerate import init_empty_weights

    global _EMPTY
    before, _EMPTY = _EMPTY, True
    try:
        with init_empty_weights(include_buffers=False):
            yield
    finally:
        _EMPTY = before


def tie_again(*models: nn.Module) -> None:
    """Restore the tied embeddings of models built inside :func:`empty_weights`.

    accelerate's ``init_empty_weights`` wraps every parameter registered under it in a new meta Parameter,
    so the output layer that transformers ties to the embedding ends up a separate tensor. Rank 0's models
    are tied; the filling broadcast pairs tensors by walking the modules, so the other ranks must be too.
    """
    for model in models:
        config = getattr(model, "config", None)
        if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def own_tensors(module: nn.Module, stop: Callable[[nn.Module], bool]) -> Iterator[tuple[nn.Module, str, bool]]:
    """(owner, name, is_parameter) for every tensor under ``module``, not descending into modules ``stop`` takes."""
    pending = [module]
    while pending:
        current = pending.pop(0)
        for name, _ in current.named_parameters(recurse=False):
            yield current, name, True
        for name, _ in current.named_buffers(recurse=False):
            yield current, name, False
        pending.extend(child for child in current.children() if not stop(child))


def broadcast_from_rank_zero(module: nn.Module, device: torch.device, stop: Callable[[nn.Module], bool]) -> None:
    """Give every rank rank 0's values of ``module``'s tensors (not inside modules ``stop`` takes), in place.

    A meta tensor is first made real on ``device``; every rank walks the modules in the same order, so the
    broadcasts pair up. A parameter shared by two modules (tied embeddings) is made and sent once.
    """
    import torch.distributed as dist

    made: dict[int, torch.Tensor] = {}
    for owner, name, is_param in own_tensors(module, stop):
        tensor = getattr(owner, name)
        if id(tensor) in made:
            setattr(owner, name, made[id(tensor)])
            continue
        value = torch.empty_like(tensor, device=device) if tensor.is_meta else tensor.data.to(device)
        dist.broadcast(value, src=0)
        new = nn.Parameter(value, requires_grad=tensor.requires_grad) if is_param else value
        made[id(tensor)] = new
        if is_param:
            setattr(owner, name, new)
        else:
            owner._buffers[name] = new  # keeps the buffer's persistence flag


def filling_policy(policy: Callable[..., bool], device: torch.device) -> Callable[..., bool]:
    """``policy`` (an FSDP auto-wrap function), which also fills each unit from rank 0 just before it is wrapped.

    torch wraps bottom-up and asks the policy about a module only after wrapping its sub-units, so the module's
    remaining tensors are exactly the unit's own: they are broadcast whole, then flattened and sharded.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def wrap(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        decision = policy(module=module, recurse=recurse, nonwrapped_numel=nonwrapped_numel)
        if decision and not recurse:
            broadcast_from_rank_zero(module, device, stop=lambda m: isinstance(m, FSDP))
        return decision

    return wrap


def shared_parameter_names(model: nn.Module) -> list[list[str]]:
    """The groups of dotted names under which ``model`` holds one Parameter twice or more (a tied head...)."""
    groups: dict[int, set[str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            groups.setdefault(id(param), set()).add(f"{prefix}.{name}" if prefix else name)
    return [sorted(names) for names in groups.values() if len(names) > 1]


def match_ties(model: nn.Module) -> None:
    """Tie ``model``'s parameters on every rank as rank 0's are tied; a collective.

    A change made to a model built empty may not keep its ties: torchao's fake-quant modules, built from a
    meta module, take new meta Parameters instead of the module's (QAT prepared before wrapping), so a tied
    embedding and head come apart on ranks > 0 only, and the filling broadcasts would no longer pair up.
    """
    from distill.runtime.ranks import computed_on_rank_zero

    for names in computed_on_rank_zero(lambda: shared_parameter_names(model)):
        shared = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)


def prepare_rank_zero_load(model: nn.Module, kwargs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """FSDP keyword arguments that fill ``model`` from rank 0 while wrapping it, when any rank built it empty.

    Every rank must call this (one all-reduce; when a rank built it empty, ties are matched to rank 0's first,
    :func:`match_ties`). The tensors outside every unit (the root's: the student's
    embeddings, final norm and output layer, the objective's) are broadcast here, before wrapping.
    """
    import torch.distributed as dist

    empty = torch.tensor([float(has_meta_tensors(model))], device=device)
    dist.all_reduce(empty, op=dist.ReduceOp.MAX)
    if not empty.item():
        return dict(kwargs)
    match_ties(model)
    policy = kwargs["auto_wrap_policy"]
    root_only = lambda m: policy(module=m, recurse=False, nonwrapped_numel=0)  # noqa: E731 - the units wrap later
    broadcast_from_rank_zero(model, device, stop=root_only)
    return {**kwargs, "auto_wrap_policy": filling_policy(policy, device)}
