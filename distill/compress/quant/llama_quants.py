"""llama.cpp's own encoders for its block types, in numpy, byte for byte: what ``llama-quantize`` writes.

The K-quants' scales come from a weighted search in ``ggml-quants.c``: Q4_K fits each sub-block's scale
and minimum by weighted least squares over 21 trial scales (``make_qkx2_quants``), Q3_K moves each code
while that lowers the weighted error (``make_q3_quants``). On generic weights this leaves less squared
error than the plain range rule of :mod:`distill.compress.quant.gguf_grid`, which stays for QAT: its grid
values are fixed points, so a trained student is written exactly as it ran.

:func:`quantize` reproduces, for the whole array at once (every loop over blocks is a numpy operation):

- without an importance vector, ``quantize_row_q4_K_ref``/``..._q3_K_ref``/``..._q2_K_ref`` (the rounding
  of ``llama-quantize`` without ``--imatrix``) and IQ4_NL's ``quantize_iq4_nl``; Q8_0, Q4_0, Q4_1, Q5_0
  and Q5_1 are gguf-py's encoders, which already follow ggml bit for bit;
- with one (an importance matrix row: a weight per input column, as ``llama-imatrix`` writes), the
  imatrix-weighted ``quantize_q4_K``, ``quantize_q3_K``, ``quantize_q2_K``, ``quantize_q4_0``,
  ``quantize_q4_1``, ``quantize_q5_0``, ``quantize_q5_1`` and ``quantize_iq4_nl`` (Q8_0 ignores it, as
  llama.cpp does).

Exactness: ggml-quants.c is compiled into ``ggml-base`` without ``-march`` flags, so its float arithmetic
is plain IEEE fp32 (no fused multiply-adds); every sum here runs element by element in C's order, every
product in C's association, and ``nearest_int`` is ggml's add-1.5·2^23 trick (round half to even). The
committed fixtures (``tests/fixtures/llama_cpp_quants.npz``, written by ``bench/llama_cpp_fixtures.py``
from llama.cpp's own library) pin it.

Arrays are laid out element-major inside this module, ``(block length, blocks)``, so the loops over a
block's elements run over contiguous vectors of all blocks.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
QK_K = 256  # the K-quants' super-block
GROUP_MAX_EPS = F32(1e-15)  # ggml: a group whose largest magnitude is below this is all zero
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32)
BLOCKS = {
    "q8_0": 32,
    "q5_0": 32,
    "q5_1": 32,
    "q4_0": 32,
    "q4_1": 32,
    "iq4_nl": 32,
    "q4_k": QK_K,
    "q3_k": QK_K,
    "q2_k": QK_K,
}
# The types whose rounding without importance is gguf-py's own encoder (it follows ggml's ``_ref`` bit for bit).
GGUF_PY_KINDS = ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
KINDS = tuple(BLOCKS)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """As ggml's ``nearest_int``: add 1.5·2^23 in fp32, read the mantissa (ties to even; past 2^22 its garbage)."""
    bits = (np.asarray(v, F32) + F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _sum(terms: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """``s = start; for i: s += terms[i]`` in fp32 along the first axis; numpy's pairwise sums round differently."""
    if terms.dtype != F32:  # a float64 term would be summed in double and rounded once: not C's sum
        raise TypeError(f"fp32 sums need fp32 terms; got {terms.dtype}")
    acc = np.zeros(terms.shape[1:], F32) if start is None else start.copy()
    for term in terms:
        acc += term
    return acc


def _fp16(v: np.ndarray) -> np.ndarray:
    """As ggml's ``GGML_FP32_TO_FP16``: round to nearest even, subnormals kept (numpy's cast does the same)."""
    return np.asarray(v, F32).astype(np.float16)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The first element of largest magnitude per block, sign kept (ggml's ``if (ax > amax)`` scan from 0)."""
    top = _first(x, np.abs(x).argmax(0))
    return np.where(np.abs(top) > 0, top, F32(0))


def _first(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``x[index[j], j]`` for every block ``j``."""
    return np.take_along_axis(x, index[None], 0)[0]


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` (..., row) as element-major blocks ``(size, n)``, blocks in memory order."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def make_qkx(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool = False
) -> tuple[np.ndarray, ...]:
    """``make_qkx2_quants``/``make_qkx3_quants`` (identical with weights given): scale, -min and codes per block.

    ``x`` and ``w`` (weights) are element-major, (block length, blocks); so are the codes returned. The start
    is the block's range over ``nmax`` steps (minimum clamped to 0 from above); then for ``nstep + 1`` trial
    steps ``(nmax + rmin + rdelta·is) / range`` the codes are refitted by weighted least squares (scale and
    minimum) and kept when the weighted squared error (with ``mad``, the weighted absolute error: C's
    ``use_mad``, which Q2_K uses) drops.
    """

    def error(diff: np.ndarray) -> np.ndarray:
        return _sum(w * (np.abs(diff) if mad else diff * diff))

    mn, mx = _first(x, x.argmin(0)), _first(x, x.argmax(0))  # the first of equal values, as C's strict scan
    mn = np.where(mn > 0, F32(0), mn)
    flat = mx == mn
    sum_w = _sum(w[1:], start=w[0])  # C starts both sums from the first element
    sum_x = _sum(w[1:] * x[1:], start=w[0] * x[0])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        codes = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax).astype(F32)
        best = error(scale * codes + mn - x)
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
            trial = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax).astype(F32)
            wl = w * trial
            sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * trial), _sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            above = this_min > 0
            this_scale = np.where(above, sum_xl / sum_l2, this_scale)
            this_min = np.where(above, F32(0), this_min)
            err = error(this_scale * trial + this_min - x)
            better = (det > 0) & (err < best) & ~flat
            codes = np.where(better, trial, codes)
            best, scale, mn = (np.where(better, a, b) for a, b in ((err, best), (this_scale, scale), (this_min, mn)))
    return np.where(flat, F32(0), scale), -mn, np.where(flat, F32(0), codes)


def make_q3(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(16, 4, x, L, do_rmse=true)``: scale and codes 0..7 per sub-block (0 for an all-zero one).

    ``x`` is element-major, (16, blocks); so are the codes. From the largest magnitude at code -4, each code
    is moved (five sweeps) while that raises ``(Σ w·x·l)² / Σ w·l²`` with ``w = x²``: the weighted error at
    the least-squares scale drops.
    """
    top = _first(x, np.abs(x).argmax(0))
    zero = np.abs(top) < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        codes = np.clip(_nearest_int((F32(-4) / top) * x), -4, 3).astype(F32)
        sumlx, suml2 = _sum(wx * codes), _sum((w * codes) * codes)
        for _ in range(5):  # C stops after a sweep that changes nothing; further sweeps change nothing either
            for i in range(len(x)):
                old = codes[i]
                slx = sumlx - wx[i] * old
                sl2 = suml2 - (w[i] * old) * old
                new = np.clip(_nearest_int((x[i] * sl2) / slx), -4, 3).astype(F32)
                slx_new = slx + wx[i] * new
                sl2_new = sl2 + (w[i] * new) * new
                take = (
                    (slx > 0) & (new != old) & (sl2_new > 0) & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
                )
                codes[i] = np.where(take, new, old)
                sumlx, suml2 = np.where(take, slx_new, sumlx), np.where(take, sl2_new, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), codes + 4)


def make_qx(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, w)``: scale and codes 0..2·nmax-1 (0 for an all-zero block).

    ``x``, ``w``: element-major (block length, blocks). Symmetric codes at 19 trial scales
    ``-(nmax + 0.1·is) / max``, keeping the one whose least-squares scale gives the smallest weighted error.
    """
    top = _first(x, np.abs(x).argmax(0))
    zero = np.abs(top) < GROUP_MAX_EPS
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        codes = np.clip(_nearest_int((F32(-nmax) / top) * x), -nmax, nmax - 1).astype(F32)
        sumlx, suml2 = _sum(wx * codes), _sum((w * codes) * codes)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / top
            trial = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
            sumlx, suml2 = _sum(wx * trial), _sum((w * trial) * trial)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            codes = np.where(take, trial, codes)
            scale = np.where(take, sumlx / suml2, scale)
            best = np.where(take, scale * sumlx, best)
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), codes + nmax)


def make_qp(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants``: an unsigned scale for non-negative ``x`` (the sub-block scales) and its codes 0..nmax.

    ``x``, ``w``: element-major (values per super-block, super-blocks); codes are returned as C stores them (uint8).
    """
    mx = np.maximum(x.max(0), F32(0))
    zero = mx < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / mx
        stored = (_nearest_int(iscale * x) & 0xFF).astype(F32)  # C stores these in uint8
        diff = x - (F32(1) / iscale) * stored
        best = _sum((w * diff) * diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            trial_iscale = (F32(0.1) * F32(step) + F32(nmax)) / mx
            trial = np.minimum(nmax, _nearest_int(trial_iscale * x)).astype(F32)
            diff = x - (F32(1) / trial_iscale) * trial
            error = _sum((w * diff) * diff)
            take = error < best
            best, iscale = np.where(take, error, best), np.where(take, trial_iscale, iscale)
        codes = np.minimum(nmax, _nearest_int(iscale * x))
        stored, codes = (codes & 0xFF).astype(F32), codes.astype(F32)  # the sums take the int, C keeps its uint8
        wx = w * x
        sumlx, suml2 = _sum(wx * codes), _sum((w * codes) * codes)
        for _ in range(5):
            for i in range(len(x)):
                old = stored[i]
                slx = sumlx - wx[i] * old
                sl2 = suml2 - (w[i] * old) * old
                new = np.minimum(nmax, _nearest_int((x[i] * sl2) / slx)).astype(F32)
                slx_new = slx + wx[i] * new
                sl2_new = sl2 + (w[i] * new) * new
                take = (slx > 0) & (sl2 > 0) & (new != old) & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
                stored[i] = np.where(take, (new.astype(np.int32) & 0xFF).astype(F32), old)
                sumlx, suml2 = np.where(take, slx_new, sumlx), np.where(take, sl2_new, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, stored).astype(np.uint8)


def _best_index(v: np.ndarray) -> np.ndarray:
    """As ggml's ``best_index_int8`` over the IQ4_NL levels: the nearest level (the upper one on a tie)."""
    values = IQ4_NL_VALUES
    upper = np.searchsorted(values, v, side="right").clip(1, len(values) - 1)
    index = np.where(v - values[upper - 1] < values[upper] - v, upper - 1, upper)
    return np.where(v <= values[0], 0, np.where(v >= values[-1], len(values) - 1, index))


def _half_bytes(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float16).reshape(-1, 1).view(np.uint8)


def q4_k_scale_bytes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12 bytes holding a Q4_K super-block's eight 6-bit scales and minima (``sc``, ``m``: (n, 8))."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)  # uint8 shifts wrap as C's stores into uint8 do
    return np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            m[:, :4] | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
        ],
        axis=1,
    )


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As ggml's ``get_scale_min_k4``: the scales and minima the decoder reads back from the 12 bytes."""
    low, mid, high = packed[:, :4], packed[:, 4:8], packed[:, 8:]
    sc = np.concatenate([low & 63, (high & 15) | ((low >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 63, (high >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, m


def pack_q4_k(d: np.ndarray, dmin: np.ndarray, scale_bytes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The ``block_q4_K`` bytes (n, 144): fp16 ``d``, ``dmin`` (n,), :func:`q4_k_scale_bytes`, codes 0..15 (n, 256)."""
    n = len(scale_bytes)
    q = codes.reshape(n, 4, 2, 32).astype(np.uint8)  # sub-blocks 2c and 2c+1 share bytes: low and high nibble
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_half_bytes(d), _half_bytes(dmin), scale_bytes, qs], axis=1)


def q3_k_scale_bytes(stored: np.ndarray) -> np.ndarray:
    """The 12 bytes holding a Q3_K super-block's sixteen 6-bit scales, stored as ``scale + 32`` (n, 16)."""
    s = stored.astype(np.uint8)
    low = (s[:, :8] & 15) | ((s[:, 8:] & 15) << 4)
    high = np.bitwise_or.reduce((s >> 4).reshape(-1, 4, 4) << np.array([0, 2, 4, 6], np.uint8)[:, None], axis=1)
    return np.concatenate([low, high.astype(np.uint8)], axis=1)


def pack_q3_k(d: np.ndarray, scale_bytes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The ``block_q3_K`` bytes (n, 110): codes 0..7 (n, 256), :func:`q3_k_scale_bytes`, fp16 ``d`` (n,)."""
    n = len(scale_bytes)
    u = codes.reshape(n, 256).astype(np.uint8)
    hmask = np.bitwise_or.reduce((u >> 2).reshape(n, 8, 32) << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    qs = np.bitwise_or.reduce((u & 3).reshape(n, 2, 4, 32) << np.array([0, 2, 4, 6], np.uint8)[:, None], axis=2)
    return np.concatenate(
        [hmask.astype(np.uint8), qs.reshape(n, 64).astype(np.uint8), scale_bytes, _half_bytes(d)], axis=1
    )


def pack_q2_k(d: np.ndarray, dmin: np.ndarray, scale_bytes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The ``block_q2_K`` bytes (n, 84): scale bytes (n, 16), codes 0..3 (n, 256), fp16 ``d`` and ``dmin`` (n,).

    A scale byte holds a sub-block's scale (low nibble) and minimum (high nibble); a code byte holds elements
    i, i+32, i+64 and i+96 of a half super-block.
    """
    n = len(scale_bytes)
    q = codes.reshape(n, 2, 4, 32).astype(np.uint8)
    qs = np.bitwise_or.reduce(q << np.array([0, 2, 4, 6], np.uint8)[:, None], axis=2).astype(np.uint8)
    return np.concatenate([scale_bytes.astype(np.uint8), qs.reshape(n, 64), _half_bytes(d), _half_bytes(dmin)], axis=1)


def _pack_q5(d: np.ndarray, low: np.ndarray | None, codes: np.ndarray) -> np.ndarray:
    """``block_q5_0`` (n, 22) or, with ``low`` (the fp16 minimum), ``block_q5_1`` (n, 24) of codes 0..31 (32, n)."""
    q = codes.T.astype(np.uint8)
    qs = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    qh = np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little")  # bit j: the fifth bit of code j
    parts = [_half_bytes(d)] + ([] if low is None else [_half_bytes(low)])
    return np.concatenate([*parts, qh, qs], axis=1)


def _sigma2(x: np.ndarray, repeat: int) -> np.ndarray:
    """``2·Σx²/256`` per super-block of ``x`` (n, 256), repeated for each of its ``repeat`` sub-blocks."""
    xt = np.ascontiguousarray(x.T)
    return np.repeat((F32(2) * _sum(xt * xt)) / F32(QK_K), repeat)


def _q4_k(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q4_K_ref`` (no importance) or ``quantize_row_q4_K_impl`` of super-blocks ``x`` (n, 256)."""
    n = len(x)
    xs = _blocks(x, 32)
    if importance is None:
        w = np.sqrt(_sum(xs * xs) / F32(32)) + np.abs(xs)
        scales, mins, codes = make_qkx(xs, w, 15, -1.0, 0.1, 20)
        scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
        top_scale, top_min = (np.where(v.max(1) > 0, v.max(1), F32(0)) for v in (scales, mins))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(top_scale > 0, F32(63) / top_scale, F32(0))
            inv_min = np.where(top_min > 0, F32(63) / top_min, F32(0))
        sc = np.minimum(63, _nearest_int(inv_scale[:, None] * scales) & 0xFF)
        m = np.minimum(63, _nearest_int(inv_min[:, None] * mins) & 0xFF)
        d, dmin = _fp16(top_scale / F32(63)), _fp16(top_min / F32(63))
    else:
        w = _blocks(importance, 32) * np.sqrt(_sigma2(x, 8) + xs * xs)
        sw = _sum(w).reshape(n, 8).T
        scales, mins, codes = make_qkx(xs, w, 15, -0.9, 0.05, 36)
        d_block, sc = make_qp(scales.reshape(n, 8).T, sw, 63)
        m_block, m = make_qp(mins.reshape(n, 8).T, sw, 63)
        d, dmin, sc, m = _fp16(d_block), _fp16(m_block), sc.T, m.T
    packed = q4_k_scale_bytes(sc, m)
    sc, m = _q4_k_scales(packed)
    step = (d.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
    low = (dmin.astype(F32)[:, None] * m.astype(F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_nearest_int((xs + low) / step), 0, 15)
    codes = np.where(step != 0, again, codes)  # C skips a sub-block whose scale is 0: it keeps the search's codes
    return pack_q4_k(d, dmin, packed, codes.T.reshape(n, QK_K))


def _q3_k(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q3_K_ref`` (no importance) or ``quantize_row_q3_K_impl`` of super-blocks ``x`` (n, 256)."""
    n = len(x)
    xs = _blocks(x, 16)
    if importance is None:
        scales, codes = make_q3(xs)
        scales = scales.reshape(n, 16)
        top = _signed_absmax(scales.T)
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-32) / top
            level = ((_nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # C stores it in an int8
            d = np.where(top != 0, _fp16(F32(1) / iscale), np.float16(0))
        stored = np.where(top[:, None] != 0, np.clip(level, -32, 31) + 32, 0)  # all scales 0: the bytes stay 0
    else:
        w = _blocks(importance, 16) * np.sqrt(_sigma2(x, 16) + xs * xs)
        scales, codes = make_qx(xs, w, 4)
        d_block, stored = make_qx(scales.reshape(n, 16).T, _sum(w).reshape(n, 16).T, 32)
        d, stored = _fp16(d_block), stored.T
    step = (d.astype(F32)[:, None] * (stored - 32).astype(F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_nearest_int(xs / step), -4, 3) + 4
    codes = np.where(step != 0, again, codes)
    return pack_q3_k(d, q3_k_scale_bytes(stored), codes.T.reshape(n, QK_K))


def _q2_k_scales(scales: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, ...]:
    """``quantize_row_q2_K_ref``'s 4-bit sub-block scales and minima under the largest of each (n, 16)."""
    top_scale, top_min = (np.maximum(v.max(1), F32(0)) for v in (scales, mins))  # C's scan starts from 0
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(top_scale[:, None] > 0, _nearest_int((F32(15) / top_scale)[:, None] * scales), 0)
        m = np.where(top_min[:, None] > 0, _nearest_int((F32(15) / top_min)[:, None] * mins), 0)
    stored = (sc | (m << 4)) & 0xFF  # C ORs both into one uint8
    return _fp16(top_scale / F32(15)), _fp16(top_min / F32(15)), stored


def _q2_k(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q2_K_ref`` (no importance) or ``quantize_row_q2_K_impl`` of super-blocks ``x`` (n, 256).

    Sixteen sub-blocks of 16, each with a 4-bit scale and a 4-bit minimum under the fp16 ``d`` and ``dmin``,
    codes 0..3: value ``d·sc · q − dmin·m`` (2.625 bits per weight). Without importance each sub-block is
    fitted to the absolute error weighted by ``|x|``; with it, to the squared error weighted by
    ``importance·√(σ² + x²)`` (σ² the super-block's mean square), and the scales by ``make_qp_quants``.
    """
    n = len(x)
    xs = _blocks(x, 16)
    if importance is None:
        scales, mins, codes = make_qkx(xs, np.abs(xs), 3, -0.5, 0.1, 15, mad=True)
        d, dmin, stored = _q2_k_scales(scales.reshape(n, 16), mins.reshape(n, 16))
    else:
        xt = np.ascontiguousarray(x.T)
        sigma2 = np.repeat(_sum(xt * xt) / F32(QK_K), 16)  # Σx²/256: half of what Q4_K and Q3_K weigh by
        w = _blocks(importance, 16) * np.sqrt(sigma2 + xs * xs)
        scales, mins, codes = make_qkx(xs, w, 3, -0.9, 0.05, 36)
        sw = _sum(w).reshape(n, 16).T
        d_block, sc = make_qp(scales.reshape(n, 16).T, sw, 15)
        m_block, m = make_qp(mins.reshape(n, 16).T, sw, 15)
        d, dmin = _fp16(d_block), _fp16(m_block)
        stored = (sc.T.astype(np.int64) | (m.T.astype(np.int64) << 4)) & 0xFF
    step = (d.astype(F32)[:, None] * (stored & 15).astype(F32)).reshape(-1)
    low = (dmin.astype(F32)[:, None] * (stored >> 4).astype(F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_nearest_int((xs + low) / step), 0, 3)
    codes = np.where(step != 0, again, codes)  # C skips a sub-block whose scale is 0: it keeps the fit's codes
    return pack_q2_k(d, dmin, stored, codes.T.reshape(n, QK_K))


def _row_weights(rows: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of 32 of ``rows`` and their weights ``importance·√(σ² + x²)``, σ² the row's mean square (Q4_0, Q4_1)."""
    width = rows.shape[1]
    rt = np.ascontiguousarray(rows.T)
    sigma2 = np.repeat(_sum(rt * rt) / F32(width), width // 32)
    xs = _blocks(rows, 32)
    return xs, _blocks(np.broadcast_to(importance, rows.shape), 32) * np.sqrt(sigma2 + xs * xs)


def _q4_0(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """``quantize_row_q4_0_impl`` with importance: 18 bytes per 32 weights."""
    xs, w = _row_weights(rows, importance)
    d, codes = make_qx(xs, w, 8)
    q = codes.T.astype(np.uint8)
    return np.concatenate([_half_bytes(_fp16(d)), q[:, :16] | (q[:, 16:] << 4)], axis=1)


def _q4_1(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """``quantize_row_q4_1_impl`` with importance: 20 bytes per 32 weights."""
    xs, w = _row_weights(rows, importance)
    scale, neg_min, codes = make_qkx(xs, w, 15, -0.9, 0.05, 36)
    q = codes.T.astype(np.uint8)
    return np.concatenate(
        [_half_bytes(_fp16(scale)), _half_bytes(_fp16(-neg_min)), q[:, :16] | (q[:, 16:] << 4)], axis=1
    )


def _q5_0(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """``quantize_row_q5_0_impl`` with importance: 22 bytes per 32 weights (as Q4_0, codes -16..15)."""
    xs, w = _row_weights(rows, importance)
    d, codes = make_qx(xs, w, 16)
    return _pack_q5(_fp16(d), None, codes)


def _q5_1(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """``quantize_row_q5_1_impl`` with importance: 24 bytes per 32 weights (as Q4_1, codes 0..31)."""
    xs, w = _row_weights(rows, importance)
    scale, neg_min, codes = make_qkx(xs, w, 31, -0.9, 0.05, 36)
    return _pack_q5(_fp16(scale), _fp16(-neg_min), codes)


def pack_iq4_nl(d: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The ``block_iq4_nl`` bytes (n, 18): fp16 ``d`` (n,), then codes 0..15 (n, 32) into :data:`IQ4_NL_VALUES`."""
    return pack_32(d, None, codes, 4)


def pack_32(d: np.ndarray, low: np.ndarray | None, codes: np.ndarray, bits: int) -> np.ndarray:
    """A 32-block of fp16 ``d`` (n,), optional fp16 ``low`` (n,) and stored codes (n, 32): Q4_0/Q4_1/IQ4_NL/Q8_0.

    ``bits`` 4: codes 0..15 as nibbles (element j low, j + 16 high: ``block_q4_0``, ``block_q4_1`` with ``low``,
    ``block_iq4_nl``); 8: int8 codes (``block_q8_0``).
    """
    parts = [_half_bytes(d)] + ([] if low is None else [_half_bytes(low)])
    if bits == 8:
        q = np.asarray(codes).astype(np.int8).view(np.uint8)
        return np.concatenate([*parts, q], axis=1)
    q = np.asarray(codes).astype(np.uint8)
    return np.concatenate([*parts, q[:, :16] | (q[:, 16:] << 4)], axis=1)


def _iq4_sums(x: np.ndarray, w: np.ndarray, inverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = IQ4_NL_VALUES[_best_index(inverse * x)]
    wq = w * q
    return _sum(wq * x), _sum(wq * q)


def _iq4_nl(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """``quantize_iq4_nl`` (blocks of 32, 15 trial scales): 18 bytes per 32 weights, codes into the levels."""
    xs = _blocks(rows, 32)
    if importance is None:
        w = xs * xs
    else:
        sigma2 = _sum(xs * xs) * (F32(2) / F32(32))
        w = _blocks(np.broadcast_to(importance, rows.shape), 32) * np.sqrt(sigma2 + xs * xs)
    top = _first(xs, np.abs(xs).argmax(0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sumqx, sumq2 = _iq4_sums(xs, w, F32(1) / (-top / IQ4_NL_VALUES[0]))
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
        best = d * sumqx
        for step in range(-7, 8):
            sumqx, sumq2 = _iq4_sums(xs, w, F32(step + int(IQ4_NL_VALUES[0])) / top)
            take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(take, sumqx / sumq2, d)
            best = np.where(take, d * sumqx, best)
        d = np.where(np.abs(top) < GROUP_MAX_EPS, F32(0), d)
        codes = _best_index(np.where(d != 0, F32(1) / d, F32(0)) * xs)
    return pack_iq4_nl(_fp16(d), codes.T)


# Whole rows (an importance row spans them; Q4_0's to Q5_1's weights use the row's mean square) and super-blocks.
_ROW_QUANTIZERS = {"q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1, "iq4_nl": _iq4_nl}
_SUPER_BLOCK_QUANTIZERS = {"q4_k": _q4_k, "q3_k": _q3_k, "q2_k": _q2_k}


def check_finite(values: np.ndarray, name: str | None = None) -> None:
    """Refuse ``values`` holding inf or NaN, naming the tensor and the first such value's place.

    A single one spoils its whole block in every llama.cpp type (the block's scale becomes inf or NaN).
    """
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    at = f"row {first[0]}, col {first[1]}" if len(first) == 2 else f"index {first if len(first) > 1 else first[0]}"
    count = int(bad.sum())
    raise ValueError(
        f"{f'weight {name}' if name else 'the weight'} holds {count} non-finite value{'s' if count > 1 else ''} "
        f"({values[first]} at {at}); llama.cpp's block types cannot store inf or NaN (one spoils its whole block's "
        "scale): find where training diverged, or export a checkpoint from before it"
    )


def quantize(
    values: np.ndarray, kind: str, importance: np.ndarray | None = None, name: str | None = None
) -> np.ndarray:
    """The bytes llama.cpp writes for ``values`` (blocks along the last dim) in ``kind``, shaped ``(*rows, row_bytes)``.

    Args:
        values: weights, rows a multiple of :data:`BLOCKS` wide.
        kind: one of :data:`KINDS`.
        importance: one non-negative weight per column (an importance-matrix row), or None for the
            rounding ``llama-quantize`` does without ``--imatrix``.
        name: the tensor's name, for the error on inf or NaN.

    """
    import gguf

    if kind not in KINDS:
        raise ValueError(f"unknown llama.cpp block type {kind!r}; choose one of {', '.join(KINDS)}")
    x = np.ascontiguousarray(values, dtype=F32)
    if x.ndim == 0 or x.shape[-1] % BLOCKS[kind]:
        raise ValueError(f"{kind} needs rows that are a multiple of {BLOCKS[kind]} wide; got shape {x.shape}")
    check_finite(x, name)
    rows = x.reshape(-1, x.shape[-1])
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=F32)
        if importance.shape != (x.shape[-1],):
            raise ValueError(f"importance must hold one weight per column ({x.shape[-1]}); got {importance.shape}")
        check_finite(importance, f"{name} importance" if name else "importance")
    if kind in GGUF_PY_KINDS and (importance is None or kind == "q8_0"):
        out = gguf.quants.quantize(rows, gguf.GGMLQuantizationType[kind.upper()])  # ggml's ref, bit for bit
    elif kind in _ROW_QUANTIZERS:
        out = _ROW_QUANTIZERS[kind](rows, importance)
    else:
        qw = None if importance is None else np.broadcast_to(importance, rows.shape).reshape(-1, QK_K)
        out = _SUPER_BLOCK_QUANTIZERS[kind](rows.reshape(-1, QK_K), qw)
    return out.reshape(*x.shape[:-1], -1)
