"""The compact export of a quantized student (QAT or PTQ): torchao tensors in safetensors plus ``quantization.json``.

:func:`save_quantized` writes a safetensors file with torchao's tensor-subclass flattening (int2..int6
codes packed to their width with torchao's bit packing: int4 two per byte, int3 eight per three bytes)
plus ``quantization.json``; a quantized tensor shared by several modules (a tied embedding/head) is written
once; ``save_pretrained`` of a
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
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.compress.quant.schemes import QuantSpec, apply, is_quantized
from distill.compress.quant.sizes import size_report
from distill.config import config_error
from distill.cost import tensor_bytes
from distill.export.hf import compare_logits
from distill.runtime.files import atomic_directory

FORMAT = "distill-torchao-v1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "quantization.json"


def flatten_quantized(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Flatten the state dict with torchao's safetensors support; tied (shared) tensors are written once."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state, tied, seen = {}, [], {}
    # state_dict() detaches each entry into a new wrapper, so shared quantized weights are found by the
    # identity of the Parameters themselves.
    params = model.state_dict(keep_vars=True)
    owners: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if is_quantized(value):
            if id(params[key]) in owners:  # the loader re-ties these from the config, as for plain tensors
                tied.append(key)
                continue
            owners[id(params[key])] = key
        else:
            ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if ptr in seen:  # safetensors refuses shared memory; the loader re-ties these from the config
                tied.append(key)
                continue
            seen[ptr] = key
            value = value.contiguous()
        state[key] = value
    tensors, metadata = flatten_tensor_state_dict(state)
    return tensors, metadata, tied


# Code widths packed on disk; int8 codes are already one per byte.
PACKED_BITS = {torch.int1: 1, torch.int2: 2, torch.int3: 3, torch.int4: 4, torch.int5: 5, torch.int6: 6, torch.int7: 7}


def _code_keys(model: nn.Module) -> dict[str, int]:
    """Flattened names of the int8-stored codes of sub-byte weights (``<module>._weight_qdata``) → bits."""
    out = {}
    for name, m in model.named_modules():
        bits = PACKED_BITS.get(getattr(getattr(m, "weight", None), "target_dtype", None))
        if bits is not None and is_quantized(m.weight) and m.weight.qdata.shape[-1] % 8 == 0:
            out[f"{name}._weight_qdata"] = bits
    return out


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``bits``-wide codes packed along the last dim (torchao's bit packing): ``bits/8`` bytes per code.

    torchao splits a width into 4-, 2- and 1-bit shards (3 = 2 + 1); they are concatenated along the last
    dim, whose shard sizes :func:`_unpack` recomputes from the width.
    """
    from torchao.prototype.dtypes.uintx.bitpacking import pack

    shards = pack((codes.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8), elem_size=bits, dim=-1)
    return torch.cat(list(shards), dim=-1)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    from torchao.prototype.dtypes.uintx.bitpacking import numbits, unpack

    width = packed.shape[-1] * 8 // bits
    shards = torch.split(packed, [width * n // 8 for n in numbits[bits]], dim=-1)
    return (unpack(list(shards), elem_size=bits, dim=-1).to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


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
        tensors, metadata, tied = flatten_quantized(model)
        packed = {k: bits for k, bits in _code_keys(model).items() if k in tensors}
        for key, bits in packed.items():
            tensors[key] = _pack(tensors[key], bits)
        save_file(tensors, tmp / WEIGHTS_FILE, metadata=metadata)
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "format": FORMAT,
            **spec.to_dict(),
            "tied_keys": tied,
            # int4 keys keep their own list (the format's first packed width); other widths name theirs.
            "packed_int4": [k for k, bits in packed.items() if bits == 4],
            "packed_intx": {k: bits for k, bits in packed.items() if bits != 4},
            "torchao_version": torchao.__version__,
            "torch_version": torch.__version__,
            "base_config": repr(spec.base_config()),  # module_schemes (in the spec) name the others
            **(extra or {}),
        }
        meta["size"] = size_report(model, tmp)
        # The same count for the file: codes (sub-byte ones packed), scales and zero points.
        names = [n for n, m in model.named_modules() if is_quantized(getattr(m, "weight", None))]
        stored = sum(tensor_bytes(t) for k, t in tensors.items() if k.rsplit("._weight_", 1)[0] in names)
        meta["size"]["disk_bits_per_weight"] = 8.0 * stored / meta["size"]["quantized_weights"] if names else None
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        verify_reload(model, tmp)
    return Path(out_dir)


def load_quantized(folder: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a folder written by :func:`save_quantized` (QAT's compact export, ``python -m distill.export.ptq``).

    Rebuilds the architecture from ``config.json``, applies the same ``quantize_`` so every targeted module
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
    apply(model, spec)
    with safe_open(folder / WEIGHTS_FILE, framework="pt", device=str(device)) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        metadata = f.metadata()
    packed = {**dict.fromkeys(meta.get("packed_int4", []), 4), **meta.get("packed_intx", {})}
    for key, bits in packed.items():
        tensors[key] = _unpack(tensors[key], bits)
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


def dequantized_copy(model: PreTrainedModel, spec: QuantSpec | None = None) -> PreTrainedModel:
    """A plain copy of ``model`` whose quantized weights are replaced by their dequantized float values.

    For weight-only schemes it computes exactly what the quantized model computes; for schemes that also
    quantize activations it keeps the quantized weights but runs activations in full precision (with ``spec``,
    a warning says so).
    """
    if spec is not None and spec.any_act_bits():
        import logging

        logging.getLogger("distill").warning(
            "the plain export of a %s student has its quantized weights but full-precision activations; "
            "load the compact export with distill.export.quantized.load_quantized for the exact model",
            spec.scheme,
        )
    plain = copy.deepcopy(model)
    done: dict[int, nn.Parameter] = {}  # one plain Parameter per quantized one, so tied weights stay tied
    for module in plain.modules():
        for name, p in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            if is_quantized(p):
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(p.dequantize(), requires_grad=False)
                setattr(module, name, done[id(p)])
    return plain


def plain_architecture(model: PreTrainedModel) -> bool:
    """Whether the model's parameter names are those of a fresh model built from its config.

    :func:`load_quantized` rebuilds the architecture from ``config.json``, so only such models can be saved.
    """
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(model.config)
    return set(reference.state_dict()) == set(model.state_dict())


def save_checked(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, spec: QuantSpec
) -> Path | None:
    """:func:`save_quantized` for a converted QAT student, with its size logged.

    None (and a warning) when the student's layers are not its config's architecture (low-rank factors), which
    :func:`load_quantized` could not rebuild.
    """
    import logging

    log = logging.getLogger("distill")
    if not plain_architecture(model):
        log.warning(
            "QuantizationAwareTraining: the student's layers differ from its config's architecture (low-rank "
            "factors), so no quantized export is written; the plain export holds the dequantized model"
        )
        return None
    out = save_quantized(model, tokenizer, out_dir, spec)
    size = json.loads((out / META_FILE).read_text())["size"]
    log.info(
        "quantized export %s: weights file %.2f MiB, %.2f bits per quantized weight on disk",
        out,
        size["disk_bytes"] / 2**20,
        size["disk_bits_per_weight"],
    )
    return out
