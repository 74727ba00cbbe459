"""A per-tensor torchao grid (bits and group size) chosen for a byte budget: the torchao twin of ``type_map``.

:mod:`~distill.compress.quant.type_map` chooses llama.cpp types for a GGUF file; this chooses among torchao's
weight-only grids (int2 … int8, groups of 32 … 192) for the compact export, whose bytes are the codes packed to
their width plus an fp32 scale and an int8 zero point per group (:func:`distill.export.quantized.save_quantized`).
The result is the spec's ``module_schemes``, one exact module name per entry, so QAT, the exports and
``load_quantized`` carry it as they carry a hand-made map (``experiment=qad_int3_emb4``'s).

Each tensor's importance-weighted error curve is scaled by the KL its rounding to the ``probe`` grid causes alone
(:mod:`~distill.compress.quant.probe`; without it the tied table gets two bits and the model loses all agreement,
``bench/results/grid_budget.md``). The greedy walk of ``type_map.allocate`` then buys the upgrades with the most
error removed per byte.

Hand-written because torchao has no byte-budgeted per-module choice; the rounding itself is torchao's
(``quantize_`` with the scheme's ``IntxWeightOnlyConfig`` on a one-matrix module).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.compress.quant.probe import PROBE_TOKENS, probe_kl, probe_rows
from distill.compress.quant.schemes import QuantSpec, base_config, get_scheme, resolve_group_size, targets
from distill.compress.quant.type_map import (
    ByteTarget,
    TypeMap,
    Unit,
    allocate,
    as_target,
    calibrated,
    collect_importance,
    weighed_units,
)
from distill.config import config_error
from distill.cost import parameter_count, tensor_bytes

log = logging.getLogger("distill")

Grid = tuple[str, int | None]  # (torchao weight-only scheme, group size; None for per-row int8)

# What a budget chooses among when ``budget_grids`` is not given: every weight-only width in the groups that divide
# SmolLM2's 576- and 1536-wide rows (a row no group divides takes the per-row int8 grid or stays exact).
DEFAULT_GRIDS: tuple[Grid, ...] = (
    *((f"int{bits}_weight_only", group) for bits in (2, 3, 4, 5, 6) for group in (32, 64, 96, 192)),
    ("int8_weight_only", None),
)
# Bytes the export spends on records besides tensor data, by what they name (measured on a 30-layer model with
# SmolLM2's module names, rounded up so the estimate stays above the file): a quantized tensor has three safetensors
# header records (codes, scales, zero points), torchao's JSON description of the tensor, and quantization.json's
# packed-codes and module_schemes entries, each repeating its name; an exact tensor, one record and one description.
_QUANTIZED_RECORD, _EXACT_RECORD, _NAME_COPIES = 720, 128, 6
_FIXED_RECORDS = 8192  # quantization.json's fixed keys and size block, and the header's own framing


def record_bytes(quantized: Sequence[Sequence[str]], exact: Sequence[str]) -> int:
    """Bytes of the export's records (headers, descriptions, quantization.json) for these tensors' names.

    Args:
        quantized: per quantized tensor, the module names that read it (a tied table's second name costs a
            ``module_schemes`` entry and a ``tied_keys`` entry).
        exact: the state-dict names of the tensors kept exact.

    """
    size = _FIXED_RECORDS + sum(_EXACT_RECORD + 2 * len(name) for name in exact)
    for names in quantized:
        size += _QUANTIZED_RECORD + _NAME_COPIES * len(names[0])
        size += sum(96 + 2 * len(name) for name in names[1:])
    return size


def grid_label(grid: Grid) -> str:
    """``int3_weight_only/g192`` (``int8_weight_only/row``): the grid's name in the map's summary."""
    return f"{grid[0]}/{'row' if grid[1] is None else f'g{grid[1]}'}"


def resolve_grids(value: Sequence[Any] | None, field: str) -> tuple[Grid, ...]:
    """Validate ``budget_grids``: scheme names or ``{scheme, group_size}``; weight-only torchao schemes only."""
    if value is None:
        return DEFAULT_GRIDS
    if isinstance(value, str | Mapping) or not len(value):
        raise config_error(field, value, "give a list of grids, e.g. [{scheme: int3_weight_only, group_size: 192}]")
    out = []
    for i, item in enumerate(value):
        entry = {"scheme": item} if isinstance(item, str) else item
        if not isinstance(entry, Mapping) or set(entry) - {"scheme", "group_size"} or "scheme" not in entry:
            raise config_error(f"{field}[{i}]", item, "give a scheme name or {scheme: <name>, group_size: <int>}")
        scheme = get_scheme(str(entry["scheme"]), f"{field}[{i}].scheme")
        if scheme.gguf is not None or scheme.act_bits is not None:
            why = "a byte budget chooses among torchao's weight-only grids (int2_weight_only … int8_weight_only)"
            raise config_error(f"{field}[{i}].scheme", scheme.name, why)
        out.append((scheme.name, resolve_group_size(scheme, entry.get("group_size"), f"{field}[{i}].group_size")))
    return tuple(dict.fromkeys(out))


def fits(grid: Grid, width: int) -> bool:
    """Whether ``grid``'s groups tile rows ``width`` wide."""
    return grid[1] is None or width % grid[1] == 0


@torch.no_grad()
def rounded(weight: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, int]:
    """``weight`` as torchao rounds it on ``grid``, and the bytes the compact export stores for it.

    Rows are grouped along the last dim for a Linear's weight and an embedding's table alike, so a one-matrix
    Linear holding ``weight`` rounds both. Codes below 8 bits are packed to their width when the row is a multiple
    of 8 wide (``quantized._code_keys``), one byte each otherwise.
    """
    from torchao.quantization import quantize_

    rows, width = weight.shape
    holder = nn.Linear(width, rows, bias=False, device=weight.device, dtype=weight.dtype)
    holder.weight.data.copy_(weight)
    quantize_(holder, base_config(get_scheme(grid[0]), grid[1]))
    q = holder.weight
    bits = get_scheme(grid[0]).weight_bits  # the code width; int8 codes are stored as they are
    codes = q.qdata.numel() * bits // 8 if width % 8 == 0 else q.qdata.numel()
    return q.dequantize().to(weight.dtype), codes + tensor_bytes(q) - q.qdata.numel() * q.qdata.element_size()


def export_file_bytes(model: nn.Module, tokenizer: object) -> int:
    """Bytes of the config and tokenizer files as the compact export writes them."""
    with tempfile.TemporaryDirectory() as tmp:
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


@dataclasses.dataclass
class Measured:
    """What a grid budget is chosen from: each Parameter's grids with their bytes and errors, and its probe.

    Attributes:
        units: one per quantized Parameter, errors as importance-weighted relative errors (unscaled).
        unfit: target modules no grid fits (they stay exact).
        params: the Parameters, in ``units``' order.
        importance: target module → the importance the errors were weighed with.
        probe: per unit, (the grid label probed, the KL it caused alone); empty without a probe.
        exact: state-dict name → bytes of each Parameter that stays exact (norms, skipped matrices, unfit ones).

    """

    units: list[Unit]
    unfit: list[str]
    params: list[nn.Parameter]
    importance: dict[str, torch.Tensor]
    probe: list[tuple[str, float]]
    exact: dict[str, int]

    def calibrated(self) -> list[Unit]:
        """The units with each error curve scaled to pass through its probe's KL (unscaled without a probe)."""
        return calibrated(self.units, self.probe) if self.probe else self.units


def measure_grids(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[torch.Tensor],
    grids: Sequence[Grid],
    probe: Grid | None,
    probe_tokens: int = PROBE_TOKENS,
) -> Measured:
    """Round every target Parameter on every grid its rows take, weigh the errors, and probe each alone.

    Args:
        model: the student before fake quantization.
        names: the target module names.
        batches: calibration token ids from the training split (importance and the KL probe).
        grids: the candidates.
        probe: the grid each Parameter is rounded to alone to scale its error curve by the KL it causes (where
            it does not fit, the cheapest grid that does); None: no probe.
        probe_tokens: calibration tokens each probe forward reads (rows of at most 256 from ``batches``): one
            forward per Parameter, so this bounds the probe's cost.

    """
    batches = list(batches)
    importance = collect_importance(model, names, batches)
    by_label = {grid_label(g): g for g in grids}
    units, unfit = weighed_units(
        model,
        names,
        importance,
        lambda width: [grid_label(g) for g in grids if fits(g, width)],
        lambda w, label: rounded(w, by_label[label]),
    )
    params = [model.get_submodule(u.modules[0]).weight for u in units]
    # The probe's grid where it fits the unit's rows, else the cheapest grid that does.
    probe_grids = [
        probe if probe is not None and grid_label(probe) in u.candidates else by_label[u.candidates[0]] for u in units
    ]
    probed: list[tuple[str, float]] = []
    if probe is not None and units:
        roundings = [lambda w, g=g: rounded(w, g)[0] for g in probe_grids]
        kls = probe_kl(model, params, roundings, probe_rows(batches, probe_tokens))
        probed = [(grid_label(g), kl) for g, kl in zip(probe_grids, kls, strict=True)]
    chosen = {id(p) for p in params}
    exact = {n: tensor_bytes(p) for n, p in model.named_parameters() if id(p) not in chosen}  # shared ones once
    return Measured(units, unfit, params, importance, probed, exact)


def choose_grids(
    model: nn.Module, measured: Measured, target: float | ByteTarget, tokenizer: object = None, calibrated: bool = True
) -> TypeMap:
    """The greedy choice (``type_map.allocate``) under ``target``'s budget, on the probe-calibrated errors or not.

    Returns:
        The map (``types``: module → :func:`grid_label`); ``file_bytes > budget`` when the cheapest grids do not fit.

    """
    units = measured.calibrated() if calibrated else measured.units
    reference = 4 * parameter_count(model)
    budget = as_target(target).budget(reference)
    records = record_bytes([u.modules for u in units], list(measured.exact))
    fixed = sum(measured.exact.values()) + export_file_bytes(model, tokenizer) + records
    choice, total = allocate(units, budget, fixed)
    types = {name: choice[i] for i, u in enumerate(units) for name in u.modules}
    return TypeMap(
        types, measured.unfit, total, budget, reference, measured.importance, calibrated and bool(measured.probe)
    )


def budget_grid_map(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[torch.Tensor],
    target: float | ByteTarget,
    grids: Sequence[Grid],
    probe: Grid | None,
    tokenizer: object = None,
) -> TypeMap:
    """Choose a torchao grid per quantized Parameter so the compact export fits ``target``'s budget.

    :func:`measure_grids` then :func:`choose_grids`; ``probe`` None leaves the importance-weighted relative errors
    unscaled (as the llama.cpp map uses them). ``tokenizer`` is written with the export (its files count).
    """
    return choose_grids(model, measure_grids(model, names, batches, grids, probe), target, tokenizer)


def map_schemes(chosen: TypeMap, grids: Sequence[Grid]) -> tuple[tuple[str, str, int | None], ...]:
    """``module_schemes`` triples naming each module exactly with its chosen grid."""
    by_label = {grid_label(g): g for g in grids}
    return tuple((name, *by_label[label]) for name, label in sorted(chosen.types.items()))


def spec_on_grid_budget(
    model: nn.Module,
    spec: QuantSpec,
    train_blocks: object,
    block_size: int,
    target: ByteTarget,
    tokenizer: object = None,
    batches: int = 8,
) -> tuple[QuantSpec, TypeMap]:
    """``spec`` with :func:`budget_grid_map`'s choice as its ``module_schemes`` (unfit modules skipped).

    The spec's own scheme and group size are the probe grid (``qad_int3``'s int3 g192: where the student would
    otherwise sit; none when ``target.probe`` is off), and ``target.grids`` (or :data:`DEFAULT_GRIDS`) the candidates.
    """
    from distill.compress.depth import calibration_batches

    names = targets(model, spec.skip, spec.modules)
    data = calibration_batches(train_blocks, batches=batches, rows=4, tokens=block_size)
    grids = target.grids or DEFAULT_GRIDS
    probe = (spec.scheme, spec.group_size) if target.probe else None
    chosen = budget_grid_map(model, names, data, target, grids, probe, tokenizer)
    if chosen.file_bytes > chosen.budget:
        log.warning(
            "callbacks.qat budget %s: the cheapest grids give about %d bytes (1/%.2f of fp32); training on that",
            target,
            chosen.file_bytes,
            chosen.ratio,
        )
    if chosen.unfit:
        log.warning("callbacks.qat budget: no grid fits %s; they stay in full precision", ", ".join(chosen.unfit[:3]))
    new = dataclasses.replace(spec, skip=(*spec.skip, *chosen.unfit), module_schemes=map_schemes(chosen, grids))
    return new, chosen
