"""Load a student pruned with per-layer (non-uniform) widths: ``load_pruned(folder)``.

``callbacks.prune.uniform=false`` lets every decoder layer keep its own number of query/KV heads and
MLP channels. Hugging Face Llama has one width for all layers, so such an export is the usual
``save_pretrained`` folder (config.json, safetensors, tokenizer) whose ``config.json`` also holds
``distill_layer_shapes``: one ``{"heads", "kv_heads", "channels"}`` entry per layer. The config's own
head and channel counts are the unpruned ones, so ``AutoModelForCausalLM.from_pretrained`` refuses the
folder with a size mismatch instead of loading wrong weights.

This file is self-contained (torch, transformers, safetensors) and is copied into every such export as
``load_pruned.py``, so the model loads without this project::

    import sys; sys.path.insert(0, "path/to/student")
    from load_pruned import load_pruned
    model = load_pruned("path/to/student")              # a LlamaForCausalLM with per-layer widths

It builds the model from the config, narrows each layer's projections to the recorded shapes, and loads
the weights strictly (every tensor must fit and be present, tied embeddings excepted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

LAYER_SHAPES_KEY = "distill_layer_shapes"


def _resized(linear: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    w = linear.weight
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, device=w.device, dtype=w.dtype)


def resize_layers(model: PreTrainedModel, layer_shapes: list[dict[str, int]]) -> None:
    """Give every decoder layer of ``model`` the head and channel counts in ``layer_shapes`` (weights uninitialised)."""
    layers = model.model.layers
    if len(layer_shapes) != len(layers):
        raise ValueError(f"{LAYER_SHAPES_KEY} has {len(layer_shapes)} entries for {len(layers)} layers")
    for layer, shape in zip(layers, layer_shapes, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        d, hidden = attn.head_dim, attn.q_proj.in_features
        q, kv, ch = shape["heads"], shape["kv_heads"], shape["channels"]
        if q % kv:
            raise ValueError(f"layer {attn.layer_idx}: {q} query heads do not split into {kv} KV groups")
        attn.q_proj = _resized(attn.q_proj, q * d, hidden)
        attn.k_proj = _resized(attn.k_proj, kv * d, hidden)
        attn.v_proj = _resized(attn.v_proj, kv * d, hidden)
        attn.o_proj = _resized(attn.o_proj, hidden, q * d)
        attn.num_key_value_groups = q // kv
        mlp.gate_proj = _resized(mlp.gate_proj, ch, hidden)
        mlp.up_proj = _resized(mlp.up_proj, ch, hidden)
        mlp.down_proj = _resized(mlp.down_proj, hidden, ch)
        mlp.intermediate_size = ch


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded checkpoint
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    return load_file(str(folder / "model.safetensors"))


def is_pruned_export(folder: str | Path) -> bool:
    """Whether ``folder`` holds a per-layer-width export (its config.json records layer shapes)."""
    cfg = Path(folder) / "config.json"
    return cfg.is_file() and LAYER_SHAPES_KEY in json.loads(cfg.read_text())


def load_pruned(folder: str | Path, dtype: torch.dtype | str | None = None, **config_kwargs: Any) -> PreTrainedModel:
    """Load the per-layer-width causal LM saved in ``folder``, in eval mode.

    Args:
        folder: the export folder (config.json with ``distill_layer_shapes``, safetensors weights).
        dtype: the dtype to build the model in; None or "auto" keeps the config's ``dtype`` (else float32).
        config_kwargs: passed to ``AutoConfig.from_pretrained``.

    """
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, **config_kwargs)
    shapes = getattr(config, LAYER_SHAPES_KEY, None)
    if not shapes:
        raise ValueError(f"{folder}/config.json has no {LAYER_SHAPES_KEY}: load it with AutoModelForCausalLM")
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    resize_layers(model, shapes)
    state = _state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: weights do not match the recorded shapes (missing {missing}, extra {unexpected})")
    model.tie_weights()
    return model.eval()
