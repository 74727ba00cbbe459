"""A fake-quantized token embedding on a llama.cpp grid that rounds only the rows a batch looks up.

A llama.cpp block lies within one row (blocks run along the embedding width), so a row's grid values depend on that
row alone: rounding the looked-up rows gives the looked-up rows of the rounded table bit for bit, with the same
straight-through gradient (the identity, scattered to the rows looked up). A training step of the default run looks
up 1,024 of SmolLM2's 49,152 rows, so the embedding's share of the rounding (a fifth of the rounded weights) nearly
vanishes; an output head tied to it still rounds the whole matrix, once per loss (:mod:`distill.objective.chunked`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization.qat.embedding import FakeQuantizedEmbedding

from distill.compress.quant.gguf_grid import GGUFBlockFakeQuantizer


class RowRoundedEmbedding(FakeQuantizedEmbedding):
    """torchao's ``FakeQuantizedEmbedding`` whose llama.cpp grid rounds the looked-up rows, not the table."""

    @classmethod
    def on_grid(cls, module: nn.Embedding, kind: str, name: str | None = None) -> RowRoundedEmbedding:
        """``module`` on ``kind``'s grid, keeping its Parameter (a tied head stays tied), as ``from_embedding`` does."""
        new = cls(
            module.num_embeddings,
            module.embedding_dim,
            module.padding_idx,
            module.max_norm,
            module.norm_type,
            module.scale_grad_by_freq,
            module.sparse,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        if module.weight.device != torch.device("meta"):  # FSDP ranks > 0 hold meta weights until the wrap
            new.weight = module.weight
        new.weight_fake_quantizer = GGUFBlockFakeQuantizer(kind, name)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``fake_quantize(weight)[x]``, computed as ``fake_quantize(weight[x])``."""
        if self.max_norm is not None:  # F.embedding renormalises the looked-up rows in place: torchao's order
            return super().forward(x)
        rows = F.embedding(x, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)
        return self.weight_fake_quantizer(rows)
