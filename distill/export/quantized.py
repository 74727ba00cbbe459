"""The compact export of a quantized student (QAT or PTQ): torchao tensors in safetensors plus ``quantization.json``.

:func:`save_quantized` writes a safetensors file with torchao's tensor-subclass flattening (int4 codes
packed two per byte with torchao's bit packing) plus ``quantization.json``; ``save_pretrained`` of a
converted model fails in transformers, and a state dict loaded with ``assign=True`` into a model that went
through the same ``quantize_`` round-trips exactly (:func:`load_quantized`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torchao.quantization import quantize_
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.compress.quant.schemes import QuantSpec, is_quantized
from distill.config import config_error
from distill.eval.cost import memory_bytes, tensor_bytes, unique_tensors
from distill.export.hf import compare_logits
from distill.runtime.files import atomic_directory

FORMAT = "distill-torchao-v1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "quantization.json"


def size_report(model: nn.Module, folder: str | Path | None = None) -> dict[str, float]:
    """Measured sizes: bytes in memory (shared tensors once), bits per quantized weight, weights file size.

    ``memory_bytes`` is :func:`distill.eval.cost.memory_bytes`, the figure the report shows.
    ``bits_per_weight`` counts everything a quantized weight stores (int8 codes, scales, zero points)
    over its number of weights; it differs from the nominal grid because torchao's CPU-capable layout
    keeps int4 codes one per byte.
    """
    quant_bytes = quant_numel = fp_bytes = 0
    for t in unique_tensors(model):
        if is_quantized(t):
            quant_bytes += tensor_bytes(t)
            quant_numel += t.numel()
        else:
            fp_bytes += tensor_bytes(t)
    out = {
        "memory_bytes": float(memory_bytes(model)),
        "quantized_weights": float(quant_numel),
        "quantized_bytes": float(quant_bytes),
        "unquantized_bytes": float(fp_bytes),
        "bits_per_weight": 8.0 * quant_bytes / quant_numel if quant_numel else float("nan"),
    }
    if folder is not None:
        out["disk_bytes"] = float((Path(folder) / WEIGHTS_FILE).stat().st_size)
    return out


def _flatten(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Flatten the state dict with torchao's safetensors support; tied (shared) plain tensors are written once."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state, tied, seen = {}, [], {}
    for key, value in model.state_dict().items():
        if not is_quantized(value):
            ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if ptr in seen:  # safetensors refuses shared memory; the loader re-ties these from the config
                tied.append(key)
                continue
            seen[ptr] = key
            value = value.contiguous()
        state[key] = value
    tensors, metadata = flatten_tensor_state_dict(state)
    return tensors, metadata, tied


def _int4_code_keys(model: nn.Module) -> list[str]:
    """Flattened names of the int8-stored codes of int4 weights (``<module>._weight_qdata``)."""
    return [
        f"{name}._weight_qdata"
        for name, m in model.named_modules()
        if is_quantized(getattr(m, "weight", None)) and getattr(m.weight, "target_dtype", None) == torch.int4
    ]


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two int4 codes per byte on disk (torchao's bit packing), halving the int8-stored codes."""
    from torchao.prototype.dtypes.uintx.bitpacking import pack

    return pack((codes.to(torch.int16) + 8).to(torch.uint8), elem_size=4, dim=-1)[0]


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    from torchao.prototype.dtypes.uintx.bitpacking import unpack

    return (unpack([packed], elem_size=4, dim=-1).to(torch.int16) - 8).to(torch.int8)


def save_quantized(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    spec: QuantSpec,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a quantized model as ``model.safetensors`` + ``config.json`` + ``quantization.json`` (+ tokenizer).

    The folder is assembled next to ``out_dir`` and renamed into place only when complete, so a failure
    never replaces a good export. It is checked by reloading with :func:`load_quantized` and comparing
    logits with ``model`` (they must be identical).
    """
    import torchao

    with atomic_directory(out_dir) as tmp:
        tensors, metadata, tied = _flatten(model)
        packed = [k for k in _int4_code_keys(model) if k in tensors]
        for key in packed:
            tensors[key] = _pack_int4(tensors[key])
        save_file(tensors, tmp / WEIGHTS_FILE, metadata=metadata)
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "format": FORMAT,
            **spec.to_dict(),
            "tied_keys": tied,
            "packed_int4": packed,
            "torchao_version": torchao.__version__,
            "torch_version": torch.__version__,
            "base_config": repr(spec.base_config()),
            **(extra or {}),
        }
        meta["size"] = size_report(model, tmp)
        # The same count for the file: codes (int4 ones packed two per byte), scales and zero points.
        names = [n for n, m in model.named_modules() if is_quantized(getattr(m, "weight", None))]
        stored = sum(tensor_bytes(t) for k, t in tensors.items() if k.rsplit("._weight_", 1)[0] in names)
        meta["size"]["disk_bits_per_weight"] = 8.0 * stored / meta["size"]["quantized_weights"] if names else None
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        verify_reload(model, tmp)
    return Path(out_dir)


def load_quantized(folder: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a folder written by :func:`save_quantized` (QAT's compact export, ``python -m distill.compress.quant.ptq``).

    Rebuilds the architecture from ``config.json``, applies the same ``quantize_`` so every targeted Linear
    holds a quantized tensor of the right type and shape, then loads the saved tensors with
    ``load_state_dict(..., assign=True)``. Needs torch, transformers and torchao, not this package's training code.

    Example::

        from distill.export.quantized import load_quantized
        model = load_quantized("logs/train/runs/<run>/student_quantized")
    """
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise config_error("folder", str(folder), f"no {META_FILE}; give a folder written by save_quantized")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise config_error("folder", str(folder), f"{META_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
    spec = QuantSpec.from_dict(meta)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    quantize_(model, spec.base_config(), filter_fn=spec.filter())
    with safe_open(folder / WEIGHTS_FILE, framework="pt", device=str(device)) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        metadata = f.metadata()
    for key in meta.get("packed_int4", []):
        tensors[key] = _unpack_int4(tensors[key])
    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise RuntimeError(f"{folder / WEIGHTS_FILE}: unrecognised tensors {sorted(leftover)[:5]}")
    result = model.load_state_dict(state, strict=False, assign=True)
    if sorted(result.missing_keys) != sorted(meta["tied_keys"]) or result.unexpected_keys:
        raise RuntimeError(
            f"{folder}: weights do not fit the architecture (missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys})"
        )
    if meta["tied_keys"]:
        model.tie_weights()
    return model.to(device).eval()


def verify_reload(model: PreTrainedModel, folder: str | Path) -> float:
    """Reload ``folder`` with :func:`load_quantized` and require logits identical to ``model``'s."""
    reloaded = load_quantized(folder, device=next(model.parameters()).device)
    return compare_logits(model, reloaded, f"quantized export at {folder}", atol=0.0)


def dequantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A plain copy of ``model`` whose quantized weights are replaced by their dequantized float values.

    For weight-only schemes it computes exactly what the quantized model computes; for schemes that also
    quantize activations it keeps the quantized weights but runs activations in full precision.
    """
    plain = copy.deepcopy(model)
    for module in plain.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if is_quantized(p):
                setattr(module, name, nn.Parameter(p.dequantize(), requires_grad=False))
    return plain


def plain_architecture(model: PreTrainedModel) -> bool:
    """Whether the model's parameter names are those of a fresh model built from its config.

    :func:`load_quantized` rebuilds the architecture from ``config.json``, so only such models can be saved.
    """
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(model.config)
    return set(reference.state_dict()) == set(model.state_dict())
