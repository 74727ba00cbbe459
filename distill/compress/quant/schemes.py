"""Quantization schemes on torchao, shared by QAT (:mod:`.qat`) and PTQ (:mod:`.ptq`) in this package.

A scheme is a name that maps to one torchao post-training config. QAT wraps that config in
``QATConfig(base, step="prepare" | "convert")``; PTQ applies it directly. Both therefore produce the same
quantized tensors, which is what makes the QAT-vs-PTQ comparison fair.

Every scheme converts to torchao's ``IntxUnpackedToInt8Tensor`` (int8 storage, one scale and zero point per
group or row), because that is the layout whose QAT convert step and forward work on CPU as well as CUDA.
torchao's ``Int4WeightOnlyConfig`` (tinygemm/preshuffled int4) prepares on CPU but cannot convert there, so
``int4_weight_only`` uses ``IntxWeightOnlyConfig(torch.int4, PerGroup(g))`` instead: same 4-bit grid, but the
values are kept one per byte in memory. :func:`distill.compress.quant.sizes.size_report` reports that honestly
(storage bits per weight). The same holds for the int2/int3/int5/int6 schemes (PTQ's cliff curve); on disk
:func:`~distill.export.quantized.save_quantized` packs all of them to their nominal width.

A spec quantizes ``nn.Linear`` layers by default. ``modules=("linear", "embedding")`` adds ``nn.Embedding``
tables (weight-only schemes only: a lookup has no activations to quantize) when the skip globs let them
through; :data:`DEFAULT_SKIP` keeps them out, so QAT's default targets are unchanged. A Parameter shared by
several targets (tied input/output embeddings) is quantized once and stays shared (:func:`apply`), which is
what the compact export then stores.

The compact export of a quantized model (``save_quantized`` / ``load_quantized``) is in
:mod:`distill.export.quantized`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerAxis, PerGroup
from torchao.utils import TorchAOBaseTensor

from distill.compress.quant.gguf_grid import BLOCKS as GGUF_BLOCKS
from distill.compress.quant.gguf_grid import KINDS as GGUF_KINDS
from distill.config import config_error

GROUP_SIZES = (32, 64, 128)  # the usual choices; any multiple of GROUP_MULTIPLE up to MAX_GROUP_SIZE is accepted
# Group sizes are multiples of 32 because that is what torchao's packed int4 kernels need; the
# IntxUnpackedToInt8Tensor layout used here takes any divisor of the width. Widths such as SmolLM2's 576
# (= 64 · 9) have no group of 128, so 96 or 192 are what make its int4 model fit 1/7 of the fp32 bytes.
GROUP_MULTIPLE = 32
MAX_GROUP_SIZE = 1024
DEFAULT_GROUP_SIZE = 32
# Embeddings, the output head and norms stay in full precision by default: they hold few of a small
# model's weights relative to their effect on quality, and torchao's QAT supports only Linear/Embedding.
DEFAULT_SKIP = ("lm_head", "*embed*", "*norm*")
# The module types a spec may target, by the name used in configs and quantization.json.
MODULE_KINDS: dict[str, type[nn.Module]] = {"linear": nn.Linear, "embedding": nn.Embedding}
DEFAULT_MODULES = ("linear",)


@dataclass(frozen=True)
class Scheme:
    """One named scheme: bits of the weights, whether activations are quantized, whether grouped."""

    name: str
    weight_dtype: torch.dtype
    weight_bits: int
    act_bits: int | None
    grouped: bool
    description: str
    gguf: str | None = None  # llama.cpp block type whose grid this scheme is (distill.compress.quant.gguf_grid)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8_weight_only", torch.int8, 8, None, False, "int8 weights, one scale per output row"),
        Scheme("int6_weight_only", torch.int6, 6, None, True, "int6 weights, one scale per group"),
        Scheme("int5_weight_only", torch.int5, 5, None, True, "int5 weights, one scale per group"),
        Scheme("int4_weight_only", torch.int4, 4, None, True, "int4 weights, one scale per group"),
        Scheme("int3_weight_only", torch.int3, 3, None, True, "int3 weights, one scale per group"),
        Scheme("int2_weight_only", torch.int2, 2, None, True, "int2 weights, one scale per group"),
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
        # llama.cpp's own block grids (blocks of 32, fp16 scales): QAT only; the GGUF export writes them as trained.
        Scheme("gguf_q8_0", torch.int8, 8, None, True, "llama.cpp Q8_0: int8 codes, fp16 scale per 32", "q8_0"),
        Scheme("gguf_q4_0", torch.int4, 4, None, True, "llama.cpp Q4_0: 4-bit codes, fp16 scale per 32", "q4_0"),
        Scheme(
            "gguf_q4_1", torch.int4, 4, None, True, "llama.cpp Q4_1: 4-bit codes, fp16 scale and min per 32", "q4_1"
        ),
        # The K-quants hold rows 256k wide only; on narrower rows give them to some modules (gguf_types).
        Scheme(
            "gguf_q4_k", torch.int4, 4, None, True, "llama.cpp Q4_K: 4-bit codes, 6-bit scale and min per 32", "q4_k"
        ),
        Scheme("gguf_q3_k", torch.int3, 3, None, True, "llama.cpp Q3_K: 3-bit codes, 6-bit scale per 16", "q3_k"),
        # IQ4_NL: Q4_0's size (4.5 bits per weight), its 16 levels spaced as weights are (denser near zero).
        Scheme(
            "gguf_iq4_nl",
            torch.int4,
            4,
            None,
            True,
            "llama.cpp IQ4_NL: 4-bit codes into 16 non-linear levels, fp16 scale per 32",
            "iq4_nl",
        ),
    )
}


def get_scheme(name: str, field: str = "scheme") -> Scheme:
    """The scheme called ``name``; an unknown name is a ConfigError listing the known ones."""
    if name not in SCHEMES:
        raise config_error(field, name, f"unknown quantization scheme; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def resolve_group_size(scheme: Scheme, group_size: int | None, field: str = "group_size") -> int | None:
    """Validate ``group_size`` for ``scheme``: a multiple of 32 (up to 1024) for grouped schemes, unset otherwise."""
    if scheme.gguf is not None:
        block = GGUF_BLOCKS[scheme.gguf]
        if group_size not in (None, block):
            raise config_error(
                field, group_size, f"{scheme.name} is llama.cpp's grid of blocks of {block}; leave it null"
            )
        return block
    if not scheme.grouped:
        if group_size is not None:
            raise config_error(
                field, group_size, f"{scheme.name} quantizes per output row and takes no group size; leave it null"
            )
        return None
    if group_size is None:
        return DEFAULT_GROUP_SIZE
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or group_size % GROUP_MULTIPLE
        or not 0 < group_size <= MAX_GROUP_SIZE
    ):
        raise config_error(
            field,
            group_size,
            f"{scheme.name} takes a group size that is a multiple of {GROUP_MULTIPLE} up to {MAX_GROUP_SIZE} "
            f"(usually one of {', '.join(map(str, GROUP_SIZES))})",
        )
    return int(group_size)


def base_config(scheme: Scheme, group_size: int | None) -> AOBaseConfig:
    """The torchao post-training config of a scheme (QAT wraps it in ``QATConfig``; PTQ applies it as is)."""
    if scheme.gguf is not None:
        raise config_error(
            "scheme",
            scheme.name,
            "llama.cpp grids are for QAT (callbacks.qat.scheme); to quantize a model to "
            f"{scheme.gguf} after training, write a GGUF file: python -m distill.export.gguf model=<export> "
            f"type={scheme.gguf}",
        )
    granularity = PerGroup(group_size) if scheme.grouped else PerAxis(0)
    if scheme.act_bits is None:
        return IntxWeightOnlyConfig(weight_dtype=scheme.weight_dtype, granularity=granularity)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=scheme.weight_dtype, weight_granularity=granularity)


def resolve_modules(scheme: Scheme, modules: Sequence[str] | None, field: str = "modules") -> tuple[str, ...]:
    """Validate the module kinds a spec targets (:data:`MODULE_KINDS`); ``None`` is :data:`DEFAULT_MODULES`."""
    kinds = tuple(DEFAULT_MODULES if modules is None else modules)
    unknown = [k for k in kinds if k not in MODULE_KINDS]
    if unknown or not kinds:
        raise config_error(field, list(kinds), f"choose a non-empty list of {', '.join(MODULE_KINDS)}")
    if "embedding" in kinds and scheme.act_bits is not None:
        raise config_error(
            field,
            list(kinds),
            f"{scheme.name} quantizes activations, which a table lookup has none of; use a weight-only scheme",
        )
    return kinds


def module_filter(skip: Sequence[str], modules: Sequence[str] = DEFAULT_MODULES) -> Callable[[nn.Module, str], bool]:
    """``filter_fn`` for ``quantize_``: modules of the ``modules`` kinds whose dotted name matches no ``skip`` glob."""
    patterns = list(skip)
    types = tuple(MODULE_KINDS[k] for k in modules)

    def keep(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, types) and not any(fnmatch.fnmatchcase(fqn, p) for p in patterns)

    return keep


def targets(model: nn.Module, skip: Sequence[str], modules: Sequence[str] = DEFAULT_MODULES) -> list[str]:
    """Names of the modules a scheme with this skip list (and these module kinds) quantizes."""
    keep = module_filter(skip, modules)
    return [name for name, m in model.named_modules() if keep(m, name)]


def _group_axis_width(module: nn.Module) -> int:
    """The width torchao groups along: a Linear's in-features, an Embedding's vector width (rows are tokens)."""
    return module.embedding_dim if isinstance(module, nn.Embedding) else module.in_features


def check_targets(
    model: nn.Module,
    skip: Sequence[str],
    group_size: int | None,
    prefix: str = "",
    modules: Sequence[str] = DEFAULT_MODULES,
) -> None:
    """Refuse a skip list that leaves nothing to quantize, and a group size that does not fit every target.

    The group size must divide the in-features of every targeted Linear (the embedding width of every
    targeted Embedding); the error names the first module it does not fit and the supported sizes that fit
    all of them.
    """
    widths = {name: _group_axis_width(model.get_submodule(name)) for name in targets(model, skip, modules)}
    if not widths:
        what = " or ".join(MODULE_KINDS[k].__name__ for k in modules)
        raise config_error(f"{prefix}skip", list(skip), f"it leaves no nn.{what} to quantize; skip fewer modules")
    if group_size is None:
        return
    field = f"{prefix}group_size"
    for name, n in widths.items():
        if n % group_size:
            axis = "embedding_dim" if isinstance(model.get_submodule(name), nn.Embedding) else "in_features"
            sizes = range(GROUP_MULTIPLE, MAX_GROUP_SIZE + 1, GROUP_MULTIPLE)
            fits = [g for g in sizes if all(w % g == 0 for w in widths.values())]
            raise config_error(
                field,
                group_size,
                f"it does not divide the {axis}={n} of {name}; "
                + (f"use one of {fits}" if fits else "no supported group size fits; add the layer to the skip list"),
            )


@dataclass(frozen=True)
class QuantSpec:
    """Everything needed to quantize a model again: the scheme name, group size, skip globs and module kinds."""

    scheme: str
    group_size: int | None
    skip: tuple[str, ...]
    modules: tuple[str, ...] = DEFAULT_MODULES
    # (glob, llama.cpp type) pairs for gguf_* schemes: a target whose name matches takes that type instead of
    # the scheme's; the last matching pair wins (a mixed file, as llama.cpp's Q4_K_M mixes types).
    gguf_types: tuple[tuple[str, str], ...] = ()
    # gguf_* schemes: the trained block scales' rate over the weights' (learned_scales.py); None: the grid's rule.
    scale_gain: float | None = None
    # (glob, scheme, group size) for torchao schemes: a target whose name matches is quantized with that scheme
    # instead (the last matching triple wins), e.g. a tied embedding/head kept at int4 while the layers are int3.
    module_schemes: tuple[tuple[str, str, int | None], ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        """Inverse of :meth:`to_dict`; records written before ``modules`` existed mean Linear layers only."""
        types = tuple((str(g), str(k)) for g, k in d.get("gguf_types", []))
        modules = tuple(d.get("modules", DEFAULT_MODULES))
        per_module = tuple((str(g), str(k), n) for g, k, n in d.get("module_schemes", []))
        return cls(d["scheme"], d["group_size"], tuple(d["skip"]), modules, types, d.get("scale_gain"), per_module)

    def gguf_kind(self, name: str) -> str | None:
        """The llama.cpp type of the target called ``name`` (None for torchao schemes)."""
        kind = get_scheme(self.scheme).gguf
        for glob, override in self.gguf_types:
            if fnmatch.fnmatchcase(name, glob):
                kind = override
        return kind

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (stored in checkpoints' structure log and ``quantization.json``).

        ``modules`` is written only when it is not the default, so the records of Linear-only specs (QAT
        checkpoints, replayed structure logs) stay exactly what they were.
        """
        d: dict[str, Any] = {"scheme": self.scheme, "group_size": self.group_size, "skip": list(self.skip)}
        if self.modules != DEFAULT_MODULES:
            d["modules"] = list(self.modules)
        if self.gguf_types:
            d["gguf_types"] = [list(pair) for pair in self.gguf_types]
        if self.scale_gain is not None:
            d["scale_gain"] = self.scale_gain
        if self.module_schemes:
            d["module_schemes"] = [list(triple) for triple in self.module_schemes]
        return d

    def base_config(self) -> AOBaseConfig:
        """The torchao PTQ config of the spec's own scheme (the targets no ``module_schemes`` glob matches)."""
        return base_config(get_scheme(self.scheme), self.group_size)

    def filter(self) -> Callable[[nn.Module, str], bool]:
        """The ``filter_fn`` selecting the modules to quantize."""
        return module_filter(self.skip, self.modules)

    def module_scheme(self, name: str) -> tuple[str, str, int | None] | None:
        """The ``module_schemes`` entry (glob, scheme, group size) that decides ``name``: the last match, or None."""
        return next((t for t in reversed(self.module_schemes) if fnmatch.fnmatchcase(name, t[0])), None)

    def scheme_for(self, name: str) -> tuple[str, int | None]:
        """The torchao scheme and group size of the target called ``name`` (``module_schemes``, last match)."""
        entry = self.module_scheme(name)
        return (self.scheme, self.group_size) if entry is None else entry[1:]

    def applications(self) -> list[tuple[AOBaseConfig, Callable[[nn.Module, str], bool]]]:
        """One ``(torchao config, filter_fn)`` per distinct scheme of the targets, for ``quantize_`` in turn.

        The filters are disjoint (each target has one scheme), so applying them one after another quantizes
        every target once, whatever the order.
        """
        keep = self.filter()
        out = []
        for scheme, group_size in dict.fromkeys(
            [(self.scheme, self.group_size)] + [t[1:] for t in self.module_schemes]
        ):

            def mine(module: nn.Module, fqn: str, chosen: tuple[str, int | None] = (scheme, group_size)) -> bool:
                return keep(module, fqn) and self.scheme_for(fqn) == chosen

            out.append((base_config(get_scheme(scheme), group_size), mine))
        return out

    def any_act_bits(self) -> bool:
        """Whether some target's scheme also quantizes activations (``int8_dynact_*``)."""
        names = [self.scheme] + [scheme for _, scheme, _ in self.module_schemes]
        return any(get_scheme(n).act_bits is not None for n in names)


def make_spec(
    scheme: str,
    group_size: int | None,
    skip: Sequence[str] | None,
    prefix: str = "",
    modules: Sequence[str] | None = None,
    gguf_types: Mapping[str, str] | None = None,
    module_schemes: Mapping[str, Any] | None = None,
) -> QuantSpec:
    """Validate user settings into a :class:`QuantSpec`; ``prefix`` names the config node in errors."""
    s = get_scheme(scheme, f"{prefix}scheme")
    gs = resolve_group_size(s, group_size, f"{prefix}group_size")
    kinds = resolve_modules(s, modules, f"{prefix}modules")
    types = resolve_gguf_types(s, gguf_types, f"{prefix}gguf_types")
    per_module = resolve_module_schemes(s, module_schemes, f"{prefix}module_schemes")
    return QuantSpec(s.name, gs, tuple(DEFAULT_SKIP if skip is None else skip), kinds, types, None, per_module)


def resolve_module_schemes(
    scheme: Scheme, module_schemes: Mapping[str, Any] | None, field: str
) -> tuple[tuple[str, str, int | None], ...]:
    """Validate per-module torchao schemes: ``{glob: scheme}`` or ``{glob: {scheme: ..., group_size: ...}}``.

    Each scheme must be torchao's (llama.cpp types per module are ``gguf_types``) with a group size it takes;
    a missing group size is the scheme's default. Whether the globs match and the sizes fit the model is
    :func:`check_spec`'s.
    """
    if not module_schemes:
        return ()
    if scheme.gguf is not None:
        why = f"{scheme.name} is llama.cpp's grid; give per-module llama.cpp types in gguf_types instead"
        raise config_error(field, dict(module_schemes), why)
    out = []
    for glob, value in module_schemes.items():
        entry = {"scheme": value} if isinstance(value, str) else value
        if not isinstance(entry, Mapping) or set(entry) - {"scheme", "group_size"} or "scheme" not in entry:
            why = "give each glob a scheme name or {scheme: <name>, group_size: <int or null>}"
            raise config_error(f"{field}.{glob}", value, why)
        chosen = get_scheme(str(entry["scheme"]), f"{field}.{glob}.scheme")
        if chosen.gguf is not None:
            why = "per-module schemes are torchao's; llama.cpp types go in gguf_types with a gguf_* scheme"
            raise config_error(f"{field}.{glob}.scheme", chosen.name, why)
        group = resolve_group_size(chosen, entry.get("group_size"), f"{field}.{glob}.group_size")
        out.append((str(glob), chosen.name, group))
    return tuple(out)


def resolve_gguf_types(scheme: Scheme, gguf_types: Mapping[str, str] | None, field: str) -> tuple[tuple[str, str], ...]:
    """Validate per-module llama.cpp types: a gguf_* scheme and known types only."""
    if not gguf_types:
        return ()
    if scheme.gguf is None:
        raise config_error(
            field, dict(gguf_types), f"per-module llama.cpp types need a gguf_* scheme; {scheme.name} is torchao's"
        )
    bad = {g: k for g, k in gguf_types.items() if str(k).lower() not in GGUF_KINDS}
    if bad:
        raise config_error(field, bad, f"unknown llama.cpp type; choose from {', '.join(GGUF_KINDS)}")
    return tuple((str(g), str(k).lower()) for g, k in gguf_types.items())


def check_spec(model: nn.Module, spec: QuantSpec, prefix: str = "") -> None:
    """:func:`check_targets` for torchao's grids; for llama.cpp's, the skip list and each target's type."""
    if get_scheme(spec.scheme).gguf is None:
        if not spec.module_schemes:
            check_targets(model, spec.skip, spec.group_size, prefix, spec.modules)
            return
        check_targets(model, spec.skip, None, prefix, spec.modules)
        check_module_schemes(model, spec, prefix)
        return
    check_targets(model, spec.skip, None, prefix, spec.modules)  # the blocks are the types', checked next
    check_gguf_types(model, spec, prefix)


def check_gguf_types(model: nn.Module, spec: QuantSpec, prefix: str = "") -> None:
    """Refuse a ``gguf_types`` glob that matches no target, and a type whose blocks do not fit a row."""
    field = f"{prefix}gguf_types"
    names = targets(model, spec.skip, spec.modules)
    for glob, kind in spec.gguf_types:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise config_error(field, {glob: kind}, "the glob matches no quantized module; check the module names")
    scheme_kind = get_scheme(spec.scheme).gguf
    for name in names:
        kind = spec.gguf_kind(name)
        width = _group_axis_width(model.get_submodule(name))
        if kind is not None and width % GGUF_BLOCKS[kind]:
            fits = [k for k, block in GGUF_BLOCKS.items() if width % block == 0]
            fix = f"give it one of {', '.join(fits)} in {field}" if fits else "add it to the skip list"
            overridden = kind != scheme_kind
            raise config_error(
                field if overridden else f"{prefix}scheme",
                {n: k for n, k in spec.gguf_types if fnmatch.fnmatchcase(name, n)} if overridden else spec.scheme,
                f"{name} has rows {width} wide, not a multiple of {kind}'s blocks of {GGUF_BLOCKS[kind]}; {fix}",
            )
    # A tied embedding and head are one Parameter: it can be rounded to one grid only.
    for group in shared_parameters(model):
        owners = {n.removesuffix(".weight") for n in group if n.endswith(".weight")} & set(names)
        kinds = {spec.gguf_kind(n) for n in owners}
        if len(kinds) > 1:
            raise config_error(
                field,
                dict(spec.gguf_types),
                f"{' and '.join(sorted(owners))} share one weight but get types {', '.join(sorted(kinds))}; "
                "give them one type",
            )


def check_module_schemes(model: nn.Module, spec: QuantSpec, prefix: str = "") -> None:
    """Refuse per-module schemes that cannot apply to ``model``, naming the setting and the module.

    A glob that matches no target, a group size that does not divide a target's rows, a scheme with quantized
    activations on an embedding, and two schemes on one shared (tied) weight are refused.
    """
    field = f"{prefix}module_schemes"
    names = targets(model, spec.skip, spec.modules)
    for glob, scheme, _ in spec.module_schemes:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise config_error(f"{field}.{glob}", scheme, "the glob matches no quantized module; check the names")
    for name in names:
        scheme, group_size = spec.scheme_for(name)
        module = model.get_submodule(name)
        entry = spec.module_scheme(name)
        at = f"{field}.{entry[0]}." if entry is not None else prefix  # the setting that gave this target its scheme
        if isinstance(module, nn.Embedding) and get_scheme(scheme).act_bits is not None:
            raise config_error(f"{at}scheme", scheme, f"{name} is a table lookup; give it a weight-only scheme")
        width = _group_axis_width(module)
        if group_size is not None and width % group_size:
            why = f"it does not divide the {width}-wide rows of {name}; give a group size that does"
            raise config_error(f"{at}group_size", group_size, why)
    for group in shared_parameters(model):  # a tied embedding and head are one Parameter: one scheme
        owners = {n.removesuffix(".weight") for n in group if n.endswith(".weight")} & set(names)
        chosen = {n: spec.scheme_for(n) for n in sorted(owners)}
        if len(set(chosen.values())) > 1:
            each = ", ".join(f"{n} {k}" + (f" in groups of {g}" if g else "") for n, (k, g) in chosen.items())
            raise config_error(
                field,
                {g: [k, n] for g, k, n in spec.module_schemes},
                f"{' and '.join(chosen)} share one weight but get {each}; give them one scheme",
            )


def shared_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names bound to one Parameter (tied embeddings, shared layers), in module order."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """Bind each group's quantized members back to its first one; returns the groups re-tied.

    ``quantize_`` replaces each targeted module's weight on its own, so a Parameter that two targets shared
    (SmolLM2's output head is its token embedding) comes out as two quantized tensors. torchao computes both
    from the same values with the same per-row/per-group scales, so they are equal; keeping one (shared in
    memory, stored once on disk) is what a deployable artifact of the tied model holds. A group whose members
    differ (e.g. one of them was skipped) is left as it is.
    """
    tied = []
    for names in groups:
        owners = [name.rpartition(".") for name in names]
        tensors = [getattr(model.get_submodule(mod), attr) for mod, _, attr in owners]
        first = tensors[0]
        if not all(is_quantized(t) for t in tensors) or any(
            any(not torch.equal(getattr(t, n), getattr(first, n)) for n in first.__tensor_flatten__()[0])
            for t in tensors[1:]
        ):
            continue
        for mod, _, attr in owners[1:]:
            setattr(model.get_submodule(mod), attr, first)
        tied.append(names)
    return tied


def apply(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """``quantize_`` the spec's targets (in place), keeping shared parameters shared (:func:`retie`)."""
    groups = shared_parameters(model)
    for config, keep in spec.applications():
        quantize_(model, config, filter_fn=keep)
    retie(model, groups)
    return model


def ptq(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Post-training quantization: apply the scheme's torchao config directly, no training (in place)."""
    check_spec(model, spec)
    return apply(model, spec)


def is_quantized(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torchao quantized tensor (subclass), as after convert or PTQ."""
    return isinstance(t, TorchAOBaseTensor)
