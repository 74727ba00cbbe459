"""Physical structured pruning of a Hugging Face Llama-family model: heads, MLP channels, layers, width.

Why this is hand-written: Torch-Pruning's dependency graph does not finish building on Hugging Face
Llama models (its open issues #519 and #527), and the surgery needed here is small and well defined:
slice q/k/v rows and o_proj columns one KV group at a time, slice gate/up rows and down_proj columns,
set an explicit ``head_dim`` (the width no longer equals ``hidden_size / num_attention_heads``),
update ``num_key_value_groups``, and renumber ``layer_idx`` after removing layers so that the KV cache
still lines up. By default widths stay uniform across layers, so the result is a plain ``LlamaForCausalLM``
whose config alone rebuilds it (``AutoModelForCausalLM.from_pretrained`` loads the export). With
``uniform: false`` in a spec each layer keeps its own counts; the config then records them in
``distill_layer_shapes`` and :mod:`distill.loaders.load_pruned` rebuilds such a model.

Hidden (residual-stream) channels, as Minitron prunes the embedding dimension: the same channels go from
the embedding's columns, every RMSNorm's weight, the in-features of q/k/v/gate/up and ``lm_head`` and the
out-features of o_proj/down_proj; ``hidden_size`` shrinks and ``head_dim`` is pinned in the config. A tied
``lm_head`` keeps sharing the (sliced) embedding Parameter. RMSNorm then averages over fewer channels, so
the pruned model is not the original with those channels zeroed: that is expected, healing fixes it.

Every slicing function returns a carry map, new parameter → (old parameter, function), that
:meth:`distill.module.DistillModule.rebuild_optimizers` uses to slice the old Adam moments down to
the surviving rows and columns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from distill.compress.describe import spread
from distill.compress.layers import decoder_layers
from distill.compress.stages import Stage, register
from distill.config import config_error
from distill.cost import parameter_count
from distill.loaders.load_pruned import LAYER_SHAPES_KEY

Carry = dict[nn.Parameter, tuple[nn.Parameter, Callable[[Tensor], Tensor] | None]]


def head_dim(model: nn.Module) -> int:
    """Per-head width of the model's attention."""
    return decoder_layers(model)[0].self_attn.head_dim


def _slicer(dim: int, index: Tensor) -> Callable[[Tensor], Tensor]:
    def fn(t: Tensor) -> Tensor:
        return t.index_select(dim, index.to(t.device)).contiguous()

    return fn


def slice_linear(linear: nn.Linear, dim: int, index: Tensor, carry: Carry) -> None:
    """Keep rows (``dim=0``, outputs) or columns (``dim=1``, inputs) ``index`` of a linear layer, in place.

    The module object stays; its weight (and bias, for rows) become new Parameters recorded in ``carry``.
    """
    index = index.to(linear.weight.device)
    old_w = linear.weight
    fn = _slicer(dim, index)
    linear.weight = nn.Parameter(fn(old_w.data), requires_grad=old_w.requires_grad)
    carry[linear.weight] = (old_w, fn)
    if dim == 0:
        linear.out_features = len(index)
        if linear.bias is not None:
            old_b = linear.bias
            bfn = _slicer(0, index)
            linear.bias = nn.Parameter(bfn(old_b.data), requires_grad=old_b.requires_grad)
            carry[linear.bias] = (old_b, bfn)
    else:
        linear.in_features = len(index)


def _head_rows(heads: list[int], dim: int) -> Tensor:
    return (
        torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in heads]) if heads else torch.zeros(0, dtype=torch.long)
    )


def prune_layers(model: nn.Module, keep: list[int]) -> None:
    """Keep decoder layers ``keep`` (sorted indices) and renumber ``layer_idx`` so KV-cache slots line up."""
    layers = decoder_layers(model)
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    types = getattr(model.config, "layer_types", None)
    if types is not None:
        model.config.layer_types = [types[i] for i in keep]


def prune_heads(
    model: nn.Module, q_keep: list[list[int]], kv_keep: list[list[int]], carry: Carry, uniform: bool = True
) -> None:
    """Keep query heads ``q_keep[l]`` and key/value heads ``kv_keep[l]`` in every layer ``l``.

    Each kept query head must belong to a kept KV group, and every kept group keeps the same number of
    query heads, so grouped-query attention still maps query head ``j`` to KV head ``j // groups``.
    With ``uniform`` every layer must keep the same counts, which then go into the config.
    """
    dim = head_dim(model)
    cfg = model.config
    n_q, n_kv = len(q_keep[0]), len(kv_keep[0])
    for layer, qk, kvk in zip(decoder_layers(model), q_keep, kv_keep, strict=True):
        attn = layer.self_attn
        group = attn.num_key_value_groups
        if uniform and (len(qk) != n_q or len(kvk) != n_kv):
            raise ValueError(f"non-uniform head selection: {len(qk)} q / {len(kvk)} kv heads vs {n_q} / {n_kv}")
        if not kvk or len(qk) % len(kvk) or any(sum(h // group == k for h in qk) != len(qk) // len(kvk) for k in kvk):
            raise ValueError(f"GQA-breaking head selection: query heads {qk} over KV heads {kvk}")
        if any(h // group not in kvk for h in qk):
            raise ValueError(f"query heads {qk} do not all belong to the kept KV groups {kvk}")
        q_rows, kv_rows = _head_rows(sorted(qk), dim), _head_rows(sorted(kvk), dim)
        slice_linear(attn.q_proj, 0, q_rows, carry)
        slice_linear(attn.k_proj, 0, kv_rows, carry)
        slice_linear(attn.v_proj, 0, kv_rows, carry)
        slice_linear(attn.o_proj, 1, q_rows, carry)
        attn.num_key_value_groups = len(qk) // len(kvk)
    # head_dim must be explicit: hidden_size / num_attention_heads no longer gives the per-head width.
    cfg.head_dim = dim
    if uniform:
        cfg.num_attention_heads = n_q
        cfg.num_key_value_heads = n_kv


def prune_channels(model: nn.Module, keep: list[list[int]], carry: Carry, uniform: bool = True) -> None:
    """Keep MLP intermediate channels ``keep[l]`` in every layer ``l`` (gate/up rows, down_proj columns)."""
    if uniform and len({len(ch) for ch in keep}) > 1:
        raise ValueError(f"non-uniform channel selection: {[len(ch) for ch in keep]} channels per layer")
    for layer, ch in zip(decoder_layers(model), keep, strict=True):
        mlp = layer.mlp
        index = torch.tensor(sorted(ch), dtype=torch.long)
        slice_linear(mlp.gate_proj, 0, index, carry)
        slice_linear(mlp.up_proj, 0, index, carry)
        slice_linear(mlp.down_proj, 1, index, carry)
        mlp.intermediate_size = len(index)
    if uniform:
        model.config.intermediate_size = len(keep[0])


def hidden_norms(model: nn.Module) -> list[nn.Module]:
    """Every norm over the residual stream: each layer's input and post-attention norms, then the final norm."""
    norms = [n for layer in decoder_layers(model) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    return [*norms, model.model.norm]


def hidden_params(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Every weight indexed by a hidden channel, with the axis the channel indexes; a tied one appears once."""
    out: list[tuple[nn.Parameter, int]] = [(model.get_input_embeddings().weight, 1)]
    out += [(norm.weight, 0) for norm in hidden_norms(model)]
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        out += [(lin.weight, 1) for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)]
        out += [(lin.weight, 0) for lin in (attn.o_proj, mlp.down_proj)]
    head = model.get_output_embeddings().weight
    if head is not out[0][0]:  # a tied head is the embedding: count its weights once
        out.append((head, 1))
    return out


def _slice_param(module: nn.Module, name: str, dim: int, index: Tensor, carry: Carry) -> None:
    """Replace ``module.<name>`` by its slice ``index`` along ``dim``, a new Parameter recorded in ``carry``."""
    old = getattr(module, name)
    fn = _slicer(dim, index)
    new = nn.Parameter(fn(old.data), requires_grad=old.requires_grad)
    setattr(module, name, new)
    carry[new] = (old, fn)


def prune_hidden(model: nn.Module, keep: list[int], carry: Carry) -> None:
    """Keep hidden (residual-stream) channels ``keep`` everywhere the width appears; see the module docstring.

    The tie between ``lm_head`` and the embedding is read from the modules (one Parameter or two), not
    only from the config, and survives: the head gets the sliced embedding Parameter back.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    index = torch.tensor(sorted(keep), dtype=torch.long, device=emb.weight.device)
    # head_dim must be explicit before hidden_size changes: Llama would derive hidden_size / num_heads.
    model.config.head_dim = head_dim(model)
    _slice_param(emb, "weight", 1, index, carry)
    emb.embedding_dim = len(index)
    for norm in hidden_norms(model):
        _slice_param(norm, "weight", 0, index, carry)
        if getattr(norm, "bias", None) is not None:  # a LayerNorm-style norm
            _slice_param(norm, "bias", 0, index, carry)
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            slice_linear(lin, 1, index, carry)
        slice_linear(attn.o_proj, 0, index, carry)
        slice_linear(mlp.down_proj, 0, index, carry)
        for mod in (layer, mlp):  # transformers keeps the width on these, informational only
            if hasattr(mod, "hidden_size"):
                mod.hidden_size = len(index)
    if tied:
        head.weight = emb.weight
        head.in_features = len(index)
    else:
        slice_linear(head, 1, index, carry)
    model.config.hidden_size = len(index)


def add_biases(model: nn.Module, kinds: list[str]) -> None:
    """Give every projection of ``kinds`` (``mlp``, ``attention``) a zero bias, as Llama's config flags do.

    Bias compensation needs a bias on ``down_proj``/``o_proj``. Hugging Face Llama only has all-or-nothing
    flags (``mlp_bias`` adds one to gate/up/down, ``attention_bias`` to q/k/v/o), so the other projections
    get zero biases too and the export stays a plain Llama that ``from_pretrained`` rebuilds.
    """
    names = {"mlp": ("gate_proj", "up_proj", "down_proj"), "attention": ("q_proj", "k_proj", "v_proj", "o_proj")}
    for kind in kinds:
        for layer in decoder_layers(model):
            parent = layer.mlp if kind == "mlp" else layer.self_attn
            for name in names[kind]:
                lin = getattr(parent, name)
                if lin.bias is None:
                    w = lin.weight
                    lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        setattr(model.config, "mlp_bias" if kind == "mlp" else "attention_bias", True)


def apply_spec(model: nn.Module, spec: dict[str, Any]) -> Carry:
    """Apply one pruning step: layers first, then heads and channels of the surviving layers.

    ``spec`` holds ``layers`` (kept layer indices or None), ``q_heads``/``kv_heads`` (per surviving layer,
    kept head indices, or None), ``channels`` (per surviving layer, kept channels, or None) and optionally
    ``biases`` (projection kinds that get biases for bias compensation; their values come from the weights)
    and ``hidden`` (kept hidden channels, or None). Indices refer to the model as it was before this step.
    """
    carry: Carry = {}
    uniform = spec.get("uniform", True)
    add_biases(model, spec.get("biases") or [])
    if spec.get("layers") is not None:
        prune_layers(model, spec["layers"])
    if spec.get("q_heads") is not None:
        prune_heads(model, spec["q_heads"], spec["kv_heads"], carry, uniform=uniform)
    if spec.get("channels") is not None:
        prune_channels(model, spec["channels"], carry, uniform=uniform)
    if spec.get("hidden") is not None:
        prune_hidden(model, spec["hidden"], carry)
    if not uniform or getattr(model.config, LAYER_SHAPES_KEY, None):
        # Per-layer widths: the config keeps the unpruned counts and records each layer's
        # (read by distill.loaders.load_pruned).
        setattr(model.config, LAYER_SHAPES_KEY, layer_shapes(model))
    return carry


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Each decoder layer's query heads, KV heads and MLP channels, read from its projections."""
    out = []
    for layer in decoder_layers(model):
        attn, d = layer.self_attn, layer.self_attn.head_dim
        out.append(
            {
                "heads": attn.q_proj.out_features // d,
                "kv_heads": attn.k_proj.out_features // d,
                "channels": layer.mlp.gate_proj.out_features,
            }
        )
    return out


def shapes(model: nn.Module) -> dict[str, int]:
    """Layers, width, the config's heads / KV heads / head_dim / MLP channels, their totals over layers, params.

    For a uniform model ``total_heads == layers * heads`` and so on; with per-layer widths the config
    keeps the unpruned counts and only the totals (and :func:`layer_shapes`) describe the model.
    """
    cfg = model.config
    per_layer = layer_shapes(model)
    return {
        "total_heads": sum(s["heads"] for s in per_layer),
        "total_kv_heads": sum(s["kv_heads"] for s in per_layer),
        "total_channels": sum(s["channels"] for s in per_layer),
        "layers": len(decoder_layers(model)),
        "hidden": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim(model),
        "channels": cfg.intermediate_size,
        "params": parameter_count(model),
    }


def summarize_prune(config: Mapping[str, Any], before: dict[str, list[int]]) -> str:
    """One pruning step: what each layer keeps, against the previous step's counts when there was one.

    ``before`` carries the per-layer counts of the previous pruning step and is updated in place, so
    progressive pruning reads as a chain (``MLP channels 1092→864``).
    """
    parts = []
    layers = config.get("layers")
    if layers is not None:
        was = f"{len(before['layers'])}→" if before.get("layers") else ""
        parts.append(f"layers {was}{len(layers)} (kept {', '.join(map(str, layers))})")
        # Later counts are per surviving layer: re-index the previous step's onto them.
        for key in ("heads", "kv_heads", "channels"):
            if key in before and len(before[key]) > max(layers, default=-1):
                before[key] = [before[key][i] for i in layers]
        before["layers"] = list(layers)
    for key, label, spec in (
        ("heads", "query heads", "q_heads"),
        ("kv_heads", "KV heads", "kv_heads"),
        ("channels", "MLP channels", "channels"),
    ):
        kept = config.get(spec)
        if kept is None:
            continue
        counts = [len(k) for k in kept]
        prev = before.get(key)
        was = f"{spread(prev)}→" if prev and len(prev) == len(counts) else "kept "
        parts.append(f"{label} {was}{spread(counts)} per layer")
        before[key] = counts
    if config.get("biases"):
        parts.append(f"bias compensation on {', '.join(config['biases'])}")
    n_layers = next((len(config[k]) for k in ("channels", "q_heads") if config.get(k) is not None), None)
    tail = f" ({n_layers} layers)" if n_layers else ""
    return (", ".join(parts) or "no change") + tail


def check_prune_formats(settings: Mapping[str, Any], formats: list[str]) -> None:
    """Refuse export formats that cannot hold what ``callbacks.prune`` makes (per-layer widths, biases)."""
    exact = [f for f in formats if f != "hf"]
    if exact and settings.get("uniform") is False:
        raise config_error(
            "export.formats",
            formats,
            f"{', '.join(exact)} cannot hold per-layer pruned widths (callbacks.prune.uniform=false); "
            "prune uniformly or export hf only",
        )
    if "gguf" in formats and settings.get("bias_compensation"):
        raise config_error(
            "export.formats",
            formats,
            "the GGUF export cannot be checked with biases (transformers' GGUF loader drops them for llama); "
            "set callbacks.prune.bias_compensation=false",
        )


# The structure log's ``prune`` changes are per-layer keep indices, which apply_spec re-applies.
PRUNE = register(
    Stage(
        "prune",
        10,
        apply_spec,
        check_formats=check_prune_formats,
        summarize=summarize_prune,
        refused_under={
            "zero3": "pruning rebuilds the optimizer mid-run, and DeepSpeed's engine owns it (with its state "
            "partitioned; it cannot be re-initialised mid-run)",
            "deepspeed": "pruning rebuilds the optimizer mid-run, and DeepSpeed's engine owns it (with its state "
            "partitioned)",
        },
    )
)
