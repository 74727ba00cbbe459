"""Writing the compact form of a shared, factorised or LoRA-relaxed student (the format is described in the loader).

The loading side, :mod:`distill.loaders.load_compact`, is copied verbatim into every compact folder
so that it loads without this package; everything that only the writer needs lives here, including
:func:`plain_copy`, the plain form that the Hugging Face export writes instead.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from distill.compress.quant.schemes import is_quantized
from distill.compress.share import lora_layers
from distill.export.hf import compare_logits
from distill.loaders import load_compact as loader
from distill.loaders.load_compact import FORMAT, VERSION, LowRankLinear, load_compact, set_module, set_parameter
from distill.runtime.files import atomic_directory

log = logging.getLogger("distill")


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names that are one Parameter object, as ``[canonical, alias, ...]`` (first name first)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def describe(model: nn.Module) -> dict[str, Any]:
    """The structure of ``model`` beyond its plain architecture, as stored in ``compact.json``."""
    factors = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    lora = None
    layers = lora_layers(model)
    if layers:
        first = next(iter(layers.values()))
        adapter = first.active_adapters[0]
        lora = {
            "modules": sorted(layers),
            "r": int(first.r[adapter]),
            "lora_alpha": float(first.lora_alpha[adapter]),
            "scaling": {name: float(m.scaling[adapter]) for name, m in layers.items()},
        }
    return {"format": FORMAT, "version": VERSION, "factors": factors, "lora": lora, "ties": tie_groups(model)}


def _hf_tied_names(model: nn.Module) -> set[str]:
    # The embedding ↔ head tie that transformers itself declares and re-creates on load.
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, dict):
        return set(keys) | set(keys.values())
    return set(keys)


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().clone())
    return out


@torch.no_grad()
def plain_copy(model: nn.Module) -> nn.Module:
    """A plain copy of ``model``: LoRA deltas merged, factors multiplied back, shared weights cloned per use.

    The result has the original architecture with ordinary ``nn.Linear`` layers and no tensor shared
    across layers (the embedding ↔ head tie that transformers declares is kept), so ``save_pretrained``
    writes it and ``AutoModelForCausalLM`` loads it anywhere. ``model`` is left as it is. This is the
    ``make_plain`` of the sharing and low-rank stages.
    """
    out = copy.deepcopy(model)  # deepcopy keeps ties (one copy per shared object), so we untie explicitly below
    for name, layer in lora_layers(out).items():
        base = layer.get_base_layer()
        weight = base.weight
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        set_module(out, name, _dense_linear(weight, base.bias))
    if hasattr(out, "peft_config"):
        del out.peft_config
    for name, m in list(out.named_modules()):
        if isinstance(m, LowRankLinear):
            set_module(out, name, _dense_linear(m.dense_weight(), m.up.bias))
    keep = _hf_tied_names(out)
    for names in tie_groups(out):
        if set(names) <= keep:
            continue
        shared = out.get_parameter(names[0])
        for alias in names[1:]:
            set_parameter(out, alias, nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad))
    return out


def save_compact(model: nn.Module, tokenizer: Any, out_dir: str | Path, verify: bool = True) -> Path:
    """Write ``model`` in the compact form, atomically, with the loader file, and check the reload.

    Args:
        model: the live student (a transformers model, possibly with tied layers, factors and LoRA).
        tokenizer: saved next to the weights when given.
        out_dir: the folder to write; replaced only once the new one is complete and verified.
        verify: reload with :func:`~distill.loaders.load_compact.load_compact` and require the same
            logits on a fixed probe.

    Returns:
        ``out_dir``.

    """
    with atomic_directory(out_dir) as tmp:
        spec = describe(model)
        aliases = {alias for names in spec["ties"] for alias in names[1:]}
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in aliases}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "compact.json").write_text(json.dumps(spec, indent=2))
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.copyfile(loader.__file__, tmp / "load_compact.py")
        if verify:
            check_compact(model, tmp)
    return Path(out_dir)


def check_compact(model: nn.Module, folder: str | Path, atol: float = 1e-5) -> float:
    """Reload ``folder`` with the compact loader and compare logits with ``model``; returns the max diff."""
    reloaded = load_compact(folder, dtype=next(model.parameters()).dtype)
    return compare_logits(model, reloaded, f"compact export at {folder}", atol)


def holds_quantized_weights(model: nn.Module) -> bool:
    """Whether any parameter is a torchao quantized tensor (as after QAT convert)."""
    return any(is_quantized(p) for p in model.parameters())


def compact_unless_quantized(model: nn.Module, tokenizer: Any, out_dir: Path, who: str) -> Path | None:
    """Write the compact export, or skip it (with a warning) for a QAT-converted student.

    The compact format stores plain tensors; a quantized student is stored by QAT's own export, and the
    plain export holds its dequantized weights. ``who`` names the stage in the warning.
    """
    if holds_quantized_weights(model):
        log.warning(
            "%s: the student holds quantized weights, so its compact export is skipped; "
            "use the QAT export and the plain (dequantized) export",
            who,
        )
        return None
    return save_compact(model, tokenizer, out_dir)
