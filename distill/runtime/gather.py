"""Gathering a sharded student into one plain model before it leaves training (export, evaluation).

Under FSDP every rank holds a shard of each student parameter, and the student's decoder layers are FSDP
units wrapped in place, so neither ``save_pretrained`` nor an evaluation on rank 0 alone can read it. All
ranks join one full-state-dict gather (a collective: a rank that skips it hangs the others); rank 0 then
loads the gathered weights into a fresh, unwrapped copy of the student's architecture. DDP needs none of
this: every rank holds the whole student.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


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


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``model`` (the strategy's wrapped model) holds FSDP shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return model is not None and any(isinstance(m, FSDP) for m in model.modules())


def gather_student(wrapped: nn.Module, student: nn.Module, prefix: str = "student.") -> nn.Module | None:
    """The trained student as one plain model on rank 0 (``None`` on the other ranks); every rank must call it.

    Args:
        wrapped: the strategy's FSDP-wrapped LightningModule (``trainer.strategy.model``).
        student: the student as the module holds it (its config and dtype are read; its shards are not).
        prefix: the student's key prefix in the module's state dict.

    Raises:
        RuntimeError: the gathered weights do not fit the student's architecture, e.g. after a structural
            change no sharded run supports.

    """
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    with full_state_dict_context(wrapped):
        state = wrapped.state_dict()  # the collective: every rank gathers, rank 0 keeps the result
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    dtype = next(iter(weights.values())).dtype
    plain = AutoModelForCausalLM.from_config(student.config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    # FSDP names a parameter shared by two modules once: the tied output layer comes back with the embedding.
    tied = {"lm_head.weight"} if getattr(student.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"the gathered student does not fit its architecture: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if tied:
        plain.tie_weights()
    plain.generation_config = student.generation_config
    log.info("gathered the sharded student on rank 0 (%d tensors)", len(weights))
    return plain.eval().requires_grad_(False)


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
