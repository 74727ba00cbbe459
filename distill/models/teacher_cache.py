"""An offline cache of the teacher's top-k next-token log-probabilities, and a teacher that reads it.

Building (``python -m distill.models.cache_builder``) runs the teacher once over the packed corpus and stores,
per token, the k most likely next tokens and their log-probabilities, in safetensors shards:

    <dir>/manifest.json                      format version, teacher identity (with a hash of its weights and
                                             the config node it was built from), tokenizer hash, data key, k,
                                             temperatures, statistics
    <dir>/tokenizer/                         the teacher's tokenizer (so training needs no teacher files)
    <dir>/{train,val,test}-00000.safetensors input_ids [n, T], topk_logprobs [n, T, k] (fp16, at T = 1),
                                             topk_indices [n, T, k] (uint16 when V <= 65536, else int32),
                                             shift, tail_logmass [n, T, len(temperatures)] (fp32)

Shards and the manifest are written atomically and shards are skipped when present, so an interrupted build
resumes. The held-out splits are stored as the datamodule packs them: a last block padded with its own final
token is looked up by all of its ids like any other (the report's scores ignore the padded positions).

**Temperature and the missing mass.** At temperature τ the teacher's top-k log-probabilities are
``log p_1 / τ + shift_τ`` (``shift_τ = -logsumexp(log p_1 / τ)`` over the *full* vocabulary), and the mass
outside the top k is ``exp(tail_logmass_τ)``: both measured at build time for each temperature in the
manifest. Training from the cache computes KD over k + 1 buckets, the teacher's top k and one lumped tail,
both distributions tempered consistently (:mod:`distill.objective.buckets`): nothing is assumed about the
tail's shape. Tempering a top-k reconstruction instead (``q^(1/τ)`` with a uniform tail) would hand most of the
tempered mass to the V - k tail tokens: at τ = 2, k = 64 and V = 49,152 the tail held over 90 % of it.
By the chain rule of KL, the bucket KL is the full KL minus ``tail mass × KL between the two tails'
conditional distributions``, so it never exceeds the full KL and equals it when the tail is empty.

The dense reconstruction (:func:`reconstruct_logprobs`: the top k exact, the tail spread uniformly) is what
the cached teacher returns as ``.logits`` for evaluation at τ = 1; ``KL(p ‖ q)`` of that reconstruction is
reported per token in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import OmegaConf
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig

from distill.config import ConfigError, build, config_error
from distill.fingerprint import weights_hash
from distill.models.teacher import DataIdentity, FrozenTeacher
from distill.models.tokenizer import load_tokenizer, tokenizer_fingerprint
from distill.objective.buckets import TopKBuckets
from distill.runtime.rank_zero_load import has_meta_tensors

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: per-temperature shift and tail mass, blocks looked up by hash, weights hash
DEFAULT_TEMPERATURES = (1.0, 2.0)  # 2.0: conf/distill/default.yaml's temperature


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
    """The lookup key of one packed block: a 128-bit hash of its token ids (16 bytes per block in RAM).

    A hit is confirmed against the ids stored in the shard, so a collision could never serve another
    block's targets.
    """
    return hashlib.blake2b(ids.to(torch.int64).cpu().numpy().tobytes(), digest_size=16).digest()


class CachedTeacher(nn.Module):
    """A :class:`~distill.models.teacher.Teacher` that reads the live teacher's top-k from a cache.

    Batches are matched to cached blocks by their token ids, so the data order does not matter and a
    block that is not in the cache is an error, never a silent mismatch. It has no parameters and
    needs none of the teacher's files.

    Args:
        path: the cache folder written by ``python -m distill.models.cache_builder``.

    """

    cached = True  # it reads targets from disk, for the corpus's blocks only (Teacher.cached)

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
        if self.manifest.get("version") != FORMAT_VERSION:
            raise config_error(
                "teacher.path",
                str(path),
                f"the cache has format version {self.manifest.get('version')}, this distill reads version "
                f"{FORMAT_VERSION}; rebuild it with `python -m distill.models.cache_builder`",
            )
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
        self.temperatures = [float(t) for t in self.manifest["temperatures"]]
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

    @property
    def report_note(self) -> str:
        """What a report must say of its teacher column when the teacher is this cache (``assess`` adds it).

        The held-out pass scores :meth:`forward`'s dense reconstruction, so the teacher's perplexity and every
        KL to the teacher are those of the top k plus a uniform tail, not of the teacher: a label whose
        next-token probability lies in the tail gets the tail's average. Only the top-1 is exact.
        """
        m = self.manifest
        return (
            f"teacher (top-{self.top_k} cache): teacher=cached, so the teacher's held-out perplexity and the "
            f"student's KL to the teacher are measured against a reconstruction of the teacher, its top-{self.top_k} "
            "log-probabilities with the rest of the mass spread uniformly over the other tokens, not against the "
            f"teacher itself (reconstruction KL {m['reconstruction_kl']:.4f} nats/token, top-k mass "
            f"{m['mean_topk_mass']:.4f}, measured when the cache was built); top-1 agreement and the teacher's "
            "accuracy are exact"
        )

    def check_data(self, datamodule: DataIdentity) -> None:
        """Refuse a cache built for other data or packing than the run uses (reads the raw data, never tokenises).

        A cache without the whole test split still trains (the end-of-run report needs it), so that is a warning.
        """
        data_key, block_size = datamodule.data_key(), datamodule.block_size
        if data_key != self.manifest["data_key"] or block_size != self.manifest["block_size"]:
            raise ConfigError(
                f"teacher.path={str(self.path)!r}: the cache was built for data key {self.manifest['data_key']} "
                f"(block_size {self.manifest['block_size']}) but this run's data is {data_key} "
                f"(block_size {block_size}); rebuild the cache with the same data settings or use the live teacher"
            )
        layout = self.manifest.get("layout") or {}
        if "test" not in self.manifest["splits"] or layout.get("max_blocks") is not None:
            rank_zero_warn(
                f"the teacher cache {self.path} holds {self._held()}: the end-of-run report scores every test block "
                "against the teacher and will stop at the first one missing; rebuild it with "
                "cache.splits=[train,val,test] and cache.max_blocks=null (the splits already built are kept), "
                "or set eval.enabled=false"
            )

    def _held(self) -> str:
        """Which splits the cache holds, and how many blocks of each, in words."""
        return ", ".join(f"{k} ({v['blocks']} blocks)" for k, v in self.manifest["splits"].items()) or "no split"

    def source_teacher(self) -> FrozenTeacher:
        """The live teacher this cache was built from, loaded again from the config node its manifest records.

        ``student=from_teacher`` copies its layers (and may measure them on calibration text) and then lets it go:
        training still reads the cache. The loaded weights must hash to the manifest's, so a model file changed
        since the build is refused rather than copied into a student trained on the old teacher's targets.

        Raises:
            ConfigError: the cache records no source (built before it was recorded), the source cannot be loaded
                or is not a live teacher, or its weights are not the ones the cache was built from.

        """
        node, where = self.manifest.get("teacher_source"), str(self.path)
        if node is None:
            raise config_error(
                "teacher.path",
                where,
                "the cache does not record the teacher it was built from, whose weights this student copies; "
                "rebuild it with `python -m distill.models.cache_builder` (it records them), or use student=tiny "
                "or student=pretrained",
            )
        try:
            teacher = build(OmegaConf.create(node), field="teacher")
        except ConfigError as err:
            raise config_error(
                "teacher.path", where, f"the teacher the cache was built from cannot be loaded again ({err})"
            ) from None
        if not isinstance(teacher, FrozenTeacher):
            raise config_error("teacher.path", where, f"the recorded {node['_target_']} is not a live teacher")
        # Built without weights (an FSDP rank other than 0, filled from rank 0 later): nothing to compare yet.
        if not has_meta_tensors(teacher.model) and weights_hash(teacher.model) != self.manifest["weights"]:
            raise config_error(
                "teacher.path",
                where,
                f"the teacher it was built from ({node.get('path') or node.get('package') or node['_target_']}) "
                "now has other weights than the cache holds the targets of; rebuild the cache from it",
            )
        return teacher

    def _find(self, ids: Tensor) -> tuple[Any, int] | None:
        """The shard handle and row holding the block ``ids``, confirmed against the stored ids; None if absent."""
        where = self._where.get(block_key(ids))
        if where is None:
            return None
        handle = self._files[where[0]]
        stored = handle.get_slice("input_ids")[where[1] : where[1] + 1][0].long()
        return (handle, where[1]) if torch.equal(stored, ids.long().cpu()) else None

    def holds(self, input_ids: Tensor) -> bool:
        """Whether every block of the batch is in the cache (a held-out set of other text is not)."""
        return all(self._find(ids) is not None for ids in input_ids)

    def _read(self, input_ids: Tensor, names: tuple[str, ...]) -> list[Tensor]:
        """The stored tensors ``names`` of each block in the batch, in batch order."""
        out: list[list[Tensor]] = [[] for _ in names]
        for ids in input_ids:
            found = self._find(ids)
            if found is None:
                raise ConfigError(
                    f"teacher.path={str(self.path)!r}: a batch block is not in the teacher cache (it holds "
                    f"{self._held()}); the cache was built for other data, tokenizer or block_size, or without "
                    "this split; rebuild it for this data with cache.splits=[train,val,test] and cache.max_blocks=null"
                )
            handle, row = found
            for got, name in zip(out, names, strict=True):
                got.append(handle.get_slice(name)[row : row + 1])
        return [torch.cat(t).to(input_ids.device) for t in out]

    def _topk(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        values, indices = self._read(input_ids, ("topk_logprobs", "topk_indices"))
        return values, indices

    def targets(self, input_ids: Tensor, temperature: float, vocab: int | None = None) -> TopKBuckets:
        """The teacher's top-k and tail buckets at ``temperature``, for every position of the batch.

        Raises:
            ConfigError: a temperature the cache was not built for, or a vocabulary that cuts the top k.

        """
        column = next((i for i, t in enumerate(self.temperatures) if math.isclose(t, temperature)), None)
        if column is None:
            raise config_error(
                "distill.objective.temperature",
                temperature,
                f"the teacher cache holds the temperatures {self.temperatures}; use one of them or rebuild the "
                f"cache with cache.temperatures=[...,{temperature}]",
            )
        if vocab is not None and vocab < self._vocab:
            raise ConfigError(
                f"teacher.path={str(self.path)!r}: the student's vocabulary ({vocab}) is smaller than the cached "
                f"teacher's ({self._vocab}), whose top-k ids may lie beyond it; use the live teacher"
            )
        values, indices, shift, tail = self._read(input_ids, ("topk_logprobs", "topk_indices", "shift", "tail_logmass"))
        top = values.float() / temperature + shift[..., column : column + 1]
        return TopKBuckets(torch.cat([top, tail[..., column : column + 1]], -1), indices.long())

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
        temperature: float | None = None,
    ) -> tuple[Any, None]:
        """Targets for aligned rows ``[start, stop)``, one chunk at a time (the chunked loss's teacher rows).

        With ``temperature`` (training): the top-k and tail buckets at it (:meth:`targets`); without: the
        dense reconstruction at τ = 1.
        """
        if output_hidden_states:
            self.forward(input_ids, output_hidden_states=True)  # raises the explanatory error
        if temperature is not None:
            buckets = self.targets(input_ids, temperature, vocab)[:, :-1]
            flat = TopKBuckets(
                buckets.logprobs.reshape(-1, buckets.logprobs.shape[-1]),
                buckets.indices.reshape(-1, buckets.indices.shape[-1]),
            )
            return (lambda start, stop: flat[start:stop]), None
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


def bytes_per_token(k: int, vocab: int, temperatures: int = len(DEFAULT_TEMPERATURES)) -> float:
    """Storage per cached token: k log-probs (fp16) + k indices + the token id + shift and tail mass (fp32) per τ."""
    idx = torch.tensor([], dtype=index_dtype(vocab)).element_size()
    return k * (2 + idx) + idx + 8 * temperatures


def describe(manifest: dict[str, Any]) -> str:
    """One line summarising a cache."""
    return (
        f"top_k={manifest['top_k']} tokens={manifest['tokens']} bytes/token={manifest['bytes_per_token']:.1f} "
        f"reconstruction KL={manifest['reconstruction_kl']:.4f} nats/token "
        f"(top-k mass {manifest['mean_topk_mass']:.4f}); {math.ceil(manifest['bytes'] / 2**20)} MiB"
    )
