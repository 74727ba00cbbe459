"""The KL probe that calibrates a byte budget's error curves, for llama.cpp types and torchao grids alike.

A budget (:mod:`~distill.compress.quant.type_map`, :mod:`~distill.compress.quant.grid_budget`) ranks the roundings of
one tensor by llama.cpp's importance-weighted relative error, which ranks them well; across tensors that error counts
every tensor the same, whatever the tensor does to the output. SmolLM2's tied table, one of 211 matrices, rounded to
int3 alone loses more top-1 agreement than all the layer matrices at int3 together (``bench/results/table_bits.md``),
and an unprobed torchao budget gave it two bits (``bench/results/grid_budget.md``). So each tensor is rounded alone
to one probe type, the KL between the model's logits and the unrounded model's is measured on calibration tokens,
and the tensor's whole error curve is scaled to pass through that KL (``type_map.calibrated``): measured at the
probe, following the weighted error elsewhere. One forward per tensor, on ``probe_tokens`` tokens; a tensor inside a
decoder layer is probed from that layer on (:class:`_Suffix`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("distill")

PROBE_TOKENS = 1024  # calibration tokens each probe forward reads: one forward per tensor, so this bounds the cost


def probe_rows(batches: Sequence[torch.Tensor], tokens: int = PROBE_TOKENS) -> list[torch.Tensor]:
    """One batch of about ``tokens`` calibration tokens: rows of at most 256 cut from ``batches``."""
    width = min(256, *(b.shape[-1] for b in batches))
    rows = torch.cat([b[:, :width] for b in batches])
    return [rows[: max(1, tokens // width)]]


def _stack(model: nn.Module) -> tuple[nn.ModuleList, nn.Module, nn.Module] | None:
    """A transformers decoder-only LM's layers, final norm and head (``model.model.layers`` ...), or None."""
    inner = getattr(model, "model", None)
    layers, norm = getattr(inner, "layers", None), getattr(inner, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(layers, nn.ModuleList) and isinstance(norm, nn.Module) and isinstance(head, nn.Module):
        return layers, norm, head
    return None


class _Suffix:
    """The forward from one decoder layer on, replayed from the inputs each layer received in a reference forward.

    A probe rounds one matrix; the layers before the one holding it compute what they computed in the reference
    forward, so only the layers from it on are run again (on average half the layers, plus the head): the same
    arithmetic on the same inputs. :meth:`usable` checks that replaying from layer 0 gives the model's own logits;
    a model that does more after its final norm (soft-capped logits, say) is probed with full forwards instead.
    """

    def __init__(self, model: nn.Module, stack: tuple[nn.ModuleList, nn.Module, nn.Module]) -> None:
        self.model, (self.layers, self.norm, self.head) = model, stack
        self.first = {}  # id(Parameter) -> the first layer that holds it (a shared one: the earliest)
        for i, layer in reversed(list(enumerate(self.layers))):
            self.first.update({id(p): i for p in layer.parameters()})
        self.inputs: list[list[tuple[tuple, dict]]] = []

    def reference(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's logits on ``ids``, recording each layer's inputs for :meth:`replay`."""
        seen: list[tuple[tuple, dict]] = []
        hooks = [
            layer.register_forward_pre_hook(lambda _m, a, k: seen.append((a, k)), with_kwargs=True)
            for layer in self.layers
        ]
        try:  # no cache: a replayed layer must not append its keys to one a second time
            logits = self.model(input_ids=ids, use_cache=False).logits
        finally:
            for h in hooks:
                h.remove()
        self.inputs.append(seen)
        return logits

    def replay(self, batch: int, start: int) -> torch.Tensor:
        """The logits of reference batch ``batch``, recomputed from layer ``start`` on."""
        inputs = self.inputs[batch]
        args, kwargs = inputs[start]
        hidden = args[0] if args else kwargs["hidden_states"]
        for layer, (args, kwargs) in zip(self.layers[start:], inputs[start:], strict=True):
            out = layer(hidden, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": hidden})
            hidden = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(hidden))

    def usable(self, reference: list[torch.Tensor]) -> bool:
        """Whether replaying every layer gives the reference logits (else the probe runs full forwards)."""
        if len(self.inputs) != len(reference) or any(len(seen) != len(self.layers) for seen in self.inputs):
            return False
        return all(
            torch.allclose(self.replay(b, 0).float(), ref.float(), rtol=1e-5, atol=1e-5)
            for b, ref in enumerate(reference)
        )


@torch.no_grad()
def probe_kl(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    roundings: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    batches: Sequence[torch.Tensor],
) -> list[float]:
    """Per Parameter: KL(model ‖ model with that one Parameter rounded by its rounding), nats per token.

    Each rounding is made when its turn comes and undone after, so the probe holds one rounded copy at a time. On a
    transformers decoder-only LM a Parameter inside a decoder layer is probed from that layer on (:class:`_Suffix`).

    Args:
        model: a causal LM returning ``.logits``.
        params: the Parameters to probe.
        roundings: per Parameter, fp32 weight → the rounded weight (same shape).
        batches: token ids the forwards read.

    """
    device = next(model.parameters()).device
    batches = [ids.to(device) for ids in batches]
    tokens = sum(ids.numel() for ids in batches)
    log.info("KL probe: %d tensors, each rounded alone for one forward on %d tokens", len(params), tokens)
    was_training = model.training
    model.eval()
    try:
        stack = _stack(model)
        suffix = _Suffix(model, stack) if stack is not None else None
        if suffix is not None:
            raw = [suffix.reference(ids) for ids in batches]
            suffix = suffix if suffix.usable(raw) else None
        else:
            raw = [model(input_ids=ids).logits for ids in batches]
        reference = [F.log_softmax(r.float(), -1) for r in raw]
        del raw
        out = []
        for param, rounding in zip(params, roundings, strict=True):
            start = suffix.first.get(id(param)) if suffix is not None else None
            kept = param.data.clone()
            param.data.copy_(rounding(kept.float()).to(kept.dtype))
            try:
                now = [
                    F.log_softmax(
                        (model(input_ids=ids).logits if start is None else suffix.replay(b, start)).float(), -1
                    )
                    for b, ids in enumerate(batches)
                ]
            finally:
                param.data.copy_(kept)
            kls = [
                F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).flatten()
                for lp, ref in zip(now, reference, strict=True)
            ]
            out.append(max(0.0, float(torch.cat(kls).mean())))  # float noise can dip a tiny KL below 0
    finally:
        model.train(was_training)
    return out
