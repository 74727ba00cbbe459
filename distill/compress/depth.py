"""Which decoder layers a shallower copy of a model should keep, by measured importance (ShortGPT-style).

Two scores per layer, both measured on calibration text with the model frozen:

* :func:`block_influence` (ShortGPT, Men et al. 2024): ``BI_i = 1 - E[cos(x_i, x_{i+1})]`` between the
  hidden state entering layer ``i`` and the one leaving it. A layer that barely turns the residual stream
  (BI ≈ 0) is close to an identity and cheap to remove. One forward pass in all.
* :func:`drop_loss`: the next-token cross-entropy of the model with that one layer skipped. The most
  direct measure of what removing it costs, at one forward pass per layer.

For both, a higher score means a more important layer; :func:`choose_layers` keeps the highest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.compress.layers import decoder_layers

Batch = Tensor | Mapping[str, Tensor]
Scorer = Callable[[nn.Module, Sequence[Batch]], list[float]]


def _unpack(batch: Batch, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """``(input_ids, attention_mask or None)`` of a batch given as ids alone or as a dict, on ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device), None
    mask = batch.get("attention_mask")
    return batch["input_ids"].to(device), None if mask is None else mask.to(device)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the measurement, the model's previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check_batches(batches: Sequence[Batch]) -> None:
    if len(batches) == 0:
        raise ValueError("layer importance needs at least one calibration batch")


def block_influence(model: nn.Module, batches: Sequence[Batch]) -> list[float]:
    """Per decoder layer, the mean over real tokens of ``1 - cos(layer input, layer output)``.

    The hidden states are taken by forward hooks on the decoder layers rather than from
    ``output_hidden_states``, whose last entry (in Hugging Face Llama) has the final norm applied and
    so is not the last layer's output.

    Args:
        model: a causal LM with its decoder layers at ``model.model.layers`` (the Llama family).
        batches: calibration batches: ``input_ids`` tensors, or dicts with ``input_ids`` and optionally
            ``attention_mask`` (padding positions are left out of the mean).

    Returns:
        One score per layer, in layer order; higher means the layer changes the stream more.

    """
    _check_batches(batches)
    layers = decoder_layers(model, field="model")
    device = next(model.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    mask_now: list[Tensor | None] = [None]  # the current batch's mask, read by the hooks

    def hook(index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output  # older transformers return a tuple
            # float32: in bf16, cosines near 1 round to exactly 1 and every quiet layer would score 0.
            distance = 1.0 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            mask = mask_now[0]
            sums[index] += float(distance.sum() if mask is None else distance[mask].sum())

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with _frozen(model):
            for batch in batches:
                ids, mask = _unpack(batch, device)
                mask_now[0] = None if mask is None else mask.bool()
                count += ids.numel() if mask is None else int(mask.bool().sum())
                # The decoder alone: the hooks have what they need, the output head's logits are not.
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count, 1)).tolist()


def mean_next_token_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """The model's next-token cross-entropy, averaged over every predicted real token of all batches."""
    _check_batches(batches)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with _frozen(model):
        for batch in batches:
            ids, mask = _unpack(batch, device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            targets = ids[:, 1:]
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            if mask is not None:  # a target counts when it and the token predicting it are both real
                keep = (mask[:, 1:].bool() & mask[:, :-1].bool()).flatten()
                losses = losses[keep]
            total += float(losses.sum())
            count += losses.numel()
    return total / max(count, 1)


@contextmanager
def without_layer(model: nn.Module, index: int) -> Iterator[None]:
    """Run ``model`` with decoder layer ``index`` removed, restoring it (and the config) afterwards.

    The stack is swapped for a shorter ``ModuleList`` and ``num_hidden_layers`` (and ``layer_types``,
    where the config has one) shortened to match, since the forward loops over
    ``layers[:num_hidden_layers]``. The remaining layers keep their ``layer_idx``, which only the
    KV cache reads: measure with ``use_cache=False``.
    """
    owner = model.model  # decoder_layers has checked that model.model.layers exists
    original = decoder_layers(model, field="model")
    configs = {id(c): c for c in (getattr(model, "config", None), getattr(owner, "config", None)) if c is not None}
    saved = [(c, c.num_hidden_layers, getattr(c, "layer_types", None)) for c in configs.values()]
    owner.layers = nn.ModuleList(layer for i, layer in enumerate(original) if i != index)
    for config, depth, types in saved:
        config.num_hidden_layers = depth - 1
        if types is not None:
            config.layer_types = [t for i, t in enumerate(types) if i != index]
    try:
        yield
    finally:
        owner.layers = original
        for config, depth, types in saved:
            config.num_hidden_layers = depth
            if types is not None:
                config.layer_types = types


def drop_loss(model: nn.Module, batches: Sequence[Batch]) -> list[float]:
    """Per decoder layer, the model's mean next-token cross-entropy with that one layer removed.

    Args:
        model: a causal LM with its decoder layers at ``model.model.layers`` (the Llama family).
        batches: calibration batches, as for :func:`block_influence`.

    Returns:
        One loss per layer, in layer order; higher means removing the layer costs more.

    """
    _check_batches(batches)
    scores = []
    for index in range(len(decoder_layers(model, field="model"))):
        with without_layer(model, index):
            scores.append(mean_next_token_loss(model, batches))
    return scores


SCORERS: dict[str, Scorer] = {"block_influence": block_influence, "drop_loss": drop_loss}


def calibration_batches(blocks: Any, *, batches: int, rows: int, tokens: int) -> list[Tensor]:
    """Cut calibration batches of ``rows`` × ``tokens`` ids out of packed training blocks.

    The rows start at evenly spaced blocks, so they sample the whole split rather than its first
    documents; each row is ``tokens`` consecutive ids from consecutive blocks (packing keeps them
    contiguous text). A split too small for all of it gives fewer rows, or one shorter row.

    Args:
        blocks: the packed blocks: a 2-D id tensor, or a ``datasets.Dataset`` with an ``input_ids``
            column in torch format (the datamodule's ``train_set``).
        batches: how many batches to return at most.
        rows: rows per batch.
        tokens: ids per row.

    Returns:
        Up to ``batches`` id tensors of shape ``(rows, tokens)`` (the last one may have fewer rows).

    """
    total = len(blocks)
    if total == 0:
        raise ValueError("no training blocks to calibrate on")

    def take(start: int, stop: int) -> Tensor:
        part = blocks[start:stop]
        return part if isinstance(part, Tensor) else part["input_ids"]

    width = take(0, 1).shape[-1]
    per_row = -(-tokens // width)  # blocks needed for one row
    wanted = batches * rows
    n_rows = min(wanted, total // per_row)
    if n_rows == 0:  # the whole split is shorter than one row
        return [take(0, total).reshape(1, -1)]
    stride = total // n_rows  # ≥ per_row, so rows never overlap
    cut = [take(r * stride, r * stride + per_row).reshape(-1)[:tokens] for r in range(n_rows)]
    return [torch.stack(cut[i : i + rows]) for i in range(0, n_rows, rows)]


def choose_layers(scores: Sequence[float], num_layers: int, keep_first_last: bool = False) -> list[int]:
    """The indices of the ``num_layers`` highest-scoring layers, ascending.

    Ties go to the lower index, so the choice is deterministic.

    Args:
        scores: one importance score per layer (higher = more important).
        num_layers: how many layers to keep.
        keep_first_last: always keep the first and the last layer (as far as ``num_layers`` allows:
            with one layer, the last), filling the rest by score. ShortGPT does not force them; the
            first and last layers usually score highest anyway.

    """
    total = len(scores)
    if not 1 <= num_layers <= total:
        raise ValueError(f"cannot keep {num_layers} of {total} layers")
    forced = [total - 1, 0][:num_layers] if keep_first_last else []
    ranked = sorted(range(total), key=lambda i: (-scores[i], i))
    chosen = list(dict.fromkeys([*forced, *ranked]))[:num_layers]
    return sorted(chosen)
