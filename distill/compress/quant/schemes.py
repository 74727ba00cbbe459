"""Quantization schemes on torchao, shared by QAT (:mod:`.qat`) and PTQ (:mod:`.ptq`) in this package.

A scheme is a name that maps to one torchao post-training config. QAT wraps that config in
``QATConfig(base, step="prepare" | "convert")``; PTQ applies it directly. Both therefore produce the same
quantized tensors, which is what makes the QAT-vs-PTQ comparison fair.

Every scheme converts to torchao's ``IntxUnpackedToInt8Tensor`` (int8 storage, one scale and zero point per
group or row), because that is the layout whose QAT convert step and forward work on CPU as well as CUDA.
torchao's ``Int4WeightOnlyConfig`` (tinygemm/preshuffled int4) prepares on CPU but cannot convert there, so
``int4_weight_only`` uses ``IntxWeightOnlyConfig(torch.int4, PerGroup(g))`` instead: same 4-bit grid, but the
values are kept one per byte in memory. :func:`distill.export.quantized.size_report` reports that honestly
(storage bits per weight).

The compact export of a quantized model (``save_quantized`` / ``load_quantized``) is in
:mod:`distill.export.quantized`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerAxis, PerGroup
from torchao.utils import TorchAOBaseTensor

from distill.config import config_error

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
