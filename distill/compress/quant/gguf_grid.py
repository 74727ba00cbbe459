"""Fake quantization on llama.cpp's block grids (Q8_0, Q5_x, Q4_x, IQ4_NL, Q4_K, Q3_K): QAT students export as trained.

llama.cpp stores these types in blocks of 32 weights along a row (a Linear's in-features, an embedding's
vector), each block with an fp16 scale, and for Q4_1 an fp16 minimum:

- Q8_0: ``d = max|x| / 127``, codes ``roundf(x / d)`` in [-127, 127];
- Q4_0: ``d = m / -8`` where ``m`` is the block's value of largest magnitude (sign kept), codes
  ``trunc(x / d + 8.5)`` clipped to [0, 15], value ``(q - 8) · d``;
- Q4_1: ``d = (max - min) / 15``, codes ``trunc((x - min) / d + 0.5)`` clipped to [0, 15], value ``q · d + min``;
- Q5_0 and Q5_1: Q4_0's and Q4_1's rules with 5-bit codes (``d = m / -16``, codes ``trunc(x / d + 16.5)`` in
  [0, 31], value ``(q - 16) · d``; ``d = (max - min) / 31``): 5.5 and 6 bits per weight, between the 4-bit types
  and Q8_0, where a tensor the output feels (a tied table) can sit without Q8_0's cost;
- IQ4_NL: value ``d · v[q]`` with ``v`` llama.cpp's 16 non-linear levels (−127 … 113, denser near 0, as
  weights are) and codes 0..15 (4.5 bits per weight, as Q4_0). The rule here tries five scales that put the
  block's value of largest magnitude at ``−s`` for ``s`` in :data:`IQ4_NL_TRIALS` (all nearer −127 than −104,
  so it always lands on code 0), rounds each element to the nearest level, and keeps the fp16 scale with the
  least squared error: on generic weights 2–8 % less than llama.cpp's own search
  (``quantize_iq4_nl``, which weighs by x² and fits in fp32 before rounding the scale to fp16), at five
  roundings per forward. Its output is a fixed point of itself (the trial ``s = -127`` gives the scale back
  with no error) and of llama.cpp's search, whose least-squares fit finds that exact scale again (the
  fixtures hold llama.cpp's bytes of such weights, with and without importance), except where the scale is
  an fp16 subnormal (blocks smaller than about 0.008), which llama.cpp rounds otherwise.

The K-quants store super-blocks of 256 weights (so only rows 256k wide can hold them; SmolLM2's 576-wide
rows cannot, its 1536-wide ``down_proj`` rows can):

- Q4_K: eight sub-blocks of 32, each with a 6-bit scale and a 6-bit minimum under the super-block's fp16 ``d``
  and ``dmin``, codes 0..15, value ``d·sc · q − dmin·m`` (4.5 bits per weight, asymmetric like the Q4_1 grid
  the embedded teacher ships in);
- Q3_K: sixteen sub-blocks of 16, each with a signed 6-bit scale under the fp16 ``d``, codes −4..3, value
  ``d·l · q`` (3.44 bits per weight).

gguf-py reads these two and IQ4_NL but has no encoder for them, so :func:`encode` here writes their bytes,
and the tests decode them with gguf-py. llama.cpp chooses a K-quant's scales by a weighted search; the rule
here is the plain one (each sub-block's range, then the 6-bit scales rounded under the largest), applied
until the values no longer change: the GGUF writer quantizes the weights it is given again, so the values a
student trains on must be a fixed point of the rounding for the file to hold exactly them. Weights that were
not trained on the grid are better served by llama.cpp's search, which leaves less squared error on generic
weights (``python -m bench.llama_cpp_fixtures error`` measures how much): :func:`encode_weights`, what the
GGUF export writes, keeps the blocks already on this grid as they are (codes written here) and rounds every
other one with llama.cpp's own encoder (:func:`distill.compress.quant.llama_quants.quantize`, byte for byte),
so a PTQ baseline written here is the file ``llama-quantize`` would write.

A weight holding inf or NaN is refused with its name (:func:`distill.compress.quant.llama_quants.check_finite`):
one such value would turn its whole block's scale into inf or NaN.

The codes come from the fp32 scale and the stored value uses the fp16 one, as in gguf-py's
``gguf.quants`` (which follows ggml-quants.c bit for bit). :func:`fake_quantize` computes the same
arithmetic in torch, so a weight it returns is a fixed point of the writer: quantizing it again gives the
same codes and scales, and a student trained on this grid reloads from its GGUF file with the logits it
had in memory.

Hand-written because torchao's fake quantizers have symmetric and asymmetric integer grids with their own
scale rules (``absmax / 7.5`` for int4, for instance), none of them llama.cpp's; gguf-py quantizes only
numpy arrays, without gradients, and is too slow to run in every forward.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from distill.compress.quant import llama_quants

BLOCK = 32  # the legacy types quantize blocks of 32 weights along the last dim
SUPER_BLOCK = 256  # the K-quants' super-blocks (QK_K in ggml)
BLOCKS = {
    "q8_0": BLOCK,
    "q4_0": BLOCK,
    "q4_1": BLOCK,
    "q4_k": SUPER_BLOCK,
    "q3_k": SUPER_BLOCK,
    "iq4_nl": BLOCK,
    "q5_0": BLOCK,
    "q5_1": BLOCK,
}
# The legacy symmetric types (Q4_0, Q5_0): a block's value of largest magnitude goes to level -HALF; codes 0..2·HALF-1.
_HALF = {"q4_0": 8, "q5_0": 16}
# The legacy types with a minimum (Q4_1, Q5_1): the block's range in TOP steps; codes 0..TOP.
_TOP = {"q4_1": 15, "q5_1": 31}
KINDS = tuple(BLOCKS)
K_KINDS = ("q4_k", "q3_k")
# The types this module writes itself (gguf-py only decodes them); the others are gguf-py's encoders.
ENCODED_KINDS = (*K_KINDS, "iq4_nl")
ROW_BYTES = {"q4_k": 144, "q3_k": 110, "iq4_nl": 18}  # bytes per block (super-block of 256, or block of 32)
# IQ4_NL: the block's value of largest magnitude goes to -s for these s. Each below -115.5, the midpoint of
# the two lowest levels, so it lands on level -127 and the trial s = -127 reproduces a block on this grid.
IQ4_NL_TRIALS = (-135.0, -131.0, -127.0, -123.0, -119.0)
_IQ4_NL_LEVELS = torch.from_numpy(llama_quants.IQ4_NL_VALUES)
# The level nearest to x / d for each half-unit cell of [-128, 128): every midpoint between two levels is a
# multiple of 0.5, so a cell never straddles one and a table lookup replaces a search (ties go to the upper
# level, as ggml's best_index_int8 sends them). Far cheaper per element than torch.bucketize.
_IQ4_NL_CELL_CODES = torch.bucketize(
    torch.arange(512, dtype=torch.float32) / 2 - 128, (_IQ4_NL_LEVELS[1:] + _IQ4_NL_LEVELS[:-1]) / 2, right=True
)
_IQ4_NL_CELL_LEVELS = _IQ4_NL_LEVELS[_IQ4_NL_CELL_CODES]
# Both tables live on the CPU; _lookup moves them to the weight's device (indexing a CPU table with CUDA indices fails).
FP16_MIN_NORMAL = 2.0**-14
# Blocks whose largest magnitude is below this can have a subnormal scale with their largest value on a level
# other than -127 (|d · level| <= 127 |d|); they also try each level for it (see iq4_nl_scale).
_IQ4_NL_TINY = 128 * FP16_MIN_NORMAL
_IQ4_NL_PLAIN_TRIALS = tuple((s, False) for s in IQ4_NL_TRIALS)
_IQ4_NL_TINY_TRIALS = _IQ4_NL_PLAIN_TRIALS + tuple((float(v), True) for v in llama_quants.IQ4_NL_VALUES)
# Rounding a K-quant's values again can move a sub-block whose codes missed an end of their range; a few
# passes reach values that round to themselves (two suffice on the embedded teacher's weights).
MAX_PASSES = 8


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf`` (half away from zero), written as gguf-py's ``np_roundf`` computes it; **overwrites** ``x``.

    In place because it runs on weight-sized temporaries at every training step, where each further temporary
    costs about as much as the arithmetic; every step is exact (integers and halves), so the result is the same.
    """
    sign = torch.sign(x)
    whole = torch.floor(x.abs_())
    return x.sub_(whole).mul_(2).floor_().add_(whole).mul_(sign)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def _check_shape(shape: tuple[int, ...], kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown GGUF block type {kind!r}; choose one of {', '.join(KINDS)}")
    if not shape or shape[-1] % BLOCKS[kind]:
        raise ValueError(f"{kind} needs rows that are a multiple of {BLOCKS[kind]} wide; got shape {tuple(shape)}")


def fake_quantize(weight: torch.Tensor, kind: str, name: str | None = None) -> torch.Tensor:
    """``weight`` rounded to ``kind``'s grid (blocks along the last dim: :data:`BLOCKS`), as the GGUF file stores it.

    Computed in fp32 and returned in ``weight``'s dtype; no gradient flows through it (see
    :class:`GGUFBlockFakeQuantizer` for the straight-through version). Raises ValueError naming ``name``
    when ``weight`` holds inf or NaN.
    """
    _check_shape(tuple(weight.shape), kind)
    with torch.no_grad():
        if kind in K_KINDS:
            return _k_fixed_point(weight.detach().to(torch.float32), kind, name).to(weight.dtype)
        blocks = weight.detach().to(torch.float32).reshape(-1, BLOCK)
        if kind == "iq4_nl":
            return _iq4_nl_values(blocks, weight, name).reshape(weight.shape).to(weight.dtype)
        d, low = rule_scales(blocks, kind)
        # An inf or NaN makes its block's scale inf or NaN (max, argmax and min propagate NaN); checking the
        # scales (1/32 of the weights) costs far less than the weights themselves.
        if not bool(torch.isfinite(d).all()):
            _refuse_non_finite(weight, name)
        if kind == "q8_0":
            values = _roundf(blocks * _inverse(d)) * _fp16(d)
        elif kind in _HALF:
            # In place on one temporary: this runs on every weight at every step, and on CPU each extra
            # weight-sized temporary (fresh pages) costs about as much as the arithmetic. Same roundings.
            half = _HALF[kind]
            values = blocks * _inverse(d)
            values.add_(half + 0.5).trunc_().clamp_(0, 2 * half - 1).sub_(half).mul_(_fp16(d))
        else:
            codes = torch.trunc((blocks - low) * _inverse(d) + 0.5).clamp(0, _TOP[kind])
            values = _fp16(d) * codes + _fp16(low)
    return values.reshape(weight.shape).to(weight.dtype)


def _refuse_non_finite(weight: torch.Tensor, name: str | None) -> None:
    """Raise the error naming ``weight``'s inf or NaN values, if it holds any."""
    llama_quants.check_finite(weight.detach().float().cpu().numpy(), name)


def _cells(twice: torch.Tensor) -> torch.Tensor:
    """The flat int32 index into the half-unit cell tables of values given doubled (``twice``, overwritten)."""
    return twice.add_(256).clamp_(0, 511).to(torch.int32).view(-1)  # non-negative: truncation is floor


def _iq4_nl_cells(blocks: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The flat int32 index of each ``blocks / d`` into the half-unit cell tables (``d`` 0: the cell of 0)."""
    return _cells(blocks * (2 * _inverse(d)))  # ×2 is exact, so the cell of an on-grid value is its level's own


def _lookup(table: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """``table[cells]``, the CPU table moved to the cells' device (a no-op on the CPU; 512 entries on a GPU)."""
    return table.to(cells.device).index_select(0, cells)


def _iq4_nl_best(blocks: torch.Tensor, top: torch.Tensor, trials: tuple[tuple[float, bool], ...]) -> torch.Tensor:
    """Of the fp16 scales ``top / s`` for ``(s, subnormal_only)`` in ``trials``, the one of least squared error.

    A trial marked ``subnormal_only`` counts only where its scale is below fp16's smallest normal. Returns (n, 1).
    """
    best_d = best_error = None
    for s, subnormal_only in trials:
        d = _fp16(top / s)
        diff = _lookup(_IQ4_NL_CELL_LEVELS, _iq4_nl_cells(blocks, d)).view(blocks.shape).mul_(d).sub_(blocks)
        # Summed in float64: the sum of the 32 fp32 squares is then exact (or rounded far below the gaps between
        # trials), so it does not depend on the order of the additions, which inductor's fused loop
        # (trainer_extras.compile_rounding) chooses differently from eager. Summed in fp32, about 1 block in a
        # million chose another of two trial scales a few ulps apart in error, compiled against eager.
        error = diff.mul_(diff).sum(-1, keepdim=True, dtype=torch.float64)  # 0 exactly when the block is on its grid
        if subnormal_only:
            error = torch.where(d.abs() < FP16_MIN_NORMAL, error, torch.inf)
        if best_d is None:
            best_d, best_error = d, error
        else:  # strictly less: of equal errors the first trial's scale stays
            take = error < best_error
            best_d, best_error = torch.where(take, d, best_d), torch.where(take, error, best_error)
    return best_d


def iq4_nl_scale(blocks: torch.Tensor) -> torch.Tensor:
    """IQ4_NL's fp16 scale per block of ``blocks`` (n, 32), shape (n, 1).

    A normal fp16 scale from :data:`IQ4_NL_TRIALS` puts the block's largest magnitude on level -127, so the
    trial ``s = -127`` gives a block on this grid its own scale back. A subnormal one is rounded so coarsely
    that the largest magnitude may land on another level; blocks small enough for that also try, as subnormal
    scales only, those that put it on each level, one of which is then that block's own scale. So every output
    of this rule is a fixed point of it.
    """
    top = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))
    if not bool(torch.isfinite(top).all()):  # argmax finds an inf or NaN (torch's puts NaN first): no scale
        return torch.full_like(top, torch.nan)
    d = _iq4_nl_best(blocks, top, _IQ4_NL_PLAIN_TRIALS)
    tiny = torch.nonzero(top.abs().squeeze(-1) < _IQ4_NL_TINY).squeeze(-1)
    if len(tiny):
        d[tiny] = _iq4_nl_best(blocks[tiny], top[tiny], _IQ4_NL_TINY_TRIALS)
    return d


def iq4_nl_nearest(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The IQ4_NL code (0..15, int64) and level of each ``y`` (a weight over its block's scale), nearest first.

    The same lookup as the grid's own rounding (ties to the upper level, as ggml's ``best_index_int8``).
    """
    cells = _cells(y * 2)
    return _lookup(_IQ4_NL_CELL_CODES, cells).view(y.shape), _lookup(_IQ4_NL_CELL_LEVELS, cells).view(y.shape)


def rule_scales(blocks: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scale (n, 1) and, for Q4_1, minimum (n, 1) that this module's rule gives blocks (n, 32) of a 32-block type.

    What :func:`fake_quantize` derives from the weights (IQ4_NL: the chosen fp16 scale), for a learned scale's start.
    """
    if kind == "iq4_nl":
        return iq4_nl_scale(blocks), None
    if kind == "q8_0":
        return blocks.abs().amax(dim=-1, keepdim=True) / 127, None
    if kind in _HALF:  # argmax: the first of equal magnitudes, as numpy's argmax
        return torch.gather(blocks, -1, blocks.abs().argmax(dim=-1, keepdim=True)) / -_HALF[kind], None
    if kind in _TOP:
        low = blocks.amin(dim=-1, keepdim=True)
        return (blocks.amax(dim=-1, keepdim=True) - low) / _TOP[kind], low
    raise ValueError(f"{kind} is not a 32-block type; rule_scales takes q8_0, q5_0, q5_1, q4_0, q4_1 or iq4_nl")


def _iq4_nl_values(blocks: torch.Tensor, weight: torch.Tensor, name: str | None) -> torch.Tensor:
    """IQ4_NL grid values of ``blocks`` (n, 32); refuses inf and NaN in ``weight``."""
    d = iq4_nl_scale(blocks)
    if not bool(torch.isfinite(d).all()):  # an inf or NaN spreads to its block's largest value and scale
        _refuse_non_finite(weight, name)
    return _lookup(_IQ4_NL_CELL_LEVELS, _iq4_nl_cells(blocks, d)).view(blocks.shape).mul_(d)


def _q4_k_parts(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q4_K of super-blocks ``x`` (n, 8, 32): fp16 ``d``, ``dmin`` (n, 1, 1), 6-bit ``sc``, ``m`` (n, 8, 1), codes."""
    low = x.amin(-1, keepdim=True).clamp(max=0)  # the grid's minimum is -dmin·m ≤ 0
    high = x.amax(-1, keepdim=True).clamp(min=0)
    scale, floor = (high - low) / 15, -low
    d = _fp16(scale.amax(1, keepdim=True) / 63)
    dmin = _fp16(floor.amax(1, keepdim=True) / 63)
    sc = _roundf(scale * _inverse(d)).clamp(0, 63)
    m = _roundf(floor * _inverse(dmin)).clamp(0, 63)
    codes = _roundf((x + dmin * m).mul_(_inverse(d * sc))).clamp_(0, 15)
    return d, dmin, sc, m, codes


def _q3_k_parts(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q3_K of super-blocks ``x`` (n, 16, 16): fp16 ``d`` (n, 1, 1), signed 6-bit ``l`` (n, 16, 1), codes -4..3."""
    # As Q4_0: each sub-block's value of largest magnitude (sign kept) sets its scale, at code -4.
    sub = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True)) / -4
    d = _fp16(torch.gather(sub, 1, sub.abs().argmax(1, keepdim=True)) / -32)
    level = _roundf(sub * _inverse(d)).clamp(-32, 31)
    codes = _roundf(x * _inverse(d * level)).clamp_(-4, 3)
    return d, level, codes


def _k_values(x: torch.Tensor, kind: str) -> torch.Tensor:
    """One rounding of ``x`` (rows a multiple of 256 wide) to ``kind``; the arithmetic of gguf-py's decoder."""
    if kind == "q4_k":
        d, dmin, sc, m, codes = _q4_k_parts(x.reshape(-1, 8, 32))
        return codes.mul_(d * sc).sub_(dmin * m).reshape(x.shape)
    d, level, codes = _q3_k_parts(x.reshape(-1, 16, 16))
    return codes.mul_(d * level).reshape(x.shape)


def _k_fixed_point(x: torch.Tensor, kind: str, name: str | None = None) -> torch.Tensor:
    values = _k_values(x, kind)
    for _ in range(MAX_PASSES):
        again = _k_values(values, kind)
        if torch.equal(again, values):
            return values
        values = again
    _refuse_non_finite(x, name)  # an inf or NaN never settles (NaN != NaN): say so rather than warn
    # Not seen on real weights; then the file would round these values once more than the student did, which
    # the export's check measures (its drift from the student) rather than hides.
    warnings.warn(f"{kind}: rounding did not settle in {MAX_PASSES} passes; the GGUF file may differ", stacklevel=3)
    return values


def _grid_bytes(x: torch.Tensor, kind: str) -> np.ndarray:
    """The ggml blocks (n, :data:`ROW_BYTES`) of blocks ``x`` (n, :data:`BLOCKS`) already on this module's grid."""
    n = x.shape[0]
    if kind == "iq4_nl":
        d = iq4_nl_scale(x)
        codes = _lookup(_IQ4_NL_CELL_CODES, _iq4_nl_cells(x, d)).view(x.shape)
        d = torch.where(d == 0, 0.0, d)  # +0, as llama.cpp writes an all-zero block (whose codes are 8, level 1)
        return llama_quants.pack_iq4_nl(d.reshape(n).numpy(), codes.numpy())
    if kind == "q4_k":
        d, dmin, sc, m, codes = (t.numpy() for t in _q4_k_parts(x.reshape(n, 8, 32)))
        scale_bytes = llama_quants.q4_k_scale_bytes(sc.reshape(n, 8), m.reshape(n, 8))
        return llama_quants.pack_q4_k(d, dmin, scale_bytes, codes.reshape(n, SUPER_BLOCK))
    d, level, codes = (t.numpy() for t in _q3_k_parts(x.reshape(n, 16, 16)))
    scale_bytes = llama_quants.q3_k_scale_bytes(level.reshape(n, 16) + 32)
    return llama_quants.pack_q3_k(d, scale_bytes, codes.reshape(n, SUPER_BLOCK) + 4)


def _encoded_input(values: np.ndarray, kind: str, name: str | None) -> np.ndarray:
    if kind not in ENCODED_KINDS:
        raise ValueError(f"encode writes {', '.join(ENCODED_KINDS)}; gguf-py's quantize writes {kind!r}")
    x = np.ascontiguousarray(values, dtype=np.float32)
    _check_shape(x.shape, kind)
    llama_quants.check_finite(x, name)
    return x


def encode(values: np.ndarray, kind: str, name: str | None = None) -> np.ndarray:
    """The GGUF bytes of ``values`` as Q4_K, Q3_K (rows a multiple of 256 wide) or IQ4_NL on this module's grid.

    ``values`` are rounded first (:func:`fake_quantize`), so any array can be written, and the file holds
    exactly what a student trained on the grid ran with. Returns uint8 ``(*rows, row_bytes)``: 144 bytes
    (Q4_K) or 110 (Q3_K) per 256 weights, 18 (IQ4_NL) per 32, laid out as ggml's ``block_q4_K`` /
    ``block_q3_K`` / ``block_iq4_nl``. ``name`` is the tensor's, for the error on inf or NaN.
    """
    x = _encoded_input(values, kind, name)
    rounded = fake_quantize(torch.from_numpy(x), kind, name)
    return _grid_bytes(rounded.reshape(-1, BLOCKS[kind]), kind).reshape(*x.shape[:-1], -1)


def _one_pass(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "iq4_nl":
        return _iq4_nl_values(blocks, blocks, None)
    return _k_values(blocks, kind)


def encode_weights(values: np.ndarray, kind: str, name: str | None = None) -> np.ndarray:
    """A weight's GGUF bytes in Q4_K, Q3_K or IQ4_NL as the export writes them: trained values kept, others llama.cpp's.

    A block that one pass of this module's rounding leaves unchanged (a QAT student's weights, or all zeros)
    is written as it is, exactly; every other one gets llama.cpp's weighted search, the bytes
    ``llama-quantize`` writes without an importance matrix (``quantize_row_q4_K_ref`` / ``..._q3_K_ref`` /
    ``quantize_iq4_nl``). llama.cpp's IQ4_NL search writes blocks on this grid unchanged too, so for IQ4_NL
    both ways give the same bytes there. Same layout and arguments as :func:`encode`.
    """
    x = _encoded_input(values, kind, name)
    blocks = x.reshape(-1, BLOCKS[kind])
    grid = torch.from_numpy(blocks)
    with torch.no_grad():
        on_grid = (_one_pass(grid, kind) == grid).all(-1).numpy()
    out = np.empty((len(blocks), ROW_BYTES[kind]), np.uint8)
    if on_grid.any():
        out[on_grid] = _grid_bytes(grid[torch.from_numpy(on_grid)], kind)
    if not on_grid.all():
        out[~on_grid] = llama_quants.quantize(blocks[~on_grid], kind)
    return out.reshape(*x.shape[:-1], -1)


class GGUFBlockFakeQuantizer(nn.Module):
    """A weight fake quantizer for torchao's ``FakeQuantizedLinear``/``FakeQuantizedEmbedding`` on a GGUF grid.

    The forward returns the grid values with a straight-through gradient (the identity), the usual QAT
    estimator. It has no parameters or buffers, so the module's state dict keys do not change.
    """

    def __init__(self, kind: str, name: str | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown GGUF block type {kind!r}; choose one of {', '.join(KINDS)}")
        self.kind = kind
        self.name = name  # the weight's name, for the error on inf or NaN

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Grid values forward, identity backward."""
        return weight + fake_quantize(weight, self.kind, self.name).sub_(weight.detach())

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"kind={self.kind}, block={BLOCKS[self.kind]}"
