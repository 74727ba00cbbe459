"""An offline cache of the teacher's top-k next-token log-probabilities, and a teacher that reads it.

Building (``python -m distill.models.cache_builder``) runs the teacher once over the packed corpus and stores,
per token, the k most likely next tokens and their log-probabilities, in safetensors shards:

    <dir>/manifest.json                      teacher identity, tokenizer hash, data key, k, statistics
    <dir>/tokenizer/                         the teacher's tokenizer (so training needs no teacher files)
    <dir>/{train,val}-00000.safetensors      input_ids [n, T], topk_logprobs [n, T, k] (fp16),
                                             topk_indices [n, T, k] (uint16 when V <= 65536, else int32)

Shards are written atomically and skipped when present, so an interrupted build resumes.

**The missing mass.** The cache keeps ``m = Σ_topk p`` exactly; the remaining ``1 - m`` is spread
uniformly over the other ``V - k`` tokens. The reconstruction ``q`` therefore agrees with the teacher on
the top k, has the right total tail mass, and ``KL(p ‖ q)`` (reported per token in the manifest) is the
KD signal lost. A temperature T is applied to the reconstruction (``q^(1/T)``, renormalised), since the
tail's own shape is not stored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig

from distill.config import ConfigError, config_error
from distill.models.teacher import DataIdentity
from distill.models.tokenizer import load_tokenizer, tokenizer_fingerprint

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def index_dtype(vocab: int) -> torch.dtype:
    """The smallest integer type that holds every token id (uint16 halves the bytes for V ≤ 65536)."""
    return torch.uint16 if vocab <= 65536 else torch.int32


def reconstruct_logprobs(values: Tensor, indices: Tensor, vocab: int) -> Tensor:
    """Dense log-probabilities ``(..., vocab)`` from top-k log-probabilities, the tail spread uniformly."""
    values = values.float()
    top_mass = values.exp().sum(-1, keepdim=True).clamp(max=1.0)
    tail = (1.0 - top_mass).clamp_min(1e-12) / max(vocab - values.shape[-1], 1)
    dense = tail.log().expand(*values.shape[:-1], vocab).clone()
    return dense.scatter_(-1, indices.long(), values)


def reconstruction_kl(full_logprobs: Tensor, k: int) -> Tensor:
    """Per-position KL(teacher ‖ top-k reconstruction) in nats, from the full log-probabilities."""
    values, indices = full_logprobs.float().topk(k, dim=-1)
    q = reconstruct_logprobs(values, indices, full_logprobs.shape[-1])
    p = full_logprobs.float()
    return (p.exp() * (p - q)).sum(-1)


def block_key(ids: Tensor) -> bytes:
    """The lookup key of one packed block: its token ids."""
    return ids.to(torch.int64).cpu().numpy().tobytes()


class CachedTeacher(nn.Module):
    """A :class:`~distill.models.teacher.Teacher` that reads the live teacher's top-k from a cache.

    Batches are matched to cached blocks by their token ids, so the data order does not matter and a
    block that is not in the cache is an error, never a silent mismatch. It has no parameters and
    needs none of the teacher's files.

    Args:
        path: the cache folder written by ``python -m distill.models.cache_builder``.

    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise config_error(
                "teacher.path",
                str(path),
                "no teacher cache here (manifest.json missing); build one with "
                "`python -m distill.models.cache_builder` and point teacher.path at its folder",
            )
        self.manifest: dict[str, Any] = json.loads(manifest_file.read_text())
        if not self.manifest.get("complete"):
            raise config_error(
                "teacher.path",
                str(path),
                "the cache is incomplete (its build was interrupted); rerun the same "
                "`python -m distill.models.cache_builder` command to finish it",
            )
        self.tokenizer = load_tokenizer(str(self.path / "tokenizer"), field="teacher.path")
        if tokenizer_fingerprint(self.tokenizer) != self.manifest["tokenizer"]:
            raise config_error("teacher.path", str(path), "the stored tokenizer does not match the manifest")
        config = dict(self.manifest["teacher_config"])
        self._config = AutoConfig.for_model(config.pop("model_type"), **config)
        self.name = f"cached:{self.manifest['teacher']}"
        self.top_k = int(self.manifest["top_k"])
        self._vocab = int(self.manifest["vocab_size"])
        self._where: dict[bytes, tuple[str, int]] = {}
        self._files: dict[str, Any] = {}
        for split in self.manifest["splits"].values():
            for shard in split["shards"]:
                handle = safe_open(str(self.path / shard), framework="pt")
                self._files[shard] = handle
                for row, ids in enumerate(handle.get_tensor("input_ids")):
                    self._where.setdefault(block_key(ids), (shard, row))

    def train(self, mode: bool = True) -> CachedTeacher:
        """Ignore ``mode``: there is nothing to train."""
        return super().train(False)

    @property
    def config(self) -> Any:
        """The cached teacher's model config (architecture only; no weights)."""
        return self._config

    @property
    def vocab_size(self) -> int:
        """Size of the teacher's output vocabulary."""
        return self._vocab

    @property
    def identity(self) -> dict[str, str]:
        """What identifies this teacher, for manifests and reports."""
        return {"name": self.name, "tokenizer": self.manifest["tokenizer"]}

    def check_data(self, datamodule: DataIdentity) -> None:
        """Refuse a cache built for other data or packing than the run uses (reads the raw data, never tokenises)."""
        data_key, block_size = datamodule.data_key(), datamodule.block_size
        if data_key != self.manifest["data_key"] or block_size != self.manifest["block_size"]:
            raise ConfigError(
                f"teacher.path={str(self.path)!r}: the cache was built for data key {self.manifest['data_key']} "
                f"(block_size {self.manifest['block_size']}) but this run's data is {data_key} "
                f"(block_size {block_size}); rebuild the cache with the same data settings or use the live teacher"
            )

    def _topk(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        values, indices = [], []
        for ids in input_ids:
            where = self._where.get(block_key(ids))
            if where is None:
                raise ConfigError(
                    f"teacher.path={str(self.path)!r}: a batch block is not in the teacher cache; the cache was "
                    "built for other data, tokenizer or block_size; rebuild it for this data"
                )
            shard, row = where
            handle = self._files[shard]
            values.append(handle.get_slice("topk_logprobs")[row : row + 1])
            indices.append(handle.get_slice("topk_indices")[row : row + 1])
        return torch.cat(values).to(input_ids.device), torch.cat(indices).to(input_ids.device)

    @torch.no_grad()
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False
    ) -> Any:
        """Dense reconstructed log-probabilities as ``.logits`` (usable wherever teacher logits are)."""
        if output_hidden_states:
            raise ConfigError(
                "distill.objective.hidden.weight: a cached teacher stores no hidden states; "
                "set distill.objective.hidden.weight=0 or use the live teacher"
            )
        values, indices = self._topk(input_ids)
        return _Output(reconstruct_logprobs(values, indices, self._vocab))

    @torch.no_grad()
    def rows(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        vocab: int | None = None,
    ) -> tuple[Any, None]:
        """Reconstructed log-probabilities for aligned rows ``[start, stop)``, built one chunk at a time."""
        if output_hidden_states:
            self.forward(input_ids, output_hidden_states=True)  # raises the explanatory error
        values, indices = self._topk(input_ids)
        k = values.shape[-1]
        values, indices = values[:, :-1].reshape(-1, k), indices[:, :-1].reshape(-1, k)

        def rows(start: int, stop: int) -> Tensor:
            return reconstruct_logprobs(values[start:stop], indices[start:stop], self._vocab)[:, :vocab]

        return rows, None


class _Output:
    """The part of a transformers CausalLMOutput that callers use."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits
        self.hidden_states = None


def bytes_per_token(k: int, vocab: int) -> float:
    """Storage per cached token: k log-probs (fp16) + k indices + the token id itself."""
    idx = torch.tensor([], dtype=index_dtype(vocab)).element_size()
    return k * (2 + idx) + idx


def describe(manifest: dict[str, Any]) -> str:
    """One line summarising a cache."""
    return (
        f"top_k={manifest['top_k']} tokens={manifest['tokens']} bytes/token={manifest['bytes_per_token']:.1f} "
        f"reconstruction KL={manifest['reconstruction_kl']:.4f} nats/token "
        f"(top-k mass {manifest['mean_topk_mass']:.4f}); {math.ceil(manifest['bytes'] / 2**20)} MiB"
    )
