"""Trained block scales on llama.cpp's 32-blocks (Q8_0, Q4_0, Q4_1, IQ4_NL): the numbers the file stores, learned.

The grid quantizer of :mod:`distill.compress.quant.gguf_grid` derives each block's scale from its weights by a fixed
rule, so training moves only the weights. Here the scale (and Q4_1's minimum) of every block is a Parameter, trained
with the weights by the straight-through estimator of learned step size quantization (LSQ, Esser et al. 2020):
a block's values are ``d · level(clamp((w - m) / d)) + m``, whose gradient reaches ``d`` as ``level - (w - m) / d``
inside the grid's range and as the end level outside it, and reaches ``w`` only inside the range.

Parametrization: ``d = d0 · exp(gain · u)`` and, for Q4_1, ``m = m0 + gain · |d0| · v`` with ``u``, ``v`` starting at
0 and ``d0``, ``m0`` the start (the grid rule's scales of the weights, or the scales llama.cpp's importance-weighted
rounding chose: ``callbacks.qat.init=imatrix``). Adam moves a parameter by about its learning rate per step whatever
its magnitude, so ``gain`` is the scales' learning rate relative to the weights': at ``lr = 1e-4`` and ``gain = 10``
a scale moves by about 0.1 % of itself per step. Weight decay pulls ``u`` and ``v`` to 0, back to the start, not
to a scale of 1. The scale's sign stays ``d0``'s (Q4_0's and IQ4_NL's grids are asymmetric about 0).

A weight on such a grid is no longer a fixed point of the rule that writes the GGUF file from values, so the
convert step packs the trained bytes itself (:meth:`LearnedScaleQuantizer.gguf_bytes`: fp16 ``d``, ``m`` and the codes
the forward used) and the GGUF export writes those bytes, after checking they decode to the student's weights.

Hand-written because torchao's LSQ-style quantizers learn scales for its own integer grids (one scale per group,
``int4``/``int8`` ranges), not llama.cpp's fp16 block scales, Q4_1's minimum or IQ4_NL's non-linear levels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from distill.compress.quant.gguf_grid import BLOCK, iq4_nl_nearest, rule_scales
from distill.compress.quant.llama_quants import check_finite, pack_32

LEARNABLE = ("q8_0", "q4_0", "q4_1", "iq4_nl")
# The range of (w - m) / d each grid stores, in units of the scale; IQ4_NL's are its end levels.
RANGES = {"q8_0": (-127.0, 127.0), "q4_0": (-8.0, 7.0), "q4_1": (0.0, 15.0), "iq4_nl": (-127.0, 113.0)}
# What the file stores for a level: Q4_0 keeps q + 8, the others the level (IQ4_NL: its index).
CODE_OFFSETS = {"q8_0": 0, "q4_0": 8, "q4_1": 0, "iq4_nl": 0}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "iq4_nl": 18}
DEFAULT_GAIN = 10.0


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp16 values as their bit patterns in int32: a buffer no mixed-precision strategy casts (FSDP's bf16 would).

    int32, not int16: gloo and NCCL broadcast int32 (FSDP's ``sync_module_states``) but refuse int16.
    """
    return t.to(torch.float16).view(torch.int16).to(torch.int32).contiguous()


def _from_bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int16).view(torch.float16).to(torch.float32)


def _fp16_ste(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to fp16 forward (exactly: the difference is exact), identity backward."""
    return t + (t.detach().to(torch.float16).to(torch.float32) - t.detach())


class LearnedScaleQuantizer(nn.Module):
    """A weight fake quantizer on a llama.cpp 32-block grid whose block scales (Q4_1: and minima) are Parameters.

    Args:
        weight: the weight it rounds, for the number of blocks and the start (its values are not kept).
        kind: one of :data:`LEARNABLE`.
        name: the weight's name, for errors.
        gain: the scales' learning rate relative to the weights' (see the module's docstring).
        start: the start ``(d0, m0)`` per block, shapes ``(n,)`` (llama.cpp's importance-weighted scales);
            None: the grid's own rule on ``weight``.

    """

    def __init__(
        self,
        weight: torch.Tensor,
        kind: str,
        name: str | None = None,
        gain: float = DEFAULT_GAIN,
        start: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> None:
        super().__init__()
        if kind not in LEARNABLE:
            raise ValueError(f"learned scales take {', '.join(LEARNABLE)}; {name or 'a weight'} is {kind}")
        if weight.shape[-1] % BLOCK:
            raise ValueError(f"{kind} needs rows that are a multiple of {BLOCK} wide; {name} is {tuple(weight.shape)}")
        self.kind, self.name, self.gain = kind, name, float(gain)
        n = weight.numel() // BLOCK
        if weight.is_meta:  # FSDP ranks > 0: the values arrive with rank 0's state when the strategy wraps
            d0 = torch.zeros(n, 1, device="meta")
            low0 = torch.zeros(n, 1, device="meta") if kind == "q4_1" else None
        elif start is not None:
            d0 = start[0].reshape(n, 1).float().to(weight.device)
            low0 = None if start[1] is None else start[1].reshape(n, 1).float().to(weight.device)
        else:
            with torch.no_grad():
                d0, low0 = rule_scales(weight.detach().float().reshape(n, BLOCK), kind)
            # The start is what the file can store: fp16, so that at u = v = 0 the forward is the start's grid.
            d0 = d0.to(torch.float16).to(torch.float32)
            low0 = None if low0 is None else low0.to(torch.float16).to(torch.float32)
        # The start is fp16 (what the file stores), kept as bit patterns: FSDP's bf16 mixed precision casts float
        # buffers in place, which would round it to 8 bits of mantissa for good.
        self.register_buffer("d0", _bits(d0))
        self.log_ratio = nn.Parameter(torch.zeros(d0.shape, device=d0.device))
        if kind == "q4_1":
            self.register_buffer("low0", _bits(low0))
            self.shift = nn.Parameter(torch.zeros(low0.shape, device=low0.device))

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fp16-valued scale and minimum (None but for Q4_1) per block, (n, 1), with their gradients."""
        # In fp32 whatever a strategy casts Parameters to: the file's fp16 scale must come from the fp32 master.
        d0 = _from_bits(self.d0)
        d = _fp16_ste(d0 * torch.exp(self.gain * self.log_ratio.float()))
        if not bool(torch.isfinite(d).all()):
            raise FloatingPointError(
                f"{self.name}: a trained {self.kind} block scale overflowed (gain {self.gain:g}); "
                "lower callbacks.qat.scale_gain or the learning rate"
            )
        if self.kind != "q4_1":
            return d, None
        return d, _fp16_ste(_from_bits(self.low0) + self.gain * d0.abs() * self.shift.float())

    def _levels(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored code and the level of each ``y`` (already clamped to the grid's range)."""
        if self.kind == "iq4_nl":
            return iq4_nl_nearest(y)
        level = torch.floor(y + 0.5)
        return (level + CODE_OFFSETS[self.kind]).to(torch.int64), level

    def _scaled(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        blocks = weight.float().reshape(-1, BLOCK)
        d, low = self.scales()
        shifted = blocks if low is None else blocks - low
        # A block whose scale is 0 (all equal weights at the start) keeps it: d0 · exp(u) stays 0, and its values and
        # weights get no gradient. Dividing by 1 there keeps the arithmetic finite.
        y = shifted / torch.where(d == 0, torch.ones_like(d), d)
        if not bool(torch.isfinite(y).all()):  # refuse a weight holding inf or NaN by name, as the rule's grids do
            check_finite(weight.detach().float().cpu().numpy(), self.name)
        return y.clamp(*RANGES[self.kind]), d, low

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Grid values forward; LSQ's straight-through gradients to the weight, the scales and the minima."""
        y, d, low = self._scaled(weight)
        _, level = self._levels(y.detach())
        out = d * (y + (level - y).detach())
        if low is not None:
            out = out + low
        return out.reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def parts(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """fp16 ``d`` (n,), ``m`` (n,) or None, stored codes (n, 32) and the exact grid values (``weight``'s shape).

        The values are the file's: ``d · level (+ m)`` in fp32, as gguf-py and llama.cpp decode them.
        """
        y, d, low = self._scaled(weight)
        codes, level = self._levels(y)
        values = d * level
        if low is not None:
            values = values + low
        flat = None if low is None else low.reshape(-1)
        return d.reshape(-1), flat, codes, values.reshape(weight.shape)

    def gguf_bytes(self, weight: torch.Tensor) -> np.ndarray:
        """The ggml blocks of ``weight`` on this grid, ``(*rows, row bytes)``: what the GGUF file stores."""
        d, low, codes, _ = self.parts(weight)
        bits = 8 if self.kind == "q8_0" else 4
        raw = pack_32(d.cpu().numpy(), None if low is None else low.cpu().numpy(), codes.cpu().numpy(), bits)
        return raw.reshape(*weight.shape[:-1], -1)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"kind={self.kind}, block={BLOCK}, learned scales, gain={self.gain}"


def stored_scales(raw: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fp16 ``d`` and (Q4_1) ``m`` per block, as fp32 tensors (n,), of ggml blocks ``raw`` of a 32-block type."""
    blocks = np.ascontiguousarray(raw).reshape(-1, BLOCK_BYTES[kind])
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1))
    if kind != "q4_1":
        return d, None
    return d, torch.from_numpy(blocks[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(-1))
