"""Quantization-aware training with torchao: fake-quantize a student, freeze its weight ranges, convert it.

``quantize_(student, QATConfig(base, step="prepare"))`` swaps each targeted ``nn.Linear`` for torchao's
``FakeQuantizedLinear`` (and, when the spec's ``modules`` include ``embedding``, each ``nn.Embedding`` for
``FakeQuantizedEmbedding``), which keeps the same ``weight``/``bias`` Parameters (so checkpoint keys, the
optimizer and a tied embedding/output head are unchanged) and rounds weights (and, for the ``int8_dynact_*``
schemes, activations) to the target grid in every forward, with a straight-through gradient.
``QATConfig(base, step="convert")`` then replaces them by real quantized weights (torchao tensor subclasses).
The Lightning side is ``callbacks/qat.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchao.quantization import quantize_
from torchao.quantization.qat import QATConfig
from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
from torchao.quantization.qat.linear import FakeQuantizedLinear

from distill.compress.quant import schemes
from distill.compress.quant.gguf_grid import GGUFBlockFakeQuantizer, fake_quantize
from distill.compress.quant.learned_scales import LEARNABLE, LearnedScaleQuantizer, stored_scales
from distill.compress.quant.row_embedding import RowRoundedEmbedding
from distill.compress.quant.schemes import QuantSpec
from distill.compress.stages import Stage, register
from distill.config import config_error
from distill.runtime.ranks import clean_name

FIELD = "callbacks.qat."
log = logging.getLogger("distill")

FAKE_QUANTIZED = (FakeQuantizedLinear, FakeQuantizedEmbedding)
GRID_QUANTIZERS = (GGUFBlockFakeQuantizer, LearnedScaleQuantizer)
Ranges = dict[str, dict[str, torch.Tensor]]
Starts = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def prepare(student: nn.Module, spec: QuantSpec, starts: Starts | None = None) -> None:
    """Insert torchao fake-quant modules into ``student`` (in place) for ``spec``.

    ``starts``: with learned scales (``spec.scale_gain``), the stored scales each module's start came from
    (:func:`start_from_imatrix`); others start from the grid rule's scales of their weights.
    """
    schemes.check_spec(student, spec, FIELD)
    if schemes.get_scheme(spec.scheme).gguf is not None:
        _prepare_gguf(student, spec, starts or {})
        return
    for config, keep in spec.applications():  # one pass per scheme (module_schemes); the filters are disjoint
        quantize_(student, QATConfig(config, step="prepare"), filter_fn=keep)


def _swap(student: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(student.get_submodule(parent) if parent else student, child, new)


def _prepare_gguf(student: nn.Module, spec: QuantSpec, starts: Starts) -> None:
    """Swap targets for torchao's fake-quant modules, with a llama.cpp block quantizer in place of torchao's own.

    ``from_linear``/``from_embedding`` keep the module's Parameters, so checkpoint keys, the optimizer and
    a tied embedding/output head are unchanged, exactly as with torchao's grids. With ``spec.scale_gain`` a
    linear on a 32-block type whose weight no other target shares gets trained scales
    (:class:`LearnedScaleQuantizer`, Parameters of its own); a shared weight (a tied head, layers tied by the
    sharing stage) keeps the rule's scales, which every module using it computes alike.
    """
    keep = spec.filter()
    targets = [(n, m) for n, m in student.named_modules() if keep(m, n)]
    odd = next(((n, m.weight.dtype) for n, m in targets if m.weight.dtype != torch.float32), None)
    if odd is not None:
        # The grid values are exact in fp32 (codes times an fp16 scale); rounded to bf16 they no longer are.
        raise config_error(
            FIELD + "scheme",
            spec.scheme,
            f"llama.cpp grids need fp32 weights, and {odd[0]} is {odd[1]}; train in fp32 or with "
            "trainer.precision=bf16-mixed (fp32 master weights)",
        )
    uses = Counter(id(m.weight) for _, m in targets)
    for name, module in targets:
        kind = spec.gguf_kind(name)
        if isinstance(module, nn.Embedding):  # rounds the rows looked up, not the whole table
            new = RowRoundedEmbedding.on_grid(module, kind, f"{name}.weight")
        else:
            new = FakeQuantizedLinear.from_linear(module)
            if spec.scale_gain and kind in LEARNABLE and uses[id(module.weight)] == 1:
                start = starts.get(name)
                quantizer = LearnedScaleQuantizer(module.weight, kind, f"{name}.weight", spec.scale_gain, start)
            else:
                quantizer = GGUFBlockFakeQuantizer(kind, f"{name}.weight")
            new.weight_fake_quantizer = quantizer
        _swap(student, name, new)


@dataclass(frozen=True)
class QuantizedStudent:
    """What QAT hands the exporters (``CompressionStage.artifacts``): the scheme as trained, and whether it converted.

    ``gguf_types`` maps each weight rounded to a llama.cpp grid to its type (empty on torchao's grids, and before
    convert), so the GGUF file stores the trained values without a second rounding. ``gguf_blocks`` holds the
    ggml bytes of the weights whose block scales were trained: no rule derives those scales from the values, so
    the export writes these bytes (checked to decode to the weights).
    """

    spec: QuantSpec
    converted: bool
    gguf_types: dict[str, str]
    gguf_blocks: dict[str, np.ndarray] = field(default_factory=dict)


INITS = ("rtn", "imatrix")


def check_init(spec: QuantSpec, init: object) -> str:
    """``callbacks.qat.init``: ``rtn``, or ``imatrix`` on a llama.cpp grid; anything else is refused by name."""
    if init not in INITS or (init != "rtn" and schemes.get_scheme(spec.scheme).gguf is None):
        raise config_error(
            FIELD + "init",
            init,
            "give rtn, or imatrix (llama.cpp's importance-weighted rounding) with a gguf_* scheme"
            + ("" if init in INITS else f"; {spec.scheme} is torchao's"),
        )
    return str(init)


def with_learned_scales(spec: QuantSpec, learn_scales: object, gain: object) -> QuantSpec:
    """``spec`` with ``scale_gain`` set when ``callbacks.qat.learn_scales``; bad settings are refused by name."""
    if not isinstance(learn_scales, bool):
        raise config_error(FIELD + "learn_scales", learn_scales, "give true or false")
    if not learn_scales:
        return spec
    if schemes.get_scheme(spec.scheme).gguf is None:
        raise config_error(
            FIELD + "learn_scales", True, f"trained block scales are llama.cpp's; {spec.scheme} is torchao's"
        )
    if isinstance(gain, bool) or not isinstance(gain, int | float) or not math.isfinite(gain) or gain <= 0:
        why = "give a number > 0: the scales' learning rate over the weights' (e.g. 10)"
        raise config_error(FIELD + "scale_gain", gain, why)
    return dataclasses.replace(spec, scale_gain=float(gain))


@torch.no_grad()
def start_from_imatrix(
    student: nn.Module, spec: QuantSpec, importance: dict[str, torch.Tensor], starts: Starts | None = None
) -> int:
    """Set each weight ``spec`` targets to llama.cpp's importance-weighted rounding of itself (``init=imatrix``).

    The weights become the values ``llama-quantize --imatrix`` would store (:func:`llama_quants.quantize` with
    the module's importance, then gguf-py's decoder), so QAD starts from the best post-training file of its map
    rather than from the grid's own round-to-nearest rule. That rule then rounds these values in every forward;
    it keeps most of them (docs/qat.md measures how much). A token embedding (and the head tied to it) is rounded
    without importance, as llama.cpp does (``llama-imatrix`` collects none for ``token_embd``). Weights on the
    meta device (FSDP ranks > 0, which receive rank 0's weights when the strategy wraps the student) are left
    alone. Returns how many weights were set; ``starts`` receives, by module name, the scales llama.cpp chose for
    each 32-block type (:func:`prepare` starts learned scales there).
    """
    import gguf

    from distill.compress.quant import llama_quants

    done: set[int] = set()
    for name in schemes.targets(student, spec.skip, spec.modules):
        module = student.get_submodule(name)
        weight = module.weight
        if id(weight) in done or weight.is_meta:
            continue
        done.add(id(weight))
        kind = spec.gguf_kind(name)
        weigh = None if isinstance(module, nn.Embedding) else importance.get(name)
        raw = llama_quants.quantize(
            weight.detach().float().cpu().numpy(),
            kind,
            None if weigh is None else weigh.float().cpu().numpy(),
            f"{name}.weight",
        )
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind.upper()]).reshape(weight.shape)
        weight.copy_(torch.from_numpy(values).to(weight.device, weight.dtype))
        if starts is not None and kind in LEARNABLE:
            starts[name] = stored_scales(raw, kind)
    return len(done)


def prepared_summary(student: nn.Module, spec: QuantSpec) -> str:
    """One line on what :func:`prepare` inserted: how many modules, and how many train their block scales."""
    modules = fake_quantized(student)
    learned = sum(isinstance(m.weight_fake_quantizer, LearnedScaleQuantizer) for m in modules.values())
    line = f"QAT prepared ({spec.scheme}): {len(modules)} fake-quantized {' and '.join(spec.modules)} modules"
    if spec.scale_gain and not learned:
        log.warning("callbacks.qat.learn_scales=true, but no module is an unshared 32-block type to train scales on")
    if spec.scale_gain:
        line += f", {learned} with trained block scales (gain {spec.scale_gain:g}; shared weights, K-quants: the rule)"
    return line


def gguf_grid_kind(student: nn.Module) -> str | None:
    """The llama.cpp block type the student is fake-quantized to, or None for torchao grids (or none)."""
    for module in fake_quantized(student).values():
        if isinstance(module.weight_fake_quantizer, GRID_QUANTIZERS):
            return module.weight_fake_quantizer.kind
    return None


@torch.no_grad()
def _convert_gguf(student: nn.Module) -> dict[str, str]:
    """Replace GGUF-grid fake-quant modules by plain ones holding the grid values; returns ``{param: kind}``.

    The values are what the GGUF file stores, so the plain student is already the deployable model: the
    GGUF export writes these weights in the recorded types without a second rounding. A Parameter shared by
    several modules (a tied embedding/head) is rounded once and stays shared.
    """
    types: dict[str, str] = {}
    rounded: dict[int, nn.Parameter] = {}
    for name, module in fake_quantized(student).items():
        fq = module.weight_fake_quantizer
        kind, weight = fq.kind, module.weight
        if id(weight) not in rounded:
            learned = isinstance(fq, LearnedScaleQuantizer)
            values = fq.parts(weight)[3] if learned else fake_quantize(weight, kind, f"{name}.weight")
            rounded[id(weight)] = nn.Parameter(values, requires_grad=weight.requires_grad)
        if isinstance(module, nn.Embedding):
            plain = nn.Embedding(
                module.num_embeddings,
                module.embedding_dim,
                padding_idx=module.padding_idx,
                device="meta",
            )
        else:
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.bias = module.bias
        plain.weight = rounded[id(weight)]
        _swap(student, name, plain)
        types[f"{name}.weight"] = kind
    return types


def learned_blocks(student: nn.Module) -> dict[str, np.ndarray]:
    """``{weight name: ggml bytes}`` of the weights whose block scales are trained, before :func:`convert`."""
    return {
        f"{name}.weight": module.weight_fake_quantizer.gguf_bytes(module.weight)
        for name, module in fake_quantized(student).items()
        if isinstance(module.weight_fake_quantizer, LearnedScaleQuantizer)
    }


def convert(student: nn.Module, spec: QuantSpec) -> dict[str, str]:
    """Replace fake-quant modules by real quantized weights (in place).

    On a llama.cpp grid (``gguf_*`` schemes) the weights become plain tensors holding the grid values and
    the return value maps each rounded weight's name to its GGUF type (what the GGUF export writes it as);
    for torchao's grids it is empty.

    Weight quantizers whose ranges were frozen carry their scales into convert: torchao passes a fake
    quantizer's own ``scale``/``zero_point`` to the base config only when ``range_learning`` is set, so it is
    set on those (static, no longer dynamic) configs right before converting.
    """
    if gguf_grid_kind(student) is not None:
        return _convert_gguf(student)
    for module in student.modules():
        fq = getattr(module, "weight_fake_quantizer", None)
        if isinstance(fq, IntxFakeQuantizer) and not fq.config.is_dynamic and fq.scale is not None:
            fq.config.range_learning = True
    groups = schemes.shared_parameters(student)
    for config, keep in spec.applications():
        # The fake-quant modules are Linear/Embedding subclasses, so each pass's filter finds its own.
        quantize_(
            student,
            QATConfig(config, step="convert"),
            filter_fn=lambda m, fqn, keep=keep: isinstance(m, FAKE_QUANTIZED) and keep(m, fqn),
        )
    # convert quantizes each module's weight on its own; a tied embedding/head becomes one tensor again.
    schemes.retie(student, groups)
    return {}


def fake_quantized(student: nn.Module) -> dict[str, FakeQuantizedLinear | FakeQuantizedEmbedding]:
    """The student's fake-quantized linears (and embeddings) by name."""
    # Names as in the unwrapped student also under FSDP (scale_out.md), so the ranges frozen on the wrapped
    # student apply to the gathered one.
    return {clean_name(n): m for n, m in student.named_modules() if isinstance(m, FAKE_QUANTIZED)}


@torch.no_grad()
def current_ranges(student: nn.Module) -> Ranges:
    """Each integer weight quantizer's scale and zero point, computed from the current weights."""
    ranges = {}
    for name, module in fake_quantized(student).items():
        fq = module.weight_fake_quantizer
        if not isinstance(fq, IntxFakeQuantizer):
            continue
        fq(module.weight)  # dynamic mode: computes scale and zero point from the current weights
        ranges[name] = {"scale": fq.scale.detach().clone(), "zero_point": fq.zero_point.detach().clone()}
    return ranges


def freeze_ranges(student: nn.Module, ranges: Ranges) -> None:
    """Fix the weight quantizers' scales and zero points to ``ranges``: they stop following the weights.

    ``ranges`` must name exactly the student's integer weight quantizers (as :func:`current_ranges` does).
    """
    modules = fake_quantized(student)
    if set(ranges) != {n for n, m in modules.items() if isinstance(m.weight_fake_quantizer, IntxFakeQuantizer)}:
        raise RuntimeError("the frozen QAT ranges in the checkpoint do not match the student's quantized linears")
    for name, qparams in ranges.items():
        fq = modules[name].weight_fake_quantizer
        device = modules[name].weight.device
        fq.scale = qparams["scale"].to(device)
        fq.zero_point = qparams["zero_point"].to(device)
        fq.config = copy.copy(fq.config)  # configs may be shared; freeze only this quantizer's
        fq.config.is_dynamic = False


def check_steps(spec: QuantSpec, start_step: object, freeze_ranges_step: object, calibration_batches: object) -> None:
    """Refuse a QAT schedule that cannot run: steps below 0 or out of order, frozen ranges on a llama.cpp grid."""
    if not isinstance(start_step, int) or start_step < 0:
        raise config_error(FIELD + "start_step", start_step, "give a global step >= 0")
    if freeze_ranges_step is not None and (not isinstance(freeze_ranges_step, int) or freeze_ranges_step < start_step):
        raise config_error(
            FIELD + "freeze_ranges_step",
            freeze_ranges_step,
            f"give a global step >= start_step ({start_step}), or null to keep ranges dynamic",
        )
    if freeze_ranges_step is not None and schemes.get_scheme(spec.scheme).gguf is not None:
        raise config_error(
            FIELD + "freeze_ranges_step",
            freeze_ranges_step,
            f"{spec.scheme} computes each block's scale from its weights, as llama.cpp does when it "
            "writes the file; leave it null",
        )
    if not isinstance(calibration_batches, int) or isinstance(calibration_batches, bool) or calibration_batches < 1:
        raise config_error(FIELD + "calibration_batches", calibration_batches, "give a number of batches >= 1")


def summarize_qat(config: Mapping[str, Any], _state: dict) -> str:
    """The scheme in words (bits, groups, activations) and the modules skipped."""
    scheme, group = config.get("scheme"), config.get("group_size")
    known = schemes.SCHEMES.get(str(scheme))
    if known is None:
        what = f"{scheme}" + (f" in groups of {group}" if group else "")
    else:
        what = f"int{known.weight_bits} weights" + (f" in groups of {group}" if group else "")
        if known.act_bits:
            what += f", int{known.act_bits} dynamic activations"
        what += f" ({scheme})"
    for glob, name, group_size in config.get("module_schemes") or []:
        what += f"; `{glob}`: {name}" + (f" in groups of {group_size}" if group_size else "")
    skip = config.get("skip")
    if skip is None:
        return what + ", default skip list"
    # Globs in backticks: ``*embed*`` would otherwise render as emphasis.
    return what + (f", skip {', '.join(f'`{g}`' for g in skip)}" if skip else ", every linear layer")


def check_qat_formats(settings: Mapping[str, Any], formats: list[str]) -> None:
    """Warn when a llama.cpp grid is trained but no GGUF file will ship it."""
    if str(settings.get("scheme", "")).startswith("gguf_") and "gguf" not in formats:
        log.warning(
            "callbacks.qat.scheme=%s trains on llama.cpp's grid, but export.formats=%s writes no GGUF file; "
            "add gguf to ship it",
            settings.get("scheme"),
            formats,
        )


def trains_torchao(settings: Mapping[str, Any]) -> bool:
    """Whether ``callbacks.qat`` trains on torchao's grids (what the torchao export writes), not llama.cpp's."""
    return not str(settings.get("scheme", "")).startswith("gguf_")


def converted_summary(student: nn.Module, spec: QuantSpec, gguf_types: dict[str, str]) -> str:
    """One line on what :func:`convert` left: the llama.cpp types it rounded to, or torchao's stored bits."""
    from collections import Counter

    if gguf_types:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(Counter(gguf_types.values()).items()))
        return (
            f"QAT convert ({spec.scheme}): {len(gguf_types)} weights rounded to llama.cpp's grids ({counts}); "
            "export.formats=[hf,gguf] writes them without a second rounding"
        )
    from distill.compress.quant.sizes import size_report

    report = size_report(student)
    return (
        f"QAT convert ({spec.scheme}, group_size={spec.group_size}): {int(report['quantized_weights'])} weights "
        f"at {report['bits_per_weight']:.2f} stored bits each; student {report['memory_bytes'] / 2**20:.2f} MiB "
        "in memory"
    )


QAT = register(
    Stage(
        "qat",
        50,
        lambda student, spec: prepare(student, QuantSpec.from_dict(spec)),
        before_wrapping=True,
        check_formats=check_qat_formats,
        torchao_scheme=trains_torchao,
        summarize=summarize_qat,
    )
)
