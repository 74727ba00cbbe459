"""Changing the shapes of a student that FSDP has wrapped: unwrap, change, wrap again (progressive pruning).

Lightning wraps the model once, before training, and FSDP flattens each unit's parameters into one sharded
buffer, so a pruning step cannot slice a weight in place. Under FSDP, :func:`reshape_sharded` instead

1. gathers each optimizer's state whole on rank 0 (``FSDP.optim_state_dict``, keyed by parameter name);
2. unwraps the module (:func:`unwrap_to_rank_zero`): every unit's parameters whole on rank 0, in host memory,
   and empty (meta) on the other ranks, as at start-up (:mod:`distill.runtime.rank_zero_load`);
3. lets the caller change the student on every rank alike (rank 0 on real tensors, the others on meta ones);
4. wraps it again through the strategy, with the same policy, each unit filled from rank 0 by broadcast;
5. rebuilds the optimizers and schedulers (``DistillModule.rebuild_optimizers``) and loads the carried state:
   the surviving rows and columns of every moment, resharded (``FSDP.optim_state_dict_to_load``).

Memory: rank 0 holds the whole teacher, student and optimizer state in host memory for the length of the
step (what it held at start-up, plus the optimizer state); the other ranks one unit at a time. Time: one
gather and one broadcast of both models per change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from distill.runtime.gather import full_state_dict_context
from distill.runtime.rank_zero_load import own_tensors
from distill.runtime.ranks import clean_name, computed_on_rank_zero

Carry = Mapping[nn.Parameter, tuple[nn.Parameter, Callable[[Tensor], Tensor] | None]]


class RebuildsOptimizers(Protocol):
    """The LightningModule side: ``DistillModule.rebuild_optimizers``."""

    def rebuild_optimizers(self, carry: Carry | None = None) -> None:
        """New optimizers and schedulers over the module's current parameters."""
        ...


@runtime_checkable
class Restructures(Protocol):
    """A LightningModule with a structure log that it replays from a checkpoint (``DistillModule``)."""

    structure: list[dict[str, Any]]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Replay the checkpoint's ``student_structure`` beyond the module's own."""
        ...


def _own_parameters(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owner, name, parameter) for the parameters of ``module`` outside its nested FSDP units."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    stop = lambda m: isinstance(m, FSDP)  # noqa: E731 - the nested units hold their own
    return [(owner, name, getattr(owner, name)) for owner, name, is_param in own_tensors(module, stop) if is_param]


Made = dict[int, tuple[nn.Parameter, nn.Parameter]]


def _unwrap_unit(unit: nn.Module, rank0: bool, made: Made) -> None:
    """Give the modules inside one FSDP unit whole Parameters (rank 0) or empty ones of the whole shape.

    ``made``: id of an FSDP parameter → (it, its replacement); it keeps the old ones alive, so an id is not
    reused while the walk goes on, and a parameter held twice (tied) is replaced once.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    entries = _own_parameters(unit.module)  # the sharded parameters, as registered outside a gather
    first = {}
    for owner, name, param in entries:
        if id(param) not in made:
            first.setdefault(id(param), (owner, name, param))
    owned = [param for _, _, param in first.values()]
    offload = any(p.device.type != "cpu" for p in owned)  # to host memory; CPU shards are cloned as they are
    with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True, offload_to_cpu=offload):
        # Read through the modules: inside the gather they may hold other Parameter objects (the whole views).
        values = [getattr(owner, name).detach().clone() for owner, name, _ in first.values()] if rank0 else []
    kinds = computed_on_rank_zero(lambda: [(tuple(v.shape), v.dtype) for v in values])
    for i, param in enumerate(owned):
        value = values[i] if rank0 else torch.empty(kinds[i][0], dtype=kinds[i][1], device="meta")
        made[id(param)] = (param, nn.Parameter(value, requires_grad=param.requires_grad))
    for owner, name, param in entries:
        setattr(owner, name, made[id(param)][1])


def unwrap_to_rank_zero(wrapped: nn.Module) -> nn.Module:
    """The module inside FSDP ``wrapped``, its units removed: whole parameters on rank 0, meta ones elsewhere.

    A collective. Rank 0's parameters are in host memory; buffers are kept as they are on every rank.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    rank0 = dist.get_rank() == 0
    made: Made = {}
    for unit in [m for m in wrapped.modules() if isinstance(m, FSDP)]:
        _unwrap_unit(unit, rank0, made)
    nested = [(p, n, c) for p in wrapped.modules() for n, c in p.named_children() if isinstance(c, FSDP)]
    for parent, name, unit in nested:
        setattr(parent, name, unit.module)
    return wrapped.module


def _names(model: nn.Module) -> dict[nn.Parameter, str]:
    return {p: clean_name(n) for n, p in model.named_parameters()}


def _carried_state(
    osd: dict[str, Any], before: dict[nn.Parameter, str], after: dict[nn.Parameter, str], carry: Carry
) -> dict[str, Any]:
    """``osd`` (whole, by name) moved to the changed parameters: sliced through ``carry``, renamed."""
    state = {}
    for param, name in after.items():
        source, fn = carry.get(param, (param, None))
        old = osd["state"].get(before.get(source, ""))
        if old is not None:
            state[name] = {
                k: fn(v) if fn is not None and torch.is_tensor(v) and v.dim() > 0 else v for k, v in old.items()
            }
    return {"state": state, "param_groups": osd["param_groups"]}


def _load_optimizer_state(trainer: Any, osds: list[dict[str, Any]], before: dict, after: dict, carry: Carry) -> None:
    """Load the carried whole state into the rebuilt optimizers, resharded; their hyperparameters stay."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = trainer.strategy.model
    names = _names(wrapped)
    for optimizer, osd in zip(trainer.optimizers, osds, strict=True):
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        if dist.get_rank() == 0:
            osd = _carried_state(osd, before, after, carry)
            osd["param_groups"] = [
                {**g, "params": [names[p] for p in group["params"]]}
                for g, group in zip(groups, optimizer.param_groups, strict=True)
            ]
        with full_state_dict_context(wrapped):
            optimizer.load_state_dict(FSDP.optim_state_dict_to_load(wrapped, optimizer, osd))
        for group, hyper in zip(optimizer.param_groups, groups, strict=True):
            group.update(hyper)  # the rates rebuild_optimizers set from the schedulers


def reshape_sharded(
    trainer: Any, module: RebuildsOptimizers, change: Callable[[], Carry], optimizers: bool = True
) -> None:
    """Change the student of an FSDP-wrapped ``module`` on every rank and wrap it again; a collective.

    Args:
        trainer: the Lightning trainer (its strategy wraps the module again, its optimizers are rebuilt).
        module: the LightningModule (``trainer.lightning_module``).
        change: changes the unwrapped module in place, alike on every rank (rank 0's parameters are whole,
            the others' empty); returns new parameter → (old parameter, function slicing its state tensors).
        optimizers: carry the optimizer state over (False: fresh optimizers, e.g. before a checkpoint loads).

    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    strategy = trainer.strategy
    wrapped = strategy.model
    osds = []
    if optimizers:
        with full_state_dict_context(wrapped):
            osds = [FSDP.optim_state_dict(wrapped, opt) for opt in trainer.optimizers]
    inner = unwrap_to_rank_zero(wrapped)
    before = _names(inner)
    carry = change()
    after = _names(inner)
    strategy.model = strategy._setup_model(inner)  # the strategy's own wrapping: policy, rank-0 fill
    if optimizers:
        module.rebuild_optimizers()
        _load_optimizer_state(trainer, osds, before, after, carry)
    else:
        strategy.setup_optimizers(trainer)


def reshape(trainer: Any, module: RebuildsOptimizers, change: Callable[[], Carry]) -> None:
    """Change the student's shapes under any strategy pruning supports, keeping the surviving optimizer state.

    FSDP: :func:`reshape_sharded`. One device or DDP: ``change`` in place, a fresh DDP wrapper (its reducer holds
    the old parameters and their buckets; Lightning's ``configure_ddp`` wraps ``strategy.model`` again and
    broadcasts rank 0's weights, identical since every rank changed alike), then the optimizers rebuilt.
    """
    from lightning.pytorch.strategies import DDPStrategy

    from distill.runtime.gather import is_fsdp_wrapped

    strategy = trainer.strategy
    if is_fsdp_wrapped(strategy.model):
        reshape_sharded(trainer, module, change)
        return
    carry = change()
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
    module.rebuild_optimizers(carry)


def _saved_structure(path: Any) -> list[dict[str, Any]] | None:
    """The structure log of a checkpoint file (None for a folder, or a file without one)."""
    if not Path(path).is_file():
        return None
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("student_structure")


def restructure_for_checkpoint(trainer: Any, path: Any) -> None:
    """Under FSDP, rebuild the structure changes a checkpoint holds and the wrapped student lacks; a collective.

    A resumed pruning run: Lightning loads an FSDP checkpoint into the model it wrapped at start-up, but the
    checkpoint's student was pruned after that, so its shapes are rebuilt first (the structure log replayed on
    the unwrapped student, then wrapped again with fresh optimizers, whose state Lightning then loads).
    """
    module = trainer.lightning_module
    saved = computed_on_rank_zero(lambda: _saved_structure(path))
    if saved is None or not isinstance(module, Restructures) or saved == module.structure:
        return

    def replay() -> Carry:
        module.on_load_checkpoint({"student_structure": saved})
        return {}

    reshape_sharded(trainer, module, replay, optimizers=False)
