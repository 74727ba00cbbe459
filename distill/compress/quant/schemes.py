"""Quantization schemes shared by QAT (``callbacks/qat.py``) and PTQ (:mod:`distill.compress.quant.ptq`), built on torchao.

A scheme is a name that maps to one torchao post-training config. QAT wraps that config in
``QATConfig(base, step="prepare" | "convert")``; PTQ applies it directly. Both therefore produce the same
quantized tensors, which is what makes the QAT-vs-PTQ comparison fair.

Every scheme converts to torchao's ``IntxUnpackedToInt8Tensor`` (int8 storage, one scale and zero point per
group or row), because that is the layout whose QAT convert step and forward work on CPU as well as CUDA.
torchao's ``Int4WeightOnlyConfig`` (tinygemm/preshuffled int4) prepares on CPU but cannot convert there, so
``int4_weight_only`` uses ``IntxWeightOnlyConfig(torch.int4, PerGroup(g))`` instead: same 4-bit grid, but the
values are kept one per byte in memory. :func:`size_report` reports that honestly (storage bits per weight).

The compact export (:func:`save_quantized` / :func:`load_quantized`) is a safetensors file written with
torchao's tensor-subclass flattening (int4 codes packed two per byte with torchao's bit packing) plus
``quantization.json``; ``save_pretrained`` of a converted model
fails in transformers, and a state dict loaded with ``assign=True`` into a model that went through the same
``quantize_`` round-trips exactly.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerAxis, PerGroup
from torchao.utils import TorchAOBaseTensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.config import config_error
from distill.export.hf import atomic_directory

FORMAT = "distill-torchao-v1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "quantization.json"
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32
# Embeddings, the output head and norms stay in full precision by default: they hold few of a small
# model's weights relative to their effect on quality, and torchao's QAT supports only Linear/Embedding.
DEFAULT_SKIP = ("lm_head", "*embed*", "*norm*")


@dataclass(frozen=True)
class Scheme:
    """One named scheme: bits of the weights, whether activations are quantized, whether grouped."""

    name: str
    weight_dtype: torch.dtype
    weight_bits: int
    act_bits: int | None
    grouped: bool
    description: str


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8_weight_only", torch.int8, 8, None, False, "int8 weights, one scale per output row"),
        Scheme("int4_weight_only", torch.int4, 4, None, True, "int4 weights, one scale per group"),
        Scheme(
            "int8_dynact_int4_weight",
            torch.int4,
            4,
            8,
            True,
            "int4 weights per group, int8 per-token dynamic activations (8da4w)",
        ),
        Scheme(
            "int8_dynact_int8_weight",
            torch.int8,
            8,
            8,
            False,
            "int8 weights per row, int8 per-token dynamic activations",
        ),
    )
}


def get_scheme(name: str, field: str = "scheme") -> Scheme:
    """The scheme called ``name``; an unknown name is a ConfigError listing the known ones."""
    if name not in SCHEMES:
        raise config_error(field, name, f"unknown quantization scheme; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def resolve_group_size(scheme: Scheme, group_size: int | None, field: str = "group_size") -> int | None:
    """Validate ``group_size`` for ``scheme``: one of :data:`GROUP_SIZES` for grouped schemes, unset otherwise."""
    if not scheme.grouped:
        if group_size is not None:
            raise config_error(
                field, group_size, f"{scheme.name} quantizes per output row and takes no group size; leave it null"
            )
        return None
    if group_size is None:
        return DEFAULT_GROUP_SIZE
    if group_size not in GROUP_SIZES:
        raise config_error(field, group_size, f"{scheme.name} supports group sizes {', '.join(map(str, GROUP_SIZES))}")
    return int(group_size)


def base_config(scheme: Scheme, group_size: int | None) -> AOBaseConfig:
    """The torchao post-training config of a scheme (QAT wraps it in ``QATConfig``; PTQ applies it as is)."""
    granularity = PerGroup(group_size) if scheme.grouped else PerAxis(0)
    if scheme.act_bits is None:
        return IntxWeightOnlyConfig(weight_dtype=scheme.weight_dtype, granularity=granularity)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=scheme.weight_dtype, weight_granularity=granularity)


def module_filter(skip: Sequence[str]) -> Callable[[nn.Module, str], bool]:
    """``filter_fn`` for ``quantize_``: Linear layers whose dotted name matches none of the ``skip`` globs."""
    patterns = list(skip)

    def keep(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and not any(fnmatch.fnmatchcase(fqn, p) for p in patterns)

    return keep


def targets(model: nn.Module, skip: Sequence[str]) -> list[str]:
    """Names of the modules a scheme with this skip list quantizes."""
    keep = module_filter(skip)
    return [name for name, m in model.named_modules() if keep(m, name)]


def check_targets(model: nn.Module, skip: Sequence[str], group_size: int | None, prefix: str = "") -> None:
    """Refuse a skip list that leaves no Linear to quantize, and a group size that does not fit every target.

    The group size must divide the in-features of every targeted Linear; the error names the first layer
    it does not fit and the supported sizes that fit all of them.
    """
    widths = {name: model.get_submodule(name).in_features for name in targets(model, skip)}
    if not widths:
        raise config_error(f"{prefix}skip", list(skip), "it leaves no nn.Linear to quantize; skip fewer modules")
    if group_size is None:
        return
    field = f"{prefix}group_size"
    for name, n in widths.items():
        if n % group_size:
            fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths.values())]
            raise config_error(
                field,
                group_size,
                f"it does not divide the in_features={n} of {name}; "
                + (f"use one of {fits}" if fits else "no supported group size fits; add the layer to the skip list"),
            )


@dataclass(frozen=True)
class QuantSpec:
    """Everything needed to quantize a model again: the scheme name, group size and skip globs."""

    scheme: str
    group_size: int | None
    skip: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(d["scheme"], d["group_size"], tuple(d["skip"]))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (stored in checkpoints' structure log and ``quantization.json``)."""
        return {"scheme": self.scheme, "group_size": self.group_size, "skip": list(self.skip)}

    def base_config(self) -> AOBaseConfig:
        """The torchao PTQ config."""
        return base_config(get_scheme(self.scheme), self.group_size)

    def filter(self) -> Callable[[nn.Module, str], bool]:
        """The ``filter_fn`` selecting the modules to quantize."""
        return module_filter(self.skip)


def make_spec(scheme: str, group_size: int | None, skip: Sequence[str] | None, prefix: str = "") -> QuantSpec:
    """Validate user settings into a :class:`QuantSpec`; ``prefix`` names the config node in errors."""
    s = get_scheme(scheme, f"{prefix}scheme")
    gs = resolve_group_size(s, group_size, f"{prefix}group_size")
    return QuantSpec(s.name, gs, tuple(DEFAULT_SKIP if skip is None else skip))


def ptq(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Post-training quantization: apply the scheme's torchao config directly, no training (in place)."""
    check_targets(model, spec.skip, spec.group_size)
    quantize_(model, spec.base_config(), filter_fn=spec.filter())
    return model


def is_quantized(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torchao quantized tensor (subclass), as after convert or PTQ."""
    return isinstance(t, TorchAOBaseTensor)


def _tensor_bytes(t: torch.Tensor) -> int:
    if is_quantized(t):
        names = list(t.tensor_data_names) + list(getattr(t, "optional_tensor_data_names", []) or [])
        return sum(_tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def size_report(model: nn.Module, folder: str | Path | None = None) -> dict[str, float]:
    """Measured sizes: bytes in memory (shared tensors once), bits per quantized weight, weights file size.

    ``bits_per_weight`` counts everything a quantized weight stores (int8 codes, scales, zero points)
    over its number of weights; ``nominal_bits`` is the quantization grid. They differ because torchao's
    CPU-capable layout keeps int4 codes one per byte.
    """
    seen: set[int] = set()
    total = quant_bytes = quant_numel = fp_bytes = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        b = _tensor_bytes(t)
        total += b
        if is_quantized(t):
            quant_bytes += b
            quant_numel += t.numel()
        else:
            fp_bytes += b
    out = {
        "memory_bytes": float(total),
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
        stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rsplit("._weight_", 1)[0] in names)
        meta["size"]["disk_bits_per_weight"] = 8.0 * stored / meta["size"]["quantized_weights"] if names else None
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        verify_reload(model, tmp)
    return Path(out_dir)


def load_quantized(folder: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a folder written by :func:`save_quantized` (the QAT compact export or ``python -m distill.compress.quant.ptq``).

    Rebuilds the architecture from ``config.json``, applies the same ``quantize_`` so every targeted Linear
    holds a quantized tensor of the right type and shape, then loads the saved tensors with
    ``load_state_dict(..., assign=True)``. Needs torch, transformers and torchao, not this package's training code.

    Example::

        from distill.compress.quant.schemes import load_quantized
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


@torch.no_grad()
def verify_reload(model: PreTrainedModel, folder: str | Path) -> float:
    """Reload ``folder`` with :func:`load_quantized` and require logits identical to ``model``'s."""
    device = next(model.parameters()).device
    reloaded = load_quantized(folder, device=device)
    vocab = model.get_output_embeddings().weight.shape[0]
    probe = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        expected = model(input_ids=probe).logits
    finally:
        model.train(was_training)
    diff = float((reloaded(input_ids=probe).logits - expected).abs().max())
    if diff != 0.0:
        raise RuntimeError(f"quantized export at {folder} does not reproduce the model (max |Δlogit| = {diff:.3g})")
    return diff


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
