"""A KD + CE loss computed from final hidden states and the output layer, chunk by chunk over tokens.

For LLMs the logits dominate memory: B·T·V floats for the student and again for the teacher (at V = 128k
and 8k tokens per step, 4 GB each in float32, plus as much again for their gradients). Here neither
model's full logits tensor ever exists: each chunk of ``chunk_size`` token rows goes through the output
layer, is scored, and is differentiated on the spot, and only the gradients with respect to the
student's hidden states and output-layer parameters are kept (sizes N·d and V·d, the latter being the
size of the parameter's own gradient). Backward then only scales them.

This is the idea of Liger's fused-linear losses, written in plain PyTorch so that it runs on the CPU,
for every divergence in :mod:`distill.objective.divergences`, and for any output layer (a plain Linear, a fake-quantized
one, one with LoRA): the per-chunk gradients come from autograd on the chunk, so nothing is
hand-derived. A fake-quantized head's weight is rounded once per loss, not once per chunk, and the chunks'
summed gradient goes once through the quantizer's backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from distill.objective.divergences import IGNORE_INDEX

# rows → teacher logits (or log-probabilities) for the token rows [start, stop), over the shared vocabulary
TeacherRows = Callable[[int, int], Tensor]
# (student logits, teacher logits, labels, KD mask or None) of one chunk → (CE sum, KD sum) over its real tokens
ChunkTerms = Callable[[Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]]


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        settings: tuple,
        hidden: Tensor,
        *params: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        head, labels, kd_mask, teacher_rows, terms, (w_ce, w_kd), vocab, chunk_size, compute_grad = settings
        n_ce = (labels != IGNORE_INDEX).sum().clamp_min(1).to(torch.float32)
        n_kd = n_ce if kd_mask is None else kd_mask.sum().clamp_min(1).to(torch.float32)
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if compute_grad else None
        grad_params = [torch.zeros_like(p) if p.requires_grad else None for p in params] if compute_grad else []
        linear = _linear_weight(head, compute_grad)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            y, m = labels[start:stop], None if kd_mask is None else kd_mask[start:stop]
            t_logits = teacher_rows(start, stop)
            if linear is not None:
                # A Linear head (plain, or with a fake-quantized weight): differentiate only w.r.t. the chunk's
                # logits and accumulate the weight gradient in place, so no V×d temporary is allocated per
                # chunk, and a fake-quantized weight is rounded once per loss, not per chunk.
                h = hidden[start:stop]
                weight, bias = linear[0], head.bias
                with torch.enable_grad():
                    z = nn.functional.linear(h.detach(), weight, bias)[:, :vocab].detach()
                    ce, kd = terms(z.requires_grad_(compute_grad), t_logits, y, m)
                    if compute_grad:
                        (dz,) = torch.autograd.grad(w_ce * ce / n_ce + w_kd * kd / n_kd, z)
                if compute_grad:
                    _accumulate(dz.to(h.dtype), h, weight, bias, grad_hidden[start:stop], grad_params, vocab)
            else:
                with torch.enable_grad():
                    h = hidden[start:stop].detach().requires_grad_(compute_grad)
                    z = head(h)[:, :vocab]
                    ce, kd = terms(z, t_logits, y, m)
                    if compute_grad:
                        wrt = [h, *(p for p in params if p.requires_grad)]
                        grads = iter(torch.autograd.grad(w_ce * ce / n_ce + w_kd * kd / n_kd, wrt, allow_unused=True))
                        grad_hidden[start:stop] = next(grads)
                        for acc in grad_params:
                            if acc is not None:
                                g = next(grads)
                                if g is not None:
                                    acc += g
            ce_sum += ce.detach()
            kd_sum += kd.detach()
        if linear is not None and linear[1] is not None and grad_params[0] is not None:
            # The summed gradient w.r.t. the rounded weight, through the weight's fake quantizer.
            with torch.enable_grad():
                (grad_params[0],) = torch.autograd.grad(linear[1], head.weight, grad_params[0])
        ctx.save_for_backward(grad_hidden, *[g for g in grad_params if g is not None])
        ctx.param_has_grad = [g is not None for g in grad_params] if compute_grad else [False] * len(params)
        ctx.compute_grad = compute_grad
        ce_mean, kd_mean = ce_sum / n_ce, kd_sum / n_kd
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return w_ce * ce_mean + w_kd * kd_mean, ce_mean, kd_mean

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *_: Tensor) -> tuple:
        if not ctx.compute_grad:
            raise RuntimeError("chunked loss: backward through a forward that was computed without gradients")
        grad_hidden, *saved = ctx.saved_tensors
        # Scale in place: these buffers exist only for this backward, so no second copy is needed.
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            for g in (grad_hidden, *saved):
                g.mul_(grad_loss.to(g.dtype))
        saved_iter = iter(saved)
        grads = [next(saved_iter) if has else None for has in ctx.param_has_grad]
        return (None, grad_hidden, *grads)


def _accumulate(
    dz: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, grad_h: Tensor, grad_params: list, vocab: int
) -> None:
    """Add one chunk's gradients of a Linear head, given those w.r.t. its first ``vocab`` logits ``dz``, in place."""
    torch.matmul(dz, weight[:vocab], out=grad_h)
    if grad_params[0] is not None:
        grad_params[0][:vocab].addmm_(dz.T, h)
    if bias is not None and grad_params[1] is not None:
        grad_params[1][:vocab] += dz.sum(0)


def _linear_weight(head: nn.Module, compute_grad: bool) -> tuple[Tensor, Tensor | None] | None:
    """The weight ``W'`` of a head whose logits are ``linear(h, W', bias)``, or None for any other head.

    Returned as ``W'`` detached, and ``W'`` with its graph to ``head.weight`` when ``W'`` is computed from it
    (a fake-quantized weight) and a gradient is wanted. That holds for a plain ``nn.Linear`` (``W' = weight``)
    and for torchao's ``FakeQuantizedLinear`` rounding no activations (``W'`` = the weight fake quantizer's
    output). Others (LoRA, activation quantizers) take autograd's path through the module, chunk by chunk.
    """
    if type(head) is nn.Linear:
        return head.weight, None
    from torchao.quantization.qat.linear import FakeQuantizedLinear  # lazily: only fake-quantized heads need it

    if type(head) is not FakeQuantizedLinear or head.activation_fake_quantizer is not None:
        return None
    if head.weight_fake_quantizer is None:
        return head.weight, None
    if [id(p) for p in head.parameters()] != [id(p) for p in (head.weight, head.bias) if p is not None]:
        return None  # parameters of its own beyond weight and bias (a learned quantizer range): autograd's path
    # Round once per loss, not per chunk: the head of a tied embedding is the largest matrix of a small model,
    # and rounding it for each chunk cost more than the rest of the step on CPU. The chunks' gradients w.r.t.
    # the rounded weight are summed, then sent once through the quantizer's own backward (straight-through, or
    # torchao's clamped estimator) to the latent weight.
    wants_grad = compute_grad and head.weight.requires_grad
    with torch.set_grad_enabled(wants_grad):
        rounded = head.weight_fake_quantizer(head.weight)
    if wants_grad and not rounded.requires_grad:
        return None  # a quantizer that cuts the gradient: the weight gets none, as autograd's path gives
    return rounded.detach(), (rounded if wants_grad else None)


def chunked_distill_loss(
    hidden: Tensor,
    head: nn.Module,
    labels: Tensor,
    teacher_rows: TeacherRows,
    terms: ChunkTerms,
    weights: tuple[float, float],
    vocab: int,
    chunk_size: int = 1024,
    kd_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``w_ce·mean CE + w_kd·mean KD`` over real tokens, without materialising B·T·V logits.

    Args:
        hidden: student final hidden states, ``(N, d)`` rows already aligned with ``labels``.
        head: the student's output layer; its parameters receive gradients.
        labels: ``(N,)`` next-token labels, ``-100`` where nothing is predicted.
        teacher_rows: the teacher's logits for rows ``[start, stop)`` (computed or looked up lazily).
        terms: per-chunk (CE sum, KD sum) of student logits, teacher logits and labels.
        weights: (w_ce, w_kd), e.g. ``(1-α, α·T²)`` (``α·T`` for TVD).
        vocab: the shared vocabulary compared.
        chunk_size: token rows per chunk; the extra memory is a few ``chunk_size × V`` float tensors.
        kd_mask: ``(N,)`` rows the KD term averages over; None = the rows with a label. It differs when the CE
            term skips tokens the KD term keeps (a student's own generated tokens, :mod:`distill.data.generation`).

    Returns:
        ``(loss, ce, kd)``; only ``loss`` carries gradients (to ``hidden`` and the head's parameters).

    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    params = list(head.parameters())
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    settings = (head, labels, kd_mask, teacher_rows, terms, weights, vocab, chunk_size, compute_grad)
    return _ChunkedLoss.apply(settings, hidden, *params)


def chunkable(model: Any) -> bool:
    """Whether a causal LM's logits are exactly ``output_layer(base_model(x).last_hidden_state)``."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(head, nn.Module) and getattr(model, "base_model", None) is not None
