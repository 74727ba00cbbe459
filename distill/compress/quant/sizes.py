"""What a quantized student weighs: bytes in memory, stored bits per quantized weight, the weights file."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from distill.compress.quant.schemes import is_quantized
from distill.cost import memory_bytes, tensor_bytes, unique_tensors


def size_report(model: nn.Module, folder: str | Path | None = None) -> dict[str, float]:
    """Measured sizes: bytes in memory (shared tensors once), bits per quantized weight, weights file size.

    ``memory_bytes`` is :func:`distill.cost.memory_bytes`, the figure the report shows.
    ``bits_per_weight`` counts everything a quantized weight stores (int8 codes, scales, zero points)
    over its number of weights; it differs from the nominal grid because torchao's CPU-capable layout
    keeps int4 codes one per byte.
    """
    quant_bytes = quant_numel = fp_bytes = 0
    for t in unique_tensors(model):
        if is_quantized(t):
            quant_bytes += tensor_bytes(t)
            quant_numel += t.numel()
        else:
            fp_bytes += tensor_bytes(t)
    out = {
        "memory_bytes": float(memory_bytes(model)),
        "quantized_weights": float(quant_numel),
        "quantized_bytes": float(quant_bytes),
        "unquantized_bytes": float(fp_bytes),
        "bits_per_weight": 8.0 * quant_bytes / quant_numel if quant_numel else float("nan"),
    }
    if folder is not None:
        out["disk_bytes"] = float((Path(folder) / "model.safetensors").stat().st_size)
    return out
