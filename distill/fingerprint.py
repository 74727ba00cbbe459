"""Fingerprints of a model's weights and of a tokenizer, for every cache keyed by them (top-k teacher, data, tasks).

It hashes the exact bytes, not summaries: a sum depends on the reduction order (thread count, device), so two
runs of one model could miss each other's cache, while bytes change with any edit and with nothing else.
It sits on the bottom floor of the library (torch and json only), so the data, model and eval layers can all use it.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


def weights_hash(model: nn.Module) -> str:
    """A hash of a model's parameters and buffers: names, dtypes, shapes and bytes (16 hex digits).

    Two teachers with one name but different weights (a fine-tune saved over the original), or one model in
    two dtypes, get different hashes; the same weights get the same hash on any device and thread count.
    Tensors are copied to the CPU one at a time, so a model on a GPU is never held twice in host memory.

    Raises:
        TypeError: a tensor whose bytes are not its values (a tensor subclass: sharded, quantized).
        NotImplementedError: a tensor without data (on the meta device).

    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if type(tensor) is not torch.Tensor:  # a DTensor's bytes would be this rank's shard only
            raise TypeError(f"{name}: a {type(tensor).__name__} has no plain bytes to hash")
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the tokenizer does (vocabulary, merges, normaliser, special tokens), not its name."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = json.loads(backend.to_str())
        payload.pop("truncation", None)  # runtime settings, not identity
        payload.pop("padding", None)
        text = json.dumps(payload, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
