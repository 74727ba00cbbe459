"""Fake quantization on llama.cpp's block grids (Q8_0, Q4_0, Q4_1), so a QAT student exports to GGUF as trained.

llama.cpp stores these types in blocks of 32 weights along a row (a Linear's in-features, an embedding's
vector), each block with an fp16 scale, and for Q4_1 an fp16 minimum:

- Q8_0: ``d = max|x| / 127``, codes ``roundf(x / d)`` in [-127, 127];
- Q4_0: ``d = m / -8`` where ``m`` is the block's value of largest magnitude (sign kept), codes
  ``trunc(x / d + 8.5)`` clipped to [0, 15], value ``(q - 8) · d``;
- Q4_1: ``d = (max - min) / 15``, codes ``trunc((x - min) / d + 0.5)`` clipped to [0, 15], value ``q · d + min``.

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

import torch
from torch import nn

BLOCK = 32  # every type here quantizes blocks of 32 weights along the last dim
KINDS = ("q8_0", "q4_0", "q4_1")


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf`` (half away from zero), written as gguf-py's ``np_roundf`` computes it."""
    a = x.abs()
    whole = torch.floor(a)
    return torch.sign(x) * (whole + torch.floor(2 * (a - whole)))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def fake_quantize(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """``weight`` rounded to ``kind``'s grid (blocks of 32 along the last dim), as the GGUF file stores it.

    Computed in fp32 and returned in ``weight``'s dtype; no gradient flows through it (see
    :class:`GGUFBlockFakeQuantizer` for the straight-through version).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown GGUF block type {kind!r}; choose one of {', '.join(KINDS)}")
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"{kind} needs rows that are a multiple of {BLOCK} wide; got shape {tuple(weight.shape)}")
    with torch.no_grad():
        blocks = weight.detach().to(torch.float32).reshape(-1, BLOCK)
        if kind == "q8_0":
            d = blocks.abs().amax(dim=-1, keepdim=True) / 127
            values = _roundf(blocks * _inverse(d)) * _fp16(d)
        elif kind == "q4_0":
            index = blocks.abs().argmax(dim=-1, keepdim=True)  # the first of equal magnitudes, as numpy's argmax
            d = torch.gather(blocks, -1, index) / -8
            codes = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15)
            values = _fp16(d) * (codes - 8)
        else:  # q4_1
            low = blocks.amin(dim=-1, keepdim=True)
            d = (blocks.amax(dim=-1, keepdim=True) - low) / 15
            codes = torch.trunc((blocks - low) * _inverse(d) + 0.5).clamp(0, 15)
            values = _fp16(d) * codes + _fp16(low)
    return values.reshape(weight.shape).to(weight.dtype)


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
        return weight + (fake_quantize(weight, self.kind) - weight).detach()

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"kind={self.kind}, block={BLOCK}"
