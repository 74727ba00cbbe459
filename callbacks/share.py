"""Cross-layer weight sharing (ALBERT, MobileLLM, Relaxed Recursive Transformers) as a Lightning callback.

Decoder layers are split into groups; every layer of a group uses *the same* ``nn.Parameter`` objects
for all its weights (linears and norms). Only the Parameters are swapped, not the layer modules, so each
layer keeps its own ``layer_idx`` (KV cache slot) and the model's rotary embedding still sees every
position. ``student.parameters()`` yields a shared Parameter once, the optimizer holds it once, and
autograd sums its gradient over the uses.

An optional relaxation adds a per-layer LoRA delta (peft) on top of the shared weights, so tied layers
can differ a little again at a small cost in parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from transformers import PreTrainedModel

from distill.compress import stages as structure
from distill.config import config_error
from distill.export.hf import compact_unless_quantized
from distill.export.loaders.load_compact import materialize as materialize_plain
from distill.export.loaders.load_compact import save_compact, set_parameter

log = logging.getLogger(__name__)

PATTERNS = ("all", "groups", "cycle")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer stack of a transformers causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise config_error(
            "callbacks.share", type(model).__name__, "sharing needs decoder layers at model.model.layers (Llama family)"
        )
    return layers


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
    if isinstance(pattern, str):
        if pattern not in PATTERNS:
            raise config_error(
                "callbacks.share.pattern", pattern, f"use one of {', '.join(PATTERNS)} or a list of layer groups"
            )
        if pattern == "all":
            groups = [list(range(num_layers))]
        else:
            if not isinstance(group_size, int) or group_size < 1 or num_layers % group_size:
                raise config_error(
                    "callbacks.share.group_size",
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
                "callbacks.share.pattern",
                [list(g) for g in pattern],
                f"explicit groups must be disjoint layer indices in [0, {num_layers})",
            )
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        raise config_error("callbacks.share.pattern", pattern, "no group has two or more layers, so nothing is shared")
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
    layers = decoder_layers(model)
    if not (init in ("mean", "first") or (isinstance(init, int) and not isinstance(init, bool))):
        raise config_error("callbacks.share.init", init, "use 'mean', 'first' or a position within each group (int)")
    smallest = min(len(g) for g in groups)
    if isinstance(init, int) and not 0 <= init < smallest:
        raise config_error("callbacks.share.init", init, f"a position within each group must lie in [0, {smallest})")
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
        raise config_error("callbacks.share.lora_targets", list(targets), "no linear layer of a shared layer matches")
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
        for sub, m in decoder_layers(model)[i].named_modules()
        if isinstance(m, nn.Linear) and sub.rsplit(".", 1)[-1] in targets
    }


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


def apply_sharing(model: nn.Module, spec: dict[str, Any], init: str | int = "mean") -> dict[nn.Parameter, nn.Parameter]:
    """Apply a recorded sharing spec (groups and optional LoRA) to ``model``; returns the tie sources."""
    sources = tie_layers(model, spec["groups"], init)
    lora = spec.get("lora")
    if lora:
        add_lora(model, spec["groups"], lora["rank"], lora["alpha"], lora["targets"])
    return sources


@structure.register("share")
def _replay(student: nn.Module, spec: dict[str, Any]) -> None:
    # The values are overwritten by the checkpoint right after, so the cheapest init will do.
    apply_sharing(student, spec, init="first")


class CrossLayerSharing(pl.Callback):
    """Tie decoder layers into shared blocks, at the start of training or at ``start_step``.

    Args:
        pattern: ``all``, ``groups``, ``cycle`` or an explicit list of layer groups (see :func:`share_groups`).
        group_size: k for ``groups`` / ``cycle``.
        init: shared value from the members' ``mean``, the ``first`` member, or an int position in each group.
        start_step: the optimizer step at which to tie (0: before training, when the model is set up).
        lora_rank: rank of the per-layer LoRA relaxation on shared layers (0: none).
        lora_alpha: LoRA scale numerator (scaling = alpha / rank); default = 2 × rank.
        lora_targets: projection names that get a LoRA delta.
        lora_init: ``zeros`` (B = 0: the relaxed model starts as the tied one) or ``svd`` (each delta starts as
            the best rank-r approximation of that layer's weight minus the shared weight).
        compact_dir: folder name, under the run directory, of the compact export.

    """

    stage = "share"

    def __init__(
        self,
        pattern: str | list[list[int]] = "groups",
        group_size: int | None = 2,
        init: str | int = "mean",
        start_step: int = 0,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS,
        lora_init: str = "zeros",
        compact_dir: str = "student_compact",
    ) -> None:
        if isinstance(pattern, str) and pattern not in PATTERNS:
            raise config_error(
                "callbacks.share.pattern", pattern, f"use one of {', '.join(PATTERNS)} or a list of layer groups"
            )
        if not isinstance(start_step, int) or start_step < 0:
            raise config_error("callbacks.share.start_step", start_step, "must be a step number ≥ 0")
        if not isinstance(lora_rank, int) or lora_rank < 0:
            raise config_error("callbacks.share.lora_rank", lora_rank, "must be an int ≥ 0 (0 switches LoRA off)")
        if lora_init not in ("zeros", "svd"):
            raise config_error("callbacks.share.lora_init", lora_init, "use 'zeros' (peft's default) or 'svd'")
        if not (init in ("mean", "first") or (isinstance(init, int) and not isinstance(init, bool))):
            raise config_error("callbacks.share.init", init, "use 'mean', 'first' or a position within each group")
        self.pattern = pattern if isinstance(pattern, str) else [list(g) for g in pattern]
        self.group_size = group_size
        self.init = init
        self.start_step = self.end_step = start_step
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha) if lora_alpha is not None else 2.0 * lora_rank
        self.lora_targets = list(lora_targets)
        self.lora_init = lora_init
        self.compact_dir = compact_dir
        self.groups: list[list[int]] | None = None

    def spec_for(self, model: nn.Module) -> dict[str, Any]:
        """The structure spec recorded in checkpoints (depends on the config only, not on the weights)."""
        groups = share_groups(len(decoder_layers(model)), self.pattern, self.group_size)
        lora = None
        if self.lora_rank:
            lora = {"rank": self.lora_rank, "alpha": self.lora_alpha, "targets": self.lora_targets}
        return {"groups": groups, "lora": lora}

    @staticmethod
    def _applied(pl_module: pl.LightningModule) -> bool:
        return any(c["kind"] == "share" for c in pl_module.structure)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the config against the student, then tie now when ``start_step`` is 0 (before DDP wraps it)."""
        self.spec_for(pl_module.student)  # bad group sizes fail before any training
        if self.start_step > 0 and trainer.world_size > 1:
            raise config_error(
                "callbacks.share.start_step",
                self.start_step,
                "tying mid-run under a multi-process strategy would need the model re-wrapped; use start_step=0 "
                "with DDP (the tie happens before wrapping)",
            )
        if self.start_step == 0 and not self._applied(pl_module):
            self._apply(trainer, pl_module, rebuild=False)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Tie at ``start_step`` (a resumed run that already tied got its structure from the checkpoint)."""
        if self.start_step > 0 and trainer.global_step >= self.start_step and not self._applied(pl_module):
            self._apply(trainer, pl_module, rebuild=True)

    def compress(self, student: nn.Module) -> tuple[dict[str, Any], dict[nn.Parameter, nn.Parameter]]:
        """Tie ``student`` in place as configured; returns the recorded spec and the tie sources."""
        spec = self.spec_for(student)
        originals = None
        if spec["lora"] and self.lora_init == "svd":
            originals = {
                n: m.weight.detach().clone()
                for n, m in lora_targets(student, spec["groups"], self.lora_targets).items()
            }
        sources = apply_sharing(student, spec, self.init)
        if originals:
            init_lora_from_residuals(student, originals)
        return spec, sources

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rebuild: bool) -> None:
        student = pl_module.student
        before = _unique_count(student)
        spec, sources = self.compress(student)
        pl_module.record_structure_change("share", spec)
        self.groups = spec["groups"]
        if rebuild:
            # Each shared Parameter continues the Adam moments of the member its value came from.
            pl_module.rebuild_optimizers({new: (old, None) for new, old in sources.items()})
        log.info(
            "shared layers %s at step %d: %d → %d unique student parameters",
            spec["groups"],
            trainer.global_step,
            before,
            _unique_count(student),
        )

    def materialize(self, model: PreTrainedModel) -> PreTrainedModel:
        """A plain copy for ``save_pretrained``: shared weights cloned per layer, LoRA deltas merged."""
        return materialize_plain(model)

    def export_compact(self, model: PreTrainedModel, tokenizer: Any, run_dir: Path) -> Path | None:
        """Write each shared tensor once plus the tie map and a loader (see :mod:`distill.export.loaders.load_compact`)."""
        return compact_unless_quantized(
            save_compact, model, tokenizer, Path(run_dir) / self.compact_dir, type(self).__name__
        )


def _unique_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
