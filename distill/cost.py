"""What a model costs: parameters (shared tensors once), bytes in memory and on disk, bits per weight, speed."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers, each storage counted once (tied and shared tensors appear once)."""
    seen, out = set(), []
    for t in [*model.parameters(), *model.buffers()]:
        # Wrapper tensor subclasses (torchao quantized weights) have no storage of their own: key them by object.
        plain = type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta"
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape)) if plain else id(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def parameter_count(model: nn.Module) -> int:
    """Parameters with each shared tensor counted once (ALBERT-style sharing and tied embeddings).

    A DeepSpeed ZeRO-3 placeholder counts as the whole parameter it stands for (``ds_numel``).
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel())
    return total


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each storage once (see :func:`tensor_bytes`).

    This is the one memory figure: the report's ``bytes_memory`` and ``quantization.json``'s ``memory_bytes``
    both come from here.
    """
    return sum(tensor_bytes(t) for t in unique_tensors(model))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes one tensor holds; a wrapper subclass (torchao quantized weights) counts its inner tensors.

    Such subclasses expose their packed storage (codes, scales, zero points) through ``__tensor_flatten__``.
    """
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


# What holds weights in an export folder; the rest (config, tokenizer, loader code) is counted in the
# folder's size but not in its bits per weight.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def disk_bytes(folder: str | Path | None) -> int | None:
    """Total size of the files in an export folder, or of a single-file export (a GGUF); None when there is none."""
    if folder is not None and Path(folder).is_file():
        return Path(folder).stat().st_size
    if folder is None or not Path(folder).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def weight_file_bytes(folder: str | Path | None) -> int | None:
    """Size of the weight files alone in an export folder, or of a single-file export; None when there is none."""
    if folder is not None and Path(folder).is_file():
        return Path(folder).stat().st_size if Path(folder).suffix in WEIGHT_SUFFIXES else None
    if folder is None or not Path(folder).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES) or None


@torch.no_grad()
def generation_tokens_per_s(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32, runs: int = 3) -> float:
    """Median greedy-generation speed (new tokens per second) over ``runs`` runs, after one warm-up."""
    model.eval()
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        if i:  # the first run warms caches and kernels
            times.append(time.perf_counter() - start)
    return input_ids.shape[0] * new_tokens / statistics.median(times)


def cost_metrics(
    model: nn.Module,
    export_dir: str | Path | None = None,
    probe: torch.Tensor | None = None,
    new_tokens: int = 32,
    runs: int = 3,
) -> dict[str, Any]:
    """Parameters, bytes in memory and on disk, bits per weight in memory and as stored, generation tokens/s.

    ``bytes_disk`` is the whole export folder (weights, config, tokenizer); ``bits_per_weight_disk`` counts
    only its weight files over the parameters, i.e. what the weights actually cost as stored (codes, scales
    and zero points of quantized weights included).
    """
    params = parameter_count(model)
    mem = memory_bytes(model)
    weights = weight_file_bytes(export_dir)
    out: dict[str, Any] = {
        "params": params,
        "bytes_memory": mem,
        "bytes_disk": disk_bytes(export_dir),
        "bits_per_weight": 8 * mem / max(params, 1),
        "bits_per_weight_disk": None if weights is None else 8 * weights / max(params, 1),
    }
    if probe is not None:
        out["tokens_per_s"] = generation_tokens_per_s(model, probe, new_tokens, runs)
    return out
