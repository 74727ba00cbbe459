"""Fake quantization on llama.cpp's block grids (Q8_0, Q4_0, Q4_1, Q4_K, Q3_K), so a QAT student exports as trained.

llama.cpp stores these types in blocks of 32 weights along a row (a Linear's in-features, an embedding's
vector), each block with an fp16 scale, and for Q4_1 an fp16 minimum:

- Q8_0: ``d = max|x| / 127``, codes ``roundf(x / d)`` in [-127, 127];
- Q4_0: ``d = m / -8`` where ``m`` is the block's value of largest magnitude (sign kept), codes
  ``trunc(x / d + 8.5)`` clipped to [0, 15], value ``(q - 8) · d``;
- Q4_1: ``d = (max - min) / 15``, codes ``trunc((x - min) / d + 0.5)`` clipped to [0, 15], value ``q · d + min``.

The K-quants store super-blocks of 256 weights (so only rows 256k wide can hold them; SmolLM2's 576-wide
rows cannot, its 1536-wide ``down_proj`` rows can):

- Q4_K: eight sub-blocks of 32, each with a 6-bit scale and a 6-bit minimum under the super-block's fp16 ``d``
  and ``dmin``, codes 0..15, value ``d·sc · q − dmin·m`` (4.5 bits per weight, asymmetric like the Q4_1 grid
  the embedded teacher ships in);
- Q3_K: sixteen sub-blocks of 16, each with a signed 6-bit scale under the fp16 ``d``, codes −4..3, value
  ``d·l · q`` (3.44 bits per weight).

gguf-py reads both but has no encoder for them, so :func:`encode` here writes their bytes, and the tests
decode them with gguf-py. llama.cpp chooses a K-quant's scales by a weighted search; the rule here is the
plain one (each sub-block's range, then the 6-bit scales rounded under the largest), applied until the
values no longer change: the GGUF writer quantizes the weights it is given again, so the values a student
trains on must be a fixed point of the rounding for the file to hold exactly them.

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

BLOCK = 32  # the legacy types quantize blocks of 32 weights along the last dim
SUPER_BLOCK = 256  # the K-quants' super-blocks (QK_K in ggml)
BLOCKS = {"q8_0": BLOCK, "q4_0": BLOCK, "q4_1": BLOCK, "q4_k": SUPER_BLOCK, "q3_k": SUPER_BLOCK}
KINDS = tuple(BLOCKS)
K_KINDS = ("q4_k", "q3_k")
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


def fake_quantize(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """``weight`` rounded to ``kind``'s grid (blocks along the last dim: :data:`BLOCKS`), as the GGUF file stores it.

    Computed in fp32 and returned in ``weight``'s dtype; no gradient flows through it (see
    :class:`GGUFBlockFakeQuantizer` for the straight-through version).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown GGUF block type {kind!r}; choose one of {', '.join(KINDS)}")
    if weight.shape[-1] % BLOCKS[kind]:
        raise ValueError(
            f"{kind} needs rows that are a multiple of {BLOCKS[kind]} wide; got shape {tuple(weight.shape)}"
        )
    with torch.no_grad():
        if kind in K_KINDS:
            return _k_fixed_point(weight.detach().to(torch.float32), kind).to(weight.dtype)
        blocks = weight.detach().to(torch.float32).reshape(-1, BLOCK)
        if kind == "q8_0":
            d = blocks.abs().amax(dim=-1, keepdim=True) / 127
            values = _roundf(blocks * _inverse(d)) * _fp16(d)
        elif kind == "q4_0":
            index = blocks.abs().argmax(dim=-1, keepdim=True)  # the first of equal magnitudes, as numpy's argmax
            d = torch.gather(blocks, -1, index) / -8
            # In place on one temporary: this runs on every weight at every step, and on CPU each extra
            # weight-sized temporary (fresh pages) costs about as much as the arithmetic. Same roundings.
            values = blocks * _inverse(d)
            values.add_(8.5).trunc_().clamp_(0, 15).sub_(8).mul_(_fp16(d))
        else:  # q4_1
            low = blocks.amin(dim=-1, keepdim=True)
            d = (blocks.amax(dim=-1, keepdim=True) - low) / 15
            codes = torch.trunc((blocks - low) * _inverse(d) + 0.5).clamp(0, 15)
            values = _fp16(d) * codes + _fp16(low)
    return values.reshape(weight.shape).to(weight.dtype)


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


def _k_fixed_point(x: torch.Tensor, kind: str) -> torch.Tensor:
    values = _k_values(x, kind)
    for _ in range(MAX_PASSES):
        again = _k_values(values, kind)
        if torch.equal(again, values):
            return values
        values = again
    # Not seen on real weights; then the file would round these values once more than the student did, which
    # the export's check measures (its drift from the student) rather than hides.
    warnings.warn(f"{kind}: rounding did not settle in {MAX_PASSES} passes; the GGUF file may differ", stacklevel=3)
    return values


def _bits(values: np.ndarray, shifts: np.ndarray, axis: int) -> np.ndarray:
    """OR of ``values`` shifted left by ``shifts`` along ``axis`` (the packing step of every layout below)."""
    return np.bitwise_or.reduce(values << shifts, axis=axis).astype(np.uint8)


def encode(values: np.ndarray, kind: str) -> np.ndarray:
    """The GGUF bytes of ``values`` (rows a multiple of 256 wide) as Q4_K or Q3_K, shaped as gguf-py's quantize.

    ``values`` are rounded first (:func:`fake_quantize`), so any array can be written; a student trained
    on the grid is written exactly as it ran. Returns uint8 ``(*rows, row_bytes)``: 144 bytes (Q4_K) or 110
    (Q3_K) per 256 weights, laid out as ggml's ``block_q4_K`` / ``block_q3_K``.
    """
    if kind not in K_KINDS:
        raise ValueError(f"encode writes {', '.join(K_KINDS)}; gguf-py's quantize writes {kind!r}")
    x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    rows = x.shape[:-1]
    x = fake_quantize(x, kind)
    u8 = np.uint8
    if kind == "q4_k":
        d, dmin, sc, m, codes = (t.numpy() for t in _q4_k_parts(x.reshape(-1, 8, 32)))
        n = d.shape[0]
        sc, m = sc.reshape(n, 8).astype(u8), m.reshape(n, 8).astype(u8)
        scales = np.concatenate(
            [
                sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
                m[:, :4] | ((m[:, 4:] >> 4) << 6),
                (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
            ],
            axis=1,
        )
        q = codes.reshape(n, 4, 2, 32).astype(u8)  # sub-blocks 2c and 2c+1 share bytes: low and high nibble
        qs = _bits(q, np.array([0, 4], dtype=u8).reshape(1, 1, 2, 1), axis=2).reshape(n, 128)
        heads = [d.reshape(n, 1).astype(np.float16).view(u8), dmin.reshape(n, 1).astype(np.float16).view(u8)]
        blocks = np.concatenate([*heads, scales.astype(u8), qs], axis=1)
    else:
        d, level, codes = (t.numpy() for t in _q3_k_parts(x.reshape(-1, 16, 16)))
        n = d.shape[0]
        stored = (level.reshape(n, 16) + 32).astype(u8)
        low = _bits((stored & 15).reshape(n, 2, 8), np.array([0, 4], dtype=u8).reshape(1, 2, 1), axis=1)
        high = _bits((stored >> 4).reshape(n, 4, 4), np.array([0, 2, 4, 6], dtype=u8).reshape(1, 4, 1), axis=1)
        u = (codes.reshape(n, 256) + 4).astype(u8)  # 0..7: two low bits in qs, the third in hmask
        qs = _bits((u & 3).reshape(n, 2, 4, 32), np.array([0, 2, 4, 6], dtype=u8).reshape(1, 1, 4, 1), axis=2)
        hmask = _bits((u >> 2).reshape(n, 8, 32), np.arange(8, dtype=u8).reshape(1, 8, 1), axis=1)
        blocks = np.concatenate(
            [hmask, qs.reshape(n, 64), low, high, d.reshape(n, 1).astype(np.float16).view(u8)], axis=1
        )
    return blocks.reshape(*rows, -1)


class GGUFBlockFakeQuantizer(nn.Module):
    """A weight fake quantizer for torchao's ``FakeQuantizedLinear``/``FakeQuantizedEmbedding`` on a GGUF grid.

    The forward returns the grid values with a straight-through gradient (the identity), the usual QAT
    estimator. It has no parameters or buffers, so the module's state dict keys do not change.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown GGUF block type {kind!r}; choose one of {', '.join(KINDS)}")
        self.kind = kind

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Grid values forward, identity backward."""
        return weight + fake_quantize(weight, self.kind).sub_(weight.detach())

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"kind={self.kind}, block={BLOCKS[self.kind]}"
