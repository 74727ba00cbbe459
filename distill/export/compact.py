"""Writing the compact form of a shared, factorised or LoRA-relaxed student (the format is described in the loader).

The loading side, :mod:`distill.export.loaders.load_compact`, is copied verbatim into every compact folder
so that it loads without this package; everything that only the writer needs lives here.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from distill.compress.quant.schemes import is_quantized
from distill.export.hf import atomic_directory, compare_logits
from distill.export.loaders import load_compact as loader
from distill.export.loaders.load_compact import FORMAT, VERSION, LowRankLinear, load_compact, lora_layers, tie_groups

log = logging.getLogger("distill")


def describe(model: nn.Module) -> dict[str, Any]:
    """The structure of ``model`` beyond its plain architecture, as stored in ``compact.json``."""
    lowrank = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
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
    return {"format": FORMAT, "version": VERSION, "lowrank": lowrank, "lora": lora, "ties": tie_groups(model)}


def save_compact(model: nn.Module, tokenizer: Any, out_dir: str | Path, verify: bool = True) -> Path:
    """Write ``model`` in the compact form, atomically, with the loader file, and check the reload.

    Args:
        model: the live student (a transformers model, possibly with tied layers, factors and LoRA).
        tokenizer: saved next to the weights when given.
        out_dir: the folder to write; replaced only once the new one is complete and verified.
        verify: reload with :func:`~distill.export.loaders.load_compact.load_compact` and require the same
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
