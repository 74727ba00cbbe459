"""Gathering a sharded student into one plain model before it leaves training (export, evaluation).

Under FSDP every rank holds a shard of each student parameter, and the student's decoder layers are FSDP
units wrapped in place, so neither ``save_pretrained`` nor an evaluation on rank 0 alone can read it. All
ranks join one full-state-dict gather (a collective: a rank that skips it hangs the others); rank 0 then
loads the gathered weights into a fresh, unwrapped copy of the student's architecture.

Under DeepSpeed ZeRO-3 each parameter is an empty placeholder whose 1/N partition sits in ``ds_tensor``; the
fp32 master copy of each trainable one lives in the optimizer's partitions. Every rank joins one gather per
parameter: DeepSpeed's ``safe_get_full_fp32_param`` for the trainable ones (the fp32 masters, as FSDP's full
state dict holds them, not the bf16 copies the forward used), ``deepspeed.zero.GatheredParameters`` for the
rest. DDP and ZeRO-2 need none of this: every rank holds the whole student.

A compression stage whose last step reads whole weights (QAT's convert rounds every row) runs that step on
the gathered student, not on the shards: :class:`FinishesGathered`, called by :func:`finish_gathered`.
During training, :func:`params_whole` makes a module's parameters (and gradients) whole on every rank for a
moment (QAT's frozen ranges, pruning's Taylor scores read them), and :func:`computed_on_rank_zero` hands every
rank what rank 0 computed from the whole student when the other ranks hold it empty (QAT's byte-budgeted type
map, low-rank's ranks, a pruning step's choice).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol, runtime_checkable

from torch import nn

from distill.runtime.rank_zero_load import shared_parameter_names

log = logging.getLogger(__name__)


@runtime_checkable
class FinishesGathered(Protocol):
    """A compression stage whose last step needs whole weights, so under FSDP or ZeRO-3 it runs after the gather."""

    def finish_gathered(self, student: nn.Module) -> None:
        """Finish on ``student``, the gathered plain student on rank 0 (QAT converts it here, not on shards)."""
        ...


def finish_gathered(student: nn.Module, stages: Iterable[Any]) -> None:
    """Let every stage that needs whole weights finish on the gathered ``student`` (rank 0 only), in stage order."""
    for stage in stages:
        if isinstance(stage, FinishesGathered):
            stage.finish_gathered(student)


@contextmanager
def params_whole(wrapped: nn.Module | None, module: nn.Module, with_grads: bool = False) -> Iterator[None]:
    """Every parameter of ``module`` whole on every rank inside the block, read-only; a collective.

    ``wrapped`` is the strategy's model. Under FSDP each unit inside ``module``, and the root unit (which holds
    the student's embeddings, final norm and output layer), gathers its own parameters (``recurse=False``), so
    the teacher's units stay sharded; under ZeRO-3 ``module``'s partitions are gathered. Writes are not kept.
    ``with_grads`` (FSDP): the gradients too, as ``.grad``. Memory: the whole of ``module`` (and its gradients)
    on every rank for the length of the block.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with ExitStack() as stack:
        if is_fsdp_wrapped(wrapped):
            units = [m for m in module.modules() if isinstance(m, FSDP)]
            for unit in [wrapped, *units] if isinstance(wrapped, FSDP) else units:
                stack.enter_context(
                    FSDP.summon_full_params(unit, recurse=False, writeback=False, with_grads=with_grads)
                )
        elif is_partitioned(module):
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None))
        yield


def full_state_dict_context(model: nn.Module) -> Any:
    """FSDP's full-state-dict context: gathered on rank 0 only, copied to host memory when shards are on a GPU.

    Shards already in host memory (``trainer=fsdp_sim``) are not "offloaded": torch would then hand out views
    of the gathered buffer that it frees before the state dict copies them, and the copy crashes the process
    (a segmentation fault in FSDP's clone), so the tensors are cloned as they are.
    """
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    offload = any(p.device.type != "cpu" for p in model.parameters())
    return FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
    )


def is_partitioned(model: nn.Module | None) -> bool:
    """Whether ``model`` holds DeepSpeed ZeRO-3 placeholders (parameters partitioned across ranks)."""
    return model is not None and any(hasattr(p, "ds_id") for p in model.parameters())


def is_fsdp_wrapped(model: nn.Module | None) -> bool:
    """Whether ``model`` (the strategy's wrapped model) holds FSDP units."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return model is not None and any(isinstance(m, FSDP) for m in model.modules())


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``model`` (the strategy's wrapped model) holds FSDP shards or ZeRO-3 partitions."""
    return is_fsdp_wrapped(model) or is_partitioned(model)


def local_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters this rank holds: its shard under FSDP, its partition under ZeRO-3."""
    return sum((t := getattr(p, "ds_tensor", p)).numel() * t.element_size() for p in model.parameters())


def zero3_state_dict(student: nn.Module) -> dict[str, Any] | None:
    """The ZeRO-3-partitioned ``student``'s full state dict in host memory on rank 0 (None elsewhere).

    A collective: every rank must call it, and each parameter is gathered in turn, so no more than one whole
    parameter is held on the device at a time. Trainable parameters come back as their fp32 master copies.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    # Lightning's teardown moved the module to the CPU after fit, which moves only the empty placeholders; the
    # partitions stayed where DeepSpeed put them, and its all-gather allocates on the placeholder's device.
    partition = next((p.ds_tensor for p in student.parameters() if hasattr(p, "ds_tensor")), None)
    if partition is not None:
        student.to(partition.device)
    state: dict[str, Any] = {}
    for name, param in student.named_parameters():
        full = None
        if param.requires_grad and hasattr(param, "_z3_optimizer"):
            full = safe_get_full_fp32_param(param)  # every rank gets the whole fp32 tensor
            full = full.view(param.ds_shape) if full is not None else None
        if full is None:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full = param.data.detach().clone() if rank0 else None
        if rank0:
            state[name] = full.detach().to("cpu", copy=True)
    if not rank0:
        return None
    for prefix, module in student.named_modules():  # ZeRO-3 leaves buffers whole; only persistent ones are saved
        for key, buf in module.named_buffers(recurse=False):
            if buf is not None and key not in module._non_persistent_buffers_set:
                state[f"{prefix}.{key}" if prefix else key] = buf.detach().cpu()
    return state


def gather_student(
    wrapped: nn.Module,
    student: nn.Module,
    fresh: Callable[[Any], nn.Module] | None = None,
    prefix: str = "student.",
) -> nn.Module | None:
    """The trained student as one plain model on rank 0 (``None`` on the other ranks); every rank must call it.

    Args:
        wrapped: the strategy's wrapped LightningModule (``trainer.strategy.model``: FSDP, or DeepSpeed's engine).
        student: the student as the module holds it (its config is read; under ZeRO-3 its partitions are
            gathered, under FSDP the wrapped module's full state dict is).
        fresh: builds an untrained student of the trained one's modules for a dtype (a resumed run's structure
            log replayed onto the config as built, QAT's fake-quant modules included:
            :func:`distill.compress.replay.rebuilt_student`). None: the plain architecture of ``student.config``.
        prefix: the student's key prefix in the module's state dict (FSDP).

    Raises:
        RuntimeError: the gathered weights do not fit the student's architecture, e.g. after a structural
            change no sharded run supports.

    """
    import torch.distributed as dist

    if is_partitioned(student):
        weights = zero3_state_dict(student)
    else:
        with full_state_dict_context(wrapped):
            state = wrapped.state_dict()  # the collective: every rank gathers, rank 0 keeps the result
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    assert weights is not None  # rank 0 holds the gathered weights
    dtype = next(iter(weights.values())).dtype
    plain = fresh(dtype) if fresh is not None else _plain_student(student, dtype)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    # FSDP and named_parameters name a parameter shared by two modules once: the tied output layer comes back
    # with the embedding, a layer shared by cross-layer sharing with its group's first member.
    tied = {"lm_head.weight"} if getattr(student.config, "tie_word_embeddings", False) else set()
    loaded = set(weights)
    aliases = {n for group in shared_parameter_names(plain) if loaded & set(group) for n in group}
    if unexpected or set(missing) - tied - aliases:
        raise RuntimeError(
            f"the gathered student does not fit its architecture: missing {sorted(set(missing) - tied - aliases)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if tied:
        plain.tie_weights()
    plain.generation_config = student.generation_config
    log.info("gathered the sharded student on rank 0 (%d tensors, %s)", len(weights), dtype)
    return plain.eval().requires_grad_(False)


def _plain_student(student: nn.Module, dtype: Any) -> nn.Module:
    """An untrained model of ``student``'s architecture as its config now stands."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(student.config, dtype=dtype)


def own_params_gathered(module: nn.Module) -> Any:
    """A context in which an FSDP unit's own parameters are whole, outside that unit's forward; a no-op otherwise.

    The chunked loss runs the teacher's body (``base_model``) and its output layer chunk by chunk, not through
    the teacher unit's ``forward``, so FSDP never gathers that unit's own parameters (embeddings, final norm,
    output layer): they stay flat shards. Gathering them once for the whole loss costs one all-gather per step,
    as a forward would; the decoder layers inside stay separate units that gather themselves. Only for a
    frozen unit: nothing is written back, and gradients never reach it.
    """
    from contextlib import nullcontext

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not isinstance(module, FSDP):
        return nullcontext()
    return FSDP.summon_full_params(module, recurse=False, writeback=False)
