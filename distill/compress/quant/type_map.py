"""A per-tensor llama.cpp type map chosen for a byte budget from the student's own shapes and activations.

llama.cpp's mixes (Q4_K_M and the like) give each tensor a type by a fixed rule written for the common
architectures; a hand-made map for one model (``*.layers.13.mlp.down_proj: q3_k``) breaks on any other. Here
the map is derived from the model at start-up, so one recipe fits every student:

1. **Candidates.** Each quantized Parameter (a tied embedding and output head are one) may take the QAT grids
   whose blocks divide its rows (:data:`~distill.compress.quant.gguf_grid.BLOCKS`): a 576-wide row takes only
   the 32-blocks (Q4_0, Q4_1, Q8_0), a 1536-wide one also the K-quants' 256-blocks. Bytes per block are
   gguf-py's (``GGML_QUANT_SIZES``), so the sizes are the file's.
2. **Sensitivity.** The error a type adds is measured as llama.cpp's importance matrix weighs it: the squared
   rounding error of each weight times the mean square of the input channel it multiplies, collected on
   calibration batches of the training split (for a token embedding read as a lookup, each row is weighted by
   how often its token occurs). It is divided by the same weighting of the weights themselves, so every
   tensor's error is a relative output error and tensors of different scales compare. With a probe
   (``callbacks.qat.budget_probe``), each tensor's curve is then scaled by the KL its rounding alone causes
   (:mod:`~distill.compress.quant.probe`), so a tensor the output feels more (the tied table) weighs more.
3. **Allocation.** Every Parameter starts at its cheapest type; then, while the budget allows, the upgrade
   that removes the most relative error per added byte is taken (a greedy walk along each tensor's
   error/size curve, the usual Lagrangian heuristic for this knapsack).

The budget counts the whole file: the quantized tensors exactly, the tensors kept in F32 (norms, biases), and
an estimate of the tokenizer and metadata (:func:`metadata_bytes`, within a few kB). Written here because no
maintained library chooses llama.cpp types for a byte budget (llama.cpp's own proposal is PTQ-only and not
merged); the maths is the importance-matrix weighting llama.cpp documents for ``llama-quantize --imatrix``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from distill.compress.quant.gguf_grid import BLOCKS, fake_quantize
from distill.compress.quant.probe import probe_kl, probe_rows
from distill.compress.quant.schemes import QuantSpec, get_scheme
from distill.config import config_error
from distill.cost import parameter_count

log = logging.getLogger("distill")

# Rough bytes per tensor record in a GGUF header (its name, shape, type, offset and alignment padding).
_TENSOR_INFO_BYTES = 96
_FIXED_METADATA_BYTES = 8192  # the architecture's hyperparameters, special token ids and similar small keys


def type_bytes(kind: str, numel: int) -> int:
    """Bytes ``numel`` weights take in a GGUF file as ``kind`` (gguf-py's block sizes)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.upper()]]
    return numel // block * size


@dataclass
class Unit:
    """One quantized Parameter: the target modules that read it and what each candidate type costs.

    Attributes:
        modules: the target module names sharing the Parameter (a tied embedding and head are two).
        numel: its number of weights.
        candidates: the types whose blocks divide its rows, cheapest first.
        bytes: type → bytes in the file.
        error: type → relative importance-weighted error (summed over the modules that read it).

    """

    modules: tuple[str, ...]
    numel: int
    candidates: tuple[str, ...]
    bytes: dict[str, int]
    error: dict[str, float]


def _width(module: nn.Module) -> int:
    return module.embedding_dim if isinstance(module, nn.Embedding) else module.in_features


@torch.no_grad()
def collect_importance(
    model: nn.Module, names: Sequence[str], batches: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per target module, the mean square of each input channel over ``batches`` (llama.cpp's imatrix).

    For an ``nn.Embedding`` the "input" is the token id, so its entry counts how often each row is read.

    Args:
        model: the student, in the state it will be quantized from.
        names: dotted names of the target ``nn.Linear`` / ``nn.Embedding`` modules.
        batches: token-id tensors ``(rows, tokens)`` of training text.

    Returns:
        name → float64 tensor of length ``in_features`` (Linear) or ``num_embeddings`` (Embedding).

    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str, module: nn.Module) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            x = inputs[0]
            if isinstance(module, nn.Embedding):
                part = torch.bincount(x.flatten().cpu(), minlength=module.num_embeddings).double()
                n = x.numel()
            else:
                flat = x.detach().reshape(-1, x.shape[-1]).double()
                part, n = flat.pow(2).sum(0).cpu(), flat.shape[0]
            sums[name] = sums[name] + part if name in sums else part
            counts[name] = counts.get(name, 0) + n

        return record

    for name in names:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_hook(hook(name, module)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids in batches:
            model(input_ids=ids.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [n for n in names if n not in sums]
    if missing:
        raise RuntimeError(f"the calibration forward never reached {missing[:3]}; cannot weigh their rounding")
    return {n: sums[n] / max(counts[n], 1) for n in names}


def relative_error(squared: torch.Tensor, energy: torch.Tensor, importance: torch.Tensor, lookup: bool) -> float:
    """``Σ v·(w - q)² / Σ v·w²``: the relative importance-weighted error of one rounding.

    Args:
        squared: ``(w - q)²`` per weight.
        energy: ``w²`` per weight.
        importance: weighs columns (a Linear's input channels) or, with ``lookup``, rows (an embedding's tokens).
        lookup: whether the module reads rows (an embedding) rather than multiplying columns.

    """
    v = importance.to(squared.device)
    if lookup:
        num = (squared.sum(1, dtype=torch.float64) * v).sum()
        den = (energy.sum(1, dtype=torch.float64) * v).sum()
    else:
        num = (squared.sum(0, dtype=torch.float64) * v).sum()
        den = (energy.sum(0, dtype=torch.float64) * v).sum()
    return float(num / den) if den > 0 else 0.0


def build_units(
    model: nn.Module, names: Sequence[str], importance: Mapping[str, torch.Tensor], kinds: Sequence[str]
) -> tuple[list[Unit], list[str]]:
    """One :class:`Unit` per quantized Parameter, with each llama.cpp type's bytes and error.

    Returns:
        The units, and the target modules no candidate fits (rows not a multiple of any block; they stay
        unquantized).

    """
    return weighed_units(
        model,
        names,
        importance,
        lambda width: [k for k in kinds if width % BLOCKS[k] == 0],
        lambda w, k: (fake_quantize(w, k), type_bytes(k, w.numel())),
    )


def weighed_units(
    model: nn.Module,
    names: Sequence[str],
    importance: Mapping[str, torch.Tensor],
    candidates: Callable[[int], Sequence[str]],
    rounding: Callable[[torch.Tensor, str], tuple[torch.Tensor, int]],
) -> tuple[list[Unit], list[str]]:
    """One :class:`Unit` per quantized Parameter, for any family of candidates (llama.cpp types, torchao grids).

    Args:
        model: the student.
        names: the target module names; modules sharing a Parameter (a tied embedding and head) make one unit.
        importance: target module → its :func:`collect_importance` entry.
        candidates: row width → the candidates that fit it.
        rounding: (fp32 weight, candidate) → the rounded weight and the bytes it is stored in.

    Returns:
        The units, and the target modules no candidate fits (they stay unquantized).

    """
    by_param: dict[int, list[str]] = {}
    for name in names:
        by_param.setdefault(id(model.get_submodule(name).weight), []).append(name)
    units, unfit = [], []
    for group in by_param.values():
        module = model.get_submodule(group[0])
        fits = candidates(_width(module))
        if not fits:
            unfit += group
            continue
        w = module.weight.detach().float()
        energy = w.square()
        sizes, error = {}, {}
        for k in fits:  # one rounding per candidate, shared by the modules that read the Parameter
            value, sizes[k] = rounding(w, k)
            squared = value.float().sub_(w).square_()
            error[k] = sum(
                relative_error(squared, energy, importance[n], isinstance(model.get_submodule(n), nn.Embedding))
                for n in group
            )
        order = tuple(sorted(fits, key=lambda k: (sizes[k], error[k])))
        units.append(Unit(tuple(group), module.weight.numel(), order, sizes, error))
    return units, unfit


def calibrated(units: Sequence[Unit], probe: Sequence[tuple[str, float]]) -> list[Unit]:
    """``units`` with each error curve scaled to pass through its probe: (the candidate probed, the KL it caused).

    A unit whose weighted error at the probe is 0 (a rounding that changes nothing) keeps its curve.
    """
    out = []
    for unit, (at, kl) in zip(units, probe, strict=True):
        scale = kl / unit.error[at] if unit.error[at] > 0 else 1.0
        out.append(replace(unit, error={k: e * scale for k, e in unit.error.items()}))
    return out


def allocate(units: Sequence[Unit], budget: int, fixed: int) -> tuple[dict[int, str], int]:
    """Greedy allocation: cheapest types first, then the upgrades with the most error removed per byte.

    Args:
        units: the quantized Parameters.
        budget: bytes the whole file may take.
        fixed: bytes that do not depend on the choice (F32 tensors, metadata).

    Returns:
        unit index → chosen type, and the file's bytes under that choice (over ``budget`` when even the
        cheapest types do not fit).

    """
    choice = {i: u.candidates[0] for i, u in enumerate(units)}
    total = fixed + sum(u.bytes[choice[i]] for i, u in enumerate(units))
    while True:
        best: tuple[float, int, str] | None = None
        for i, u in enumerate(units):
            now = choice[i]
            for k in u.candidates:
                extra = u.bytes[k] - u.bytes[now]
                gain = u.error[now] - u.error[k]
                if extra <= 0 or gain <= 0 or total + extra > budget:
                    continue
                rate = gain / extra
                if best is None or rate > best[0]:
                    best = (rate, i, k)
        if best is None:
            return choice, total
        _, i, k = best
        total += units[i].bytes[k] - units[i].bytes[choice[i]]
        choice[i] = k


def metadata_bytes(tokenizer: object, n_tensors: int) -> int:
    """An estimate of a GGUF file's bytes besides tensor data: the tokenizer's arrays and the tensor records.

    Strings are stored as a length (8 bytes) and UTF-8 bytes, token types as int32, merges as strings.
    """
    import json

    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    size = sum(8 + len(t.encode()) + 4 for t in vocab)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        merges = (json.loads(backend.to_str()).get("model") or {}).get("merges") or []
        size += sum(8 + len((" ".join(m) if isinstance(m, list) else m).encode()) for m in merges)
    size += len((getattr(tokenizer, "chat_template", None) or "").encode())
    return size + _FIXED_METADATA_BYTES + n_tensors * _TENSOR_INFO_BYTES


def fixed_bytes(model: nn.Module, quantized: set[int]) -> tuple[int, int]:
    """Bytes of the tensors the map does not choose for (in F32: norms, biases; matrices outside the map in F16).

    Returns:
        The bytes and the number of tensors in the file.

    """
    seen: set[int] = set()
    size, count = 0, 0
    for p in model.parameters():  # each Parameter once: a tied head is not a second tensor in the file
        if id(p) in seen:
            continue
        seen.add(id(p))
        count += 1
        if id(p) in quantized:
            continue
        size += p.numel() * (4 if p.dim() < 2 else 2)
    return size, count


@dataclass
class TypeMap:
    """The chosen map and what it costs.

    Attributes:
        types: target module name → llama.cpp type.
        unfit: target modules no type fits (kept in full precision).
        file_bytes: the estimated file size.
        budget: the byte budget it was chosen for.
        reference_bytes: the fp32 bytes the budget is a fraction of.
        importance: target module name → the importance it was chosen with (``callbacks.qat.init=imatrix``
            starts from llama.cpp's rounding weighted by it).
        probed: whether each tensor's error curve was scaled by its KL probe.

    """

    types: dict[str, str]
    unfit: list[str]
    file_bytes: int
    budget: int
    reference_bytes: int
    importance: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    probed: bool = False

    @property
    def ratio(self) -> float:
        """How many times smaller than the fp32 reference the file is."""
        return self.reference_bytes / max(self.file_bytes, 1)

    def summary(self) -> str:
        """One line: the type counts and the size against the budget."""
        counts: dict[str, int] = {}
        for kind in self.types.values():
            counts[kind] = counts.get(kind, 0) + 1
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        return (
            f"{kinds}; file about {self.file_bytes / 2**20:.2f} MiB = 1/{self.ratio:.2f} of "
            f"{self.reference_bytes / 2**20:.1f} MiB fp32 (budget {self.budget / 2**20:.2f} MiB)"
            + ("; errors scaled by a KL probe" if self.probed else "")
        )


@dataclass(frozen=True)
class ByteTarget:
    """A GGUF file's byte budget: 1/``ratio`` of the model's own fp32 bytes, or ``bytes`` outright.

    ``bytes`` is for a budget fixed by something other than the model: a depth-reduced student measured against
    its teacher's fp32 bytes (1/8 of the teacher is not 1/8 of a student with fewer layers), or a device's memory.
    """

    ratio: float | None = None
    bytes: int | None = None
    # torchao schemes: the (scheme, group size) grids the budget chooses among (grid_budget.py); () = its defaults
    grids: tuple[tuple[str, int | None], ...] = ()
    # whether each tensor's error curve is scaled by the KL its rounding alone causes (probe.py)
    probe: bool = False

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.bytes is None):
            raise ValueError(f"ByteTarget takes a ratio or bytes, not both or neither: {self.ratio=}, {self.bytes=}")
        if (self.ratio is not None and not self.ratio > 1) or (self.bytes is not None and not self.bytes > 0):
            raise ValueError(f"ByteTarget needs a ratio above 1 or bytes above 0: {self.ratio=}, {self.bytes=}")

    def budget(self, reference: int) -> int:
        """The file's byte budget for a model of ``reference`` fp32 bytes."""
        return self.bytes if self.bytes is not None else int(reference / self.ratio)

    def __str__(self) -> str:
        return f"{self.bytes} bytes" if self.bytes is not None else f"1/{self.ratio:g} of fp32"


def as_target(target: float | ByteTarget) -> ByteTarget:
    """A bare number is a ratio (``target_ratio``)."""
    return target if isinstance(target, ByteTarget) else ByteTarget(ratio=float(target))


def budget_type_map(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[torch.Tensor],
    target: float | ByteTarget,
    kinds: Sequence[str],
    tokenizer: object = None,
    probe: str | None = None,
) -> TypeMap:
    """Choose a llama.cpp type per target module so the GGUF file fits ``target``'s byte budget.

    Args:
        model: the student before fake quantization.
        names: the target module names (what the QAT spec quantizes).
        batches: calibration token ids from the training split.
        target: a ratio (the file may take ``fp32 bytes / ratio``; fp32: 4 bytes per unique parameter) or a
            :class:`ByteTarget`.
        kinds: the types allowed (QAT grids).
        tokenizer: the student's tokenizer, for the metadata estimate (None: tensor records only).
        probe: the type each tensor is rounded to alone to scale its error curve by the KL that causes (where
            its rows do not take it, its cheapest type); None: the importance-weighted errors as they are.

    Returns:
        The map; ``file_bytes > budget`` when even the cheapest types do not fit (the caller decides).

    """
    batches = list(batches)
    importance = collect_importance(model, names, batches)
    units, unfit = build_units(model, names, importance, kinds)
    if probe is not None and units:
        probed = [probe if probe in u.candidates else u.candidates[0] for u in units]
        params = [model.get_submodule(u.modules[0]).weight for u in units]
        roundings = [lambda w, k=k: fake_quantize(w, k) for k in probed]
        kls = probe_kl(model, params, roundings, probe_rows(batches))
        units = calibrated(units, list(zip(probed, kls, strict=True)))
    reference = 4 * parameter_count(model)
    budget = as_target(target).budget(reference)
    quantized = {id(model.get_submodule(u.modules[0]).weight) for u in units}
    fixed, n_tensors = fixed_bytes(model, quantized)
    fixed += metadata_bytes(tokenizer, n_tensors) if tokenizer is not None else n_tensors * _TENSOR_INFO_BYTES
    choice, total = allocate(units, budget, fixed)
    types = {name: choice[i] for i, u in enumerate(units) for name in u.modules}
    return TypeMap(types, unfit, total, budget, reference, importance, probe is not None)


def calibrated_type_map(
    model: nn.Module,
    names: Sequence[str],
    train_blocks: object,
    block_size: int,
    target: float | ByteTarget,
    kinds: Sequence[str],
    tokenizer: object = None,
    batches: int = 8,
    probe: str | None = None,
) -> TypeMap:
    """:func:`budget_type_map` on ``batches`` calibration batches of 4 rows spread over the training blocks.

    One function for the QAT callback and the PTQ baseline of the same recipe, so both round with one map.
    """
    from distill.compress.depth import calibration_batches

    data = calibration_batches(train_blocks, batches=batches, rows=4, tokens=block_size)
    return budget_type_map(model, names, data, target, kinds, tokenizer, probe)


def calibrated_importance(model: nn.Module, spec: QuantSpec, datamodule: object, batches: int = 8) -> dict:
    """:func:`collect_importance` of ``spec``'s targets on calibration batches of the training split, on rank 0.

    What ``callbacks.qat.init=imatrix`` weighs the rounding by when no byte-budgeted map collected it already (a
    hand-made ``gguf_types`` map). Every rank gets rank 0's result (ranks > 0 may hold the student empty).
    """
    from distill.compress.depth import calibration_batches
    from distill.compress.quant.schemes import targets
    from distill.runtime.ranks import computed_on_rank_zero

    names = targets(model, spec.skip, spec.modules)
    data = calibration_batches(
        datamodule.train_set,
        batches=batches,
        rows=4,
        tokens=datamodule.block_size,  # type: ignore[attr-defined]
    )
    return computed_on_rank_zero(lambda: collect_importance(model, names, data))


def parse_budget(target_ratio: object, target_bytes: object) -> tuple[str, object, ByteTarget] | None:
    """The budget a ratio above 1 or a byte count above 0 sets, with the field and value that set it (or None)."""
    if target_ratio is None and target_bytes is None:
        return None
    by_bytes = target_bytes is not None
    field = "callbacks.qat." + ("target_bytes" if by_bytes else "target_ratio")
    value = target_bytes if by_bytes else target_ratio
    if by_bytes and target_ratio is not None:
        fix = f"and target_ratio={target_ratio} both set the budget; give one (callbacks.qat.target_ratio=null)"
        raise config_error(field, value, fix)
    if (
        isinstance(value, bool)
        or not isinstance(value, int if by_bytes else int | float)
        or not value > (0 if by_bytes else 1)
    ):
        fix = (
            "a whole number of bytes > 0 (e.g. 67257504)"
            if by_bytes
            else "how many times smaller than fp32, > 1 (e.g. 7)"
        )
        raise config_error(field, value, "give " + fix)
    return field, value, ByteTarget(bytes=target_bytes) if by_bytes else ByteTarget(ratio=float(target_ratio))


def check_target(
    spec: QuantSpec, target_ratio: object, gguf_types: object, target_bytes: object = None, probe: object = None
) -> ByteTarget | None:
    """A llama.cpp type budget: a valid ratio or byte count (:func:`parse_budget`), a gguf_* scheme, no hand map.

    ``probe`` (``budget_probe``): true scales each tensor's error curve by its KL probe; null or false does not.
    """
    parsed = parse_budget(target_ratio, target_bytes)
    check_probe(probe, parsed is not None)
    if parsed is None:
        return None
    field, value, target = parsed
    if get_scheme(spec.scheme).gguf is None:
        needs = f"chooses llama.cpp types and needs a gguf_* scheme; {spec.scheme} is torchao's"
        raise config_error(field, value, needs)
    if gguf_types:
        raise config_error(
            field,
            value,
            "and callbacks.qat.gguf_types both choose the types; give one (gguf_types=null to let the budget choose)",
        )
    return replace(target, probe=bool(probe))


PROBE_FIELD = "callbacks.qat.budget_probe"


def check_probe(probe: object, budget: bool) -> None:
    """``budget_probe`` is null or a bool, and true only with a budget to calibrate."""
    if probe is not None and not isinstance(probe, bool):
        raise config_error(PROBE_FIELD, probe, "give true (scale each tensor's error by its KL probe), false or null")
    if probe and not budget:
        why = (
            "calibrates a byte budget's errors; give callbacks.qat.target_ratio or target_bytes too (or leave it null)"
        )
        raise config_error(PROBE_FIELD, probe, why)


def spec_on_budget(
    model: nn.Module,
    spec: QuantSpec,
    train_blocks: object,
    block_size: int,
    target: float | ByteTarget,
    tokenizer: object = None,
    batches: int = 8,
) -> tuple[QuantSpec, TypeMap]:
    """``spec`` with the byte-budgeted map of ``model`` as its ``gguf_types`` (and unfit modules skipped).

    The QAT callback's choice at ``start_step`` (:func:`calibrated_type_map` on the modules ``spec`` targets),
    with a warning when the budget cannot be met or a module fits no llama.cpp block.
    """
    from distill.compress.quant.gguf_grid import KINDS
    from distill.compress.quant.schemes import targets

    names = targets(model, spec.skip, spec.modules)
    probe = get_scheme(spec.scheme).gguf if as_target(target).probe else None  # the grid the student would sit on
    chosen = calibrated_type_map(model, names, train_blocks, block_size, target, KINDS, tokenizer, batches, probe)
    if chosen.file_bytes > chosen.budget:
        # A target is a goal, not a promise: a tiny model's tokenizer alone can exceed it. Say so and go on with
        # the smallest file these rows allow; the report gives the size that was reached.
        log.warning(
            "callbacks.qat budget %s: the smallest types this student's rows take give %d bytes, 1/%.2f of its fp32 "
            "bytes (tokenizer and norms included); training on that map",
            as_target(target),
            chosen.file_bytes,
            chosen.ratio,
        )
    if chosen.unfit:
        log.warning(
            "callbacks.qat budget: %d modules have rows no llama.cpp block divides (%s); they stay in full precision",
            len(chosen.unfit),
            ", ".join(chosen.unfit[:3]),
        )
    new = replace(spec, skip=(*spec.skip, *chosen.unfit), gguf_types=tuple(sorted(chosen.types.items())))
    return new, chosen
