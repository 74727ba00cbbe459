"""Which heads, channels, hidden channels and layers a pruning step keeps, from the importance scores.

:func:`select` keeps one width for all layers (a plain Hugging Face Llama); :func:`select_per_layer` lets
units compete across layers, so each layer keeps its own counts. Both return the pruning spec that
:func:`~distill.compress.prune.surgery.apply_spec` applies. Ties always go to the lower index so every
DDP rank picks the same units. The hidden width is one for the whole model in both (the residual stream
runs through every layer), so hidden channels are always ranked model-wide. :func:`compensation` and
:func:`add_compensation` implement FLAP's bias compensation for the removed units.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.compress.prune.importance import ImportanceAccumulator
from distill.compress.prune.surgery import decoder_layers, layer_shapes, shapes
from distill.config import ConfigError, config_error


@torch.no_grad()
def select(scores: ImportanceAccumulator, student: nn.Module, target: dict[str, int]) -> dict[str, Any]:
    """Pick the units to keep for ``target`` sizes (see :meth:`PruneSchedule.sizes_at`): the pruning spec.

    Args:
        scores: the importance statistics accumulated over the calibration batches.
        student: the model about to be pruned (its current widths are read from it).
        target: ``layers``, ``heads``, ``kv_heads`` and ``channels`` per layer after this step, and ``hidden``.

    Returns:
        The spec: kept ``layers``, ``q_heads``/``kv_heads`` and ``channels`` (None where nothing goes), and
        kept ``hidden`` channels when the width shrinks.

    """
    now = shapes(student)
    spec: dict[str, Any] = {"layers": None, "q_heads": None, "kv_heads": None, "channels": None}
    layer_idx = list(range(now["layers"]))
    if target["layers"] < now["layers"]:
        layer_idx = _top(scores.layer_scores(student), target["layers"])
        spec["layers"] = layer_idx
    if target["heads"] < now["heads"]:
        head_scores = scores.head_scores(student)
        group = now["heads"] // now["kv_heads"]
        q_keep, kv_keep = [], []
        for i in layer_idx:
            per_group = head_scores[i].view(now["kv_heads"], group)
            if target["kv_heads"] < now["kv_heads"]:  # whole KV groups go
                kv = _top(per_group.sum(1), target["kv_heads"])
                q = [k * group + j for k in kv for j in range(group)]
            else:  # query heads go inside each group
                per = target["heads"] // now["kv_heads"]
                kv = list(range(now["kv_heads"]))
                q = [k * group + j for k in kv for j in _top(per_group[k], per)]
            q_keep.append(sorted(q))
            kv_keep.append(kv)
        spec["q_heads"], spec["kv_heads"] = q_keep, kv_keep
    if target["channels"] < now["channels"]:
        channel_scores = scores.channel_scores(student)
        spec["channels"] = [_top(channel_scores[i], target["channels"]) for i in layer_idx]
    _select_hidden(scores, student, target, spec)
    return spec


def _select_hidden(
    scores: ImportanceAccumulator, student: nn.Module, target: dict[str, int], spec: dict[str, Any]
) -> None:
    """Add the kept hidden channels to ``spec`` when ``target`` narrows the width (specs without it stay as before)."""
    width = student.config.hidden_size
    if target.get("hidden", width) < width:
        spec["hidden"] = _top(scores.hidden_scores(student), target["hidden"])


@torch.no_grad()
def select_per_layer(
    scores: ImportanceAccumulator, student: nn.Module, target: dict[str, int], head_grouping: str
) -> dict[str, Any]:
    """Like :func:`select`, but units compete across layers, so each layer keeps its own counts.

    Scores are standardised per layer (z-scores, as FLAP does) before the global ranking, because raw
    activation or gradient magnitudes differ in scale from layer to layer. Totals meet ``target`` ×
    layers; every layer keeps at least one query head per KV group (or one KV group) and one channel.
    Layers are chosen exactly as in :func:`select`.

    Args:
        scores: the importance statistics accumulated over the calibration batches.
        student: the model about to be pruned.
        target: ``layers``, ``heads``, ``kv_heads`` and ``channels`` per layer on average after this step.
        head_grouping: ``within_group`` or ``kv_groups`` (see :class:`PruneSchedule`).

    Returns:
        The spec, with ``uniform: False`` and one kept list per surviving layer.

    """
    spec: dict[str, Any] = {"uniform": False, "layers": None, "q_heads": None, "kv_heads": None, "channels": None}
    n = len(decoder_layers(student))
    layer_idx = list(range(n))
    if target["layers"] < n:
        layer_idx = _top(scores.layer_scores(student), target["layers"])
        spec["layers"] = layer_idx
    now = layer_shapes(student)
    now = [now[i] for i in layer_idx]
    if target["heads"] * len(layer_idx) < sum(s["heads"] for s in now):
        spec["q_heads"], spec["kv_heads"] = _heads_per_layer(scores, student, layer_idx, now, target, head_grouping)
    if target["channels"] * len(layer_idx) < sum(s["channels"] for s in now):
        channel_scores = scores.channel_scores(student)
        units = []
        for j, i in enumerate(layer_idx):
            z = _standardised(channel_scores[i])
            strongest = int(z.argmax())
            units += [(float(z[c]), j, c) for c in range(len(z)) if c != strongest]
        drop = sum(s["channels"] for s in now) - target["channels"] * len(layer_idx)
        gone = _weakest(units, drop)
        spec["channels"] = [[c for c in range(now[j]["channels"]) if (j, c) not in gone] for j in range(len(layer_idx))]
    _select_hidden(scores, student, target, spec)
    return spec


def _heads_per_layer(
    scores: ImportanceAccumulator,
    student: nn.Module,
    layer_idx: list[int],
    now: list[dict[str, int]],
    target: dict[str, int],
    head_grouping: str,
) -> tuple[list[list[int]], list[list[int]]]:
    """Kept query and KV heads per layer when heads compete across layers (see select_per_layer)."""
    head_scores = scores.head_scores(student)
    within = head_grouping == "within_group"
    units, orders = [], []
    for j, i in enumerate(layer_idx):
        kv, group = now[j]["kv_heads"], now[j]["heads"] // now[j]["kv_heads"]
        per_group = _standardised(head_scores[i]).view(kv, group)
        if within:
            # Unit r of a layer: the r-th weakest query head of every group (GQA needs equal groups).
            values, order = per_group.sort(dim=1)
            units += [(float(values[:, r].mean()), j, r) for r in range(group - 1)]
        else:  # unit r: the r-th weakest whole KV group
            values, order = per_group.sum(1).sort()
            units += [(float(values[r]), j, r) for r in range(kv - 1)]
        orders.append(order)
    total = sum(s["heads"] for s in now)
    unit_heads = now[0]["kv_heads"] if within else now[0]["heads"] // now[0]["kv_heads"]
    gone = _weakest(units, (total - target["heads"] * len(layer_idx)) // unit_heads)
    q_keep, kv_keep = [], []
    for j in range(len(layer_idx)):
        kv, group = now[j]["kv_heads"], now[j]["heads"] // now[j]["kv_heads"]
        removed = sum(1 for (jj, _) in gone if jj == j)  # the weakest `removed` units of this layer
        if within:
            keep_pos = orders[j][:, removed:]
            q = sorted(k * group + int(p) for k in range(kv) for p in keep_pos[k])
            kvs = list(range(kv))
        else:
            kvs = sorted(int(k) for k in orders[j][removed:])
            q = [k * group + h for k in kvs for h in range(group)]
        q_keep.append(q)
        kv_keep.append(kvs)
    return q_keep, kv_keep


@torch.no_grad()
def compensation(
    scores: ImportanceAccumulator, student: nn.Module, spec: dict[str, Any]
) -> list[tuple[int, str, Tensor]]:
    """Bias terms that stand in for the removed channels and heads: (new layer index, kind, vector).

    For removed MLP channels C: ``down_proj.weight[:, C] @ mean(x_C)``; for removed query heads: their
    ``o_proj`` columns times the mean of their slice of the ``o_proj`` input. Computed from the weights
    before slicing. Removed layers are not compensated. When the spec narrows the hidden width, the
    vectors keep only the surviving hidden channels (the biases they go into are sliced the same way).

    Args:
        scores: the accumulator, built with ``means=True`` so it holds the mean projection inputs.
        student: the model before ``spec`` is applied.
        spec: the pruning spec from :func:`select` or :func:`select_per_layer`.

    Returns:
        One ``(layer index after pruning, "mlp" or "attention", bias vector)`` per compensated projection.

    """
    layers = decoder_layers(student)
    kept_layers = spec["layers"] if spec["layers"] is not None else list(range(len(layers)))
    out = []
    for j, i in enumerate(kept_layers):
        layer = layers[i]
        if spec["channels"] is not None:
            down = layer.mlp.down_proj.weight
            gone = sorted(set(range(down.shape[1])) - set(spec["channels"][j]))
            mean = scores.input_mean("mlp", i).to(down)
            out.append((j, "mlp", down[:, gone] @ mean[gone]))
        if spec["q_heads"] is not None:
            o_proj, d = layer.self_attn.o_proj, layer.self_attn.head_dim
            gone = sorted(set(range(o_proj.in_features // d)) - set(spec["q_heads"][j]))
            cols = [c for h in gone for c in range(h * d, (h + 1) * d)]
            mean = scores.input_mean("attn", i).to(o_proj.weight)
            out.append((j, "attention", o_proj.weight[:, cols] @ mean[cols]))
    if spec.get("hidden") is not None:
        out = [(j, kind, vec[spec["hidden"]]) for j, kind, vec in out]
    return out


@torch.no_grad()
def add_compensation(student: nn.Module, terms: list[tuple[int, str, Tensor]]) -> None:
    """Add bias-compensation terms to ``down_proj`` (``mlp``) or ``o_proj`` (``attention``) biases."""
    layers = decoder_layers(student)
    for j, kind, vec in terms:
        lin = layers[j].mlp.down_proj if kind == "mlp" else layers[j].self_attn.o_proj
        lin.bias.add_(vec.to(lin.bias))


def require_llama_like(model: nn.Module) -> None:
    """Refuse pruning a student whose layers the surgery cannot slice, with the way out."""
    if not is_llama_like(model):
        raise config_error(
            "callbacks",
            "prune",
            f"{type(model).__name__} is not a Llama-style decoder (model.layers with "
            "self_attn.q_proj/k_proj/v_proj/o_proj and mlp.gate_proj/up_proj/down_proj); drop callbacks=prune",
        )


def is_llama_like(model: nn.Module) -> bool:
    """Whether ``model`` has the Llama decoder layout the surgery slices (q/k/v/o and gate/up/down projections)."""
    try:
        layer = decoder_layers(model)[0]
        attn, mlp = layer.self_attn, layer.mlp
        return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "num_key_value_groups")) and all(
            hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")
        )
    except (AttributeError, IndexError, TypeError, ConfigError):  # ConfigError: no decoder layers at all
        return False


def _standardised(scores: Tensor) -> Tensor:
    """Per-layer z-scores, so units of different layers can be ranked together (FLAP)."""
    scores = scores.double()
    return (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-12)


def _weakest(units: list[tuple[float, int, int]], k: int) -> set[tuple[int, int]]:
    """(layer, unit) of the ``k`` lowest-scored units; ties go to the lower layer and unit so every rank agrees."""
    return {(j, u) for _, j, u in sorted(units)[: max(k, 0)]}


def _top(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ascending; ties go to the lower index so every rank agrees."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])
