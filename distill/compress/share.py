"""Cross-layer weight sharing (ALBERT, MobileLLM, Relaxed Recursive Transformers): the model surgery.

Decoder layers are split into groups; every layer of a group uses *the same* ``nn.Parameter`` objects
for all its weights (linears and norms). Only the Parameters are swapped, not the layer modules, so each
layer keeps its own ``layer_idx`` (KV cache slot) and the model's rotary embedding still sees every
position. ``student.parameters()`` yields a shared Parameter once, the optimizer holds it once, and
autograd sums its gradient over the uses.

An optional relaxation adds a per-layer LoRA delta (peft) on top of the shared weights, so tied layers
can differ a little again at a small cost in parameters. The Lightning side is ``callbacks/share.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from distill.compress.layers import decoder_layers
from distill.compress.stages import Stage, register
from distill.config import config_error
from distill.loaders.load_compact import set_parameter

FIELD = "callbacks.share"
PATTERNS = ("all", "groups", "cycle")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_pattern(pattern: str | list[list[int]]) -> None:
    """Refuse a pattern name that is not one of :data:`PATTERNS` (explicit group lists are checked per model)."""
    if isinstance(pattern, str) and pattern not in PATTERNS:
        raise config_error(f"{FIELD}.pattern", pattern, f"use one of {', '.join(PATTERNS)} or a list of layer groups")


def check_init(init: str | int) -> None:
    """Refuse an ``init`` that is not ``mean``, ``first`` or an int position."""
    if not (init in ("mean", "first") or (isinstance(init, int) and not isinstance(init, bool))):
        raise config_error(f"{FIELD}.init", init, "use 'mean', 'first' or a position within each group (int)")


def share_groups(num_layers: int, pattern: str | list[list[int]], group_size: int | None = None) -> list[list[int]]:
    """The groups of layer indices that share one block.

    Args:
        num_layers: depth of the student.
        pattern: ``all`` (one block for every layer), ``groups`` (consecutive groups of ``group_size``),
            ``cycle`` (``group_size`` unique blocks repeated: layer i uses block i mod k), or an explicit
            list of groups (layers left out stay unique).
        group_size: k for ``groups`` and ``cycle``; it must divide ``num_layers``.

    Returns:
        Groups of two or more layers, each sorted, in order of their first layer.

    """
    check_pattern(pattern)
    if isinstance(pattern, str):
        if pattern == "all":
            groups = [list(range(num_layers))]
        else:
            if not isinstance(group_size, int) or group_size < 1 or num_layers % group_size:
                raise config_error(
                    f"{FIELD}.group_size",
                    group_size,
                    f"must be a positive divisor of the student's {num_layers} layers for pattern={pattern!r}",
                )
            if pattern == "groups":
                groups = [list(range(s, s + group_size)) for s in range(0, num_layers, group_size)]
            else:
                groups = [list(range(j, num_layers, group_size)) for j in range(group_size)]
    else:
        groups = [sorted(int(i) for i in g) for g in pattern]
        flat = [i for g in groups for i in g]
        bad = [i for i in flat if not 0 <= i < num_layers]
        if bad or len(flat) != len(set(flat)):
            raise config_error(
                f"{FIELD}.pattern",
                [list(g) for g in pattern],
                f"explicit groups must be disjoint layer indices in [0, {num_layers})",
            )
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        raise config_error(f"{FIELD}.pattern", pattern, "no group has two or more layers, so nothing is shared")
    return sorted(groups)


@torch.no_grad()
def tie_layers(model: nn.Module, groups: list[list[int]], init: str | int = "mean") -> dict[nn.Parameter, nn.Parameter]:
    """Make every layer of each group use the same Parameter objects.

    Args:
        model: a transformers causal LM whose layers are at ``model.model.layers``.
        groups: layer groups from :func:`share_groups`.
        init: the shared value: ``mean`` of the members, ``first`` member, or an int position in each group.

    Returns:
        new shared Parameter → the old Parameter its value (and optimizer state) came from.

    """
    layers = decoder_layers(model, FIELD)
    check_init(init)
    smallest = min(len(g) for g in groups)
    if isinstance(init, int) and not 0 <= init < smallest:
        raise config_error(f"{FIELD}.init", init, f"a position within each group must lie in [0, {smallest})")
    pos = 0 if init in ("mean", "first") else int(init)
    sources: dict[nn.Parameter, nn.Parameter] = {}
    for group in groups:
        members = [dict(layers[i].named_parameters()) for i in group]
        for name in members[0]:
            olds = [m[name] for m in members]
            if init == "mean":
                value = torch.stack([p.detach().float() for p in olds]).mean(0).to(olds[0].dtype)
            else:
                value = olds[pos].detach().clone()
            shared = nn.Parameter(value, requires_grad=olds[pos].requires_grad)
            for i in group:
                set_parameter(layers[i], name, shared)
            sources[shared] = olds[pos]
    return sources


def add_lora(model: nn.Module, groups: list[list[int]], rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Add a per-layer LoRA delta (peft) to the target projections of every shared layer.

    peft freezes every non-adapter weight on injection; the shared weights keep training here (as in
    Relaxed Recursive Transformers), so their ``requires_grad`` is restored.

    Returns:
        The names of the modules that received an adapter.

    """
    from peft import LoraConfig, inject_adapter_in_model

    names = list(lora_targets(model, groups, targets))
    if not names:
        raise config_error(f"{FIELD}.lora_targets", list(targets), "no linear layer of a shared layer matches")
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    # Names are full module paths, so peft adapts exactly these modules and nothing outside the groups.
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0), model)
    for p in model.parameters():
        if id(p) in trainable:
            p.requires_grad_(trainable[id(p)])
    return names


def lora_targets(model: nn.Module, groups: list[list[int]], targets: list[str]) -> dict[str, nn.Linear]:
    """Full module path → linear of the shared layers' projections named in ``targets``."""
    return {
        f"model.layers.{i}.{sub}": m
        for g in groups
        for i in g
        for sub, m in decoder_layers(model, FIELD)[i].named_modules()
        if isinstance(m, nn.Linear) and sub.rsplit(".", 1)[-1] in targets
    }


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → peft LoRA layer (none without peft installed)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft installed: then no model here carries LoRA layers
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def init_lora_from_residuals(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Set each layer's LoRA delta to the best rank-r approximation of (its own weight − the shared weight).

    This is the truncated-SVD initialisation of Relaxed Recursive Transformers: right after the tie, each
    layer is as close to its untied self as rank r allows (B·A·scaling = U_r Σ_r V_rᵀ of the residual).
    """
    for name, original in originals.items():
        layer = model.get_submodule(name)
        adapter = layer.active_adapters[0]
        base = layer.get_base_layer().weight
        u, s, vh = torch.linalg.svd((original - base).double(), full_matrices=False)
        if float(s[0]) == 0.0:
            continue  # the member the shared value came from: A = B = 0 would never train, keep peft's init
        r = min(int(layer.r[adapter]), s.numel())
        root = (s[:r] / layer.scaling[adapter]).sqrt()
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        a.zero_(), b.zero_()
        a[:r] = (root[:, None] * vh[:r]).to(a.dtype)
        b[:, :r] = (u[:, :r] * root).to(b.dtype)


def sharing_spec(
    num_layers: int,
    pattern: str | list[list[int]],
    group_size: int | None,
    lora_rank: int = 0,
    lora_alpha: float = 0.0,
    lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
) -> dict[str, Any]:
    """The structure spec a tie records (the groups and the LoRA settings; no weights)."""
    groups = share_groups(num_layers, pattern, group_size)
    lora = None
    if lora_rank:
        lora = {"rank": lora_rank, "alpha": lora_alpha, "targets": list(lora_targets)}
    return {"groups": groups, "lora": lora}


def apply_sharing(
    model: nn.Module, spec: dict[str, Any], init: str | int = "mean", lora_init: str = "zeros"
) -> dict[nn.Parameter, nn.Parameter]:
    """Apply a sharing spec (groups and optional LoRA) to ``model`` in place; returns the tie sources.

    Args:
        model: a transformers causal LM.
        spec: from :func:`sharing_spec` (or a checkpoint's structure log).
        init: the shared value, see :func:`tie_layers`.
        lora_init: ``zeros`` (peft's B = 0: the relaxed model starts as the tied one) or ``svd`` (each delta
            starts as the best rank-r approximation of that layer's weight minus the shared weight).

    Returns:
        new shared Parameter → the old Parameter its value (and optimizer state) came from.

    """
    lora = spec.get("lora")
    originals = None
    if lora and lora_init == "svd":
        originals = {
            n: m.weight.detach().clone() for n, m in lora_targets(model, spec["groups"], lora["targets"]).items()
        }
    sources = tie_layers(model, spec["groups"], init)
    if lora:
        add_lora(model, spec["groups"], lora["rank"], lora["alpha"], lora["targets"])
    if originals:
        init_lora_from_residuals(model, originals)
    return sources


def summarize_share(config: Mapping[str, Any], _state: dict) -> str:
    """The tied layer groups and the LoRA relaxation, if any."""
    groups = [g for g in config.get("groups") or [] if len(g) > 1]
    sizes = {len(g) for g in groups}
    how = f"in groups of {sizes.pop()}" if len(sizes) == 1 else f"in {len(groups)} groups"
    text = f"layers tied {how}: {', '.join('+'.join(map(str, g)) for g in groups)}"
    lora = config.get("lora")
    if lora and lora.get("rank"):
        targets = lora.get("targets") or []
        text += f"; rank-{lora['rank']} LoRA per layer on {len(targets)} projections ({', '.join(targets)})"
    return text


# The shared values are overwritten by the checkpoint right after a replay, so the cheapest init will do.
SHARE = register(
    Stage(
        "share",
        20,
        lambda student, spec: apply_sharing(student, spec, init="first"),
        before_wrapping=True,
        rebuilds_linears=True,
        needs_uniform_layers=True,
        summarize=summarize_share,
    )
)
