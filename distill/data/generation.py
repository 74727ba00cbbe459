"""Generated training sequences: on-policy (GKD) and sequence-level distillation.

A share of each training batch is replaced by text a model wrote:

* ``student_fraction`` (GKD's λ, Agarwal et al. 2024): the student samples a continuation of a prompt, on the
  fly, with its current weights. The teacher then scores the student's own text, which is what the student will
  meet when it generates; the hard-label CE never counts the student's tokens (it would reinforce its own
  samples), the KD term does.
* ``teacher_fraction`` (sequence-level KD, Kim & Rush 2016): the teacher samples the continuation. CE on it is
  the sequence-level objective, and KD applies as on the corpus. These continuations do not depend on the
  student, so with ``teacher_cache`` each prompt is continued once, and the continuations are kept with ``datasets``
  (published at every checkpoint) for the rest of the run and for later runs with the same settings.

Prompts are the first ``block_size - max_new_tokens`` tokens of the batch's own corpus rows, or prompts drawn
from a user file. Generation is batched, uses the KV cache, runs in eval mode without gradients, and is seeded
from (seed, step, micro-batch, rank), so a resumed run regenerates exactly the sequences the uninterrupted run
drew. The rows chosen each micro-batch are counted by stochastic rounding: on average exactly the fractions.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from distill.config import config_error
from distill.fingerprint import weights_hash
from distill.objective.divergences import IGNORE_INDEX
from distill.runtime.files import atomic_directory
from distill.runtime.sampling import sampling as sampling_forwards


@dataclass
class Sampling:
    """How continuations are sampled."""

    max_new_tokens: int
    temperature: float
    top_p: float


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers: the same parts give the same seed on every machine and process."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def sample_continuations(
    model: nn.Module, prompts: list[Tensor], sampling: Sampling, pad_id: int, seed: int
) -> list[Tensor]:
    """Sample one continuation per prompt in one batched ``generate`` call (KV cache on, no gradients).

    Prompts of different lengths are left-padded. A continuation ends after the first EOS the model emits
    (``generate`` pads the rest of its row); the EOS itself is kept.
    """
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p.to(device)
        mask[i, width - len(p) :] = 1
    options: dict[str, Any] = {"do_sample": False}
    if sampling.temperature > 0:
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    was_training = model.training
    model.eval()  # no dropout while sampling; gradient checkpointing would also switch the KV cache off in train
    try:
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            sampling_forwards(),
            clean_generation(model),
            weights_quantized_once(model),
        ):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=sampling.max_new_tokens,
                min_new_tokens=0,
                pad_token_id=pad_id,
                use_cache=True,
                **options,
            )
    finally:
        model.train(was_training)
    eos = _eos_ids(model)
    conts = []
    for row in out[:, width:]:
        ends = [i for i, t in enumerate(row.tolist()) if t in eos]
        conts.append(row[: ends[0] + 1] if ends else row)
    return [c.cpu() for c in conts]


@contextmanager
def clean_generation(model: nn.Module) -> Iterator[None]:
    """Sample with only the settings given here: the model's own generation config is set aside meanwhile.

    ``generate`` fills every setting not passed from ``model.generation_config``, so a checkpoint's
    ``repetition_penalty``, ``min_p``, ``no_repeat_ngram_size``, ``suppress_tokens``... would change the
    distribution the student is trained on. Only the special-token ids are kept.
    """
    own = getattr(model, "generation_config", None)
    if own is None:
        yield
        return
    keep = {
        k: getattr(own, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    }
    model.generation_config = GenerationConfig(**{k: v for k, v in keep.items() if v is not None})
    try:
        yield
    finally:
        model.generation_config = own


@contextmanager
def weights_quantized_once(model: nn.Module) -> Iterator[None]:
    """Fake-quantize each QAT weight once for the whole ``generate`` call, not once per decoded token.

    A QAT student (torchao's ``FakeQuantizedLinear``/``Embedding``, the GGUF grids) rounds its whole weight in every
    forward. Training runs one forward per step, but sampling runs one per new token, and re-rounding 135M
    weights for each of 64 tokens cost ~2 minutes per step on a CPU. The weights cannot change inside the call
    (no gradients), so the first result is exact for the rest.
    """
    patched = []
    for module in model.modules():
        fq = getattr(module, "weight_fake_quantizer", None)
        if isinstance(fq, nn.Module) and "forward" not in vars(fq):
            cache: dict[int, Tensor] = {}

            def once(weight: Tensor, _fq: nn.Module = fq, _cache: dict[int, Tensor] = cache) -> Tensor:
                # Only a Parameter is the same tensor from token to token. A quantizer handed other tensors (the
                # rows a row-rounded embedding looks up, row_embedding.py) gets new ones, whose ids may repeat.
                if not isinstance(weight, nn.Parameter):
                    return type(_fq).forward(_fq, weight)
                key = id(weight)
                if key not in _cache:
                    _cache[key] = type(_fq).forward(_fq, weight)
                return _cache[key]

            fq.forward = once
            patched.append(fq)
    try:
        yield
    finally:
        for fq in patched:
            del fq.forward


def _eos_ids(model: nn.Module) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


def load_prompts(path: str, tokenizer: PreTrainedTokenizerBase) -> list[Tensor]:
    """A prompt file's prompts as token ids: a .txt file (one prompt per line) or .jsonl/.json (a ``prompt`` field)."""
    file = Path(path)
    if not file.is_file():
        raise config_error("distill.generation.prompts", path, "no such file; give a .txt or .jsonl prompt file")
    kind = {".txt": "text", ".jsonl": "json", ".json": "json"}.get(file.suffix)
    if kind is None:
        raise config_error("distill.generation.prompts", path, "use a .txt (one per line) or .jsonl file")
    rows = datasets.load_dataset(kind, data_files=str(file), split="train")
    field = "text" if kind == "text" else "prompt"
    if field not in rows.column_names:
        fix = f"each JSON line needs a 'prompt' field; the file has {rows.column_names}"
        raise config_error("distill.generation.prompts", path, fix)
    texts = [t for t in rows[field] if t and t.strip()]
    if not texts:
        raise config_error("distill.generation.prompts", path, "the file holds no prompt")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [torch.tensor(x, dtype=torch.long) for x in ids if x]


class Generation:
    """Replaces a share of each training batch with generated sequences (see the module docstring).

    Args:
        student_fraction: GKD's λ, the share of rows whose continuation the student samples.
        teacher_fraction: the share of rows whose continuation the teacher samples (sequence-level KD).
        max_new_tokens: tokens sampled per continuation; below ``data.block_size``.
        temperature: sampling temperature; 0 = greedy.
        top_p: nucleus sampling threshold in (0, 1].
        prompts: a prompt file (.txt or .jsonl); null = the batch rows' own corpus prefixes.
        teacher_cache: a folder where the teacher's continuations of every prompt are generated once and kept
            (``datasets``); null = the teacher samples on the fly.
        seed: the run's seed.

    """

    def __init__(
        self,
        student_fraction: float = 0.0,
        teacher_fraction: float = 0.0,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        prompts: str | None = None,
        teacher_cache: str | None = None,
        seed: int = 0,
    ) -> None:
        for name, value in (("student_fraction", student_fraction), ("teacher_fraction", teacher_fraction)):
            if not 0.0 <= value <= 1.0:
                raise config_error(f"distill.generation.{name}", value, "must lie in [0, 1]")
        if student_fraction + teacher_fraction > 1.0:
            raise config_error(
                "distill.generation.teacher_fraction",
                teacher_fraction,
                f"student_fraction + teacher_fraction = {student_fraction + teacher_fraction} > 1; lower one",
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise config_error("distill.generation.max_new_tokens", max_new_tokens, "must be a positive integer")
        if temperature < 0:
            raise config_error("distill.generation.temperature", temperature, "must be >= 0 (0 = greedy)")
        if not 0.0 < top_p <= 1.0:
            raise config_error("distill.generation.top_p", top_p, "must lie in (0, 1]")
        self.student_fraction, self.teacher_fraction = float(student_fraction), float(teacher_fraction)
        self.sampling = Sampling(max_new_tokens, float(temperature), float(top_p))
        self.prompt_file, self.teacher_cache, self.seed = prompts, teacher_cache, int(seed)
        self.prompts: list[Tensor] | None = None
        # teacher_cache: the teacher's continuation of each prompt key, those not yet published, and where
        self.cached: dict[int, Tensor] | None = None
        self.fresh: dict[int, Tensor] = {}
        self.folder: Path | None = None

    @property
    def enabled(self) -> bool:
        """Whether any row is ever generated."""
        return self.student_fraction > 0 or self.teacher_fraction > 0

    def settings(self) -> dict[str, Any]:
        """The settings that decide the sequences (for the teacher cache's key and the report)."""
        return {
            "student_fraction": self.student_fraction,
            "teacher_fraction": self.teacher_fraction,
            "prompts": self.prompt_file,
            "seed": self.seed,
            **vars(self.sampling),
        }

    def check(self, block_size: int, tokenizer: PreTrainedTokenizerBase) -> None:
        """Refuse settings that cannot fit the data's rows; load the prompt file."""
        if self.sampling.max_new_tokens >= block_size:
            raise config_error(
                "distill.generation.max_new_tokens",
                self.sampling.max_new_tokens,
                f"must be below data.block_size={block_size}: the prompt is the rest of the row",
            )
        if self.prompt_file:
            self.prompts = load_prompts(self.prompt_file, tokenizer)

    def counts(self, batch_size: int, step: int, micro: int, rank: int) -> tuple[int, int]:
        """(student rows, teacher rows) of this micro-batch: the fractions of ``batch_size``, stochastically rounded."""
        g = torch.Generator().manual_seed(_seed(self.seed, step, micro, rank, 0))
        u_s, u_t = torch.rand(2, generator=g).tolist()
        n_s = math.floor(self.student_fraction * batch_size + u_s)
        n_t = math.floor(self.teacher_fraction * batch_size + u_t)
        return n_s, min(n_t, batch_size - n_s)

    def _prompt_of(self, row: Tensor, index: int, g: torch.Generator) -> tuple[Tensor, int]:
        """The prompt for one batch row and its key (a prompt-file index, or the row's training-set index)."""
        if self.prompts is None:
            return row[: len(row) - self.sampling.max_new_tokens], index
        pick = int(torch.randint(len(self.prompts), (1,), generator=g))
        return self.prompts[pick][-(len(row) - self.sampling.max_new_tokens) :], pick

    def apply(
        self, batch: dict[str, Tensor], student: nn.Module, teacher: Any, step: int, micro: int, rank: int, pad_id: int
    ) -> tuple[dict[str, Tensor], int]:
        """The batch with its first rows replaced by generated sequences; returns it and the generated token count.

        ``batch["labels"]`` (the CE targets) ignores the student's generated tokens; ``batch["kd_labels"]`` marks
        every real token, which the KD term uses. Rows that end early (an EOS) are right-padded, masked out.
        """
        ids = batch["input_ids"]
        n_s, n_t = self.counts(ids.shape[0], step, micro, rank)
        if n_s + n_t == 0:
            return batch, 0
        g = torch.Generator().manual_seed(_seed(self.seed, step, micro, rank, 1))
        if self.cached is not None and self.prompts is None and "index" not in batch:
            raise RuntimeError("teacher_cache keys corpus prompts by training row, but the batch has no 'index'")
        index = batch.get("index", torch.full((ids.shape[0],), -1)).tolist()
        prompts = [self._prompt_of(ids[i].cpu(), index[i], g) for i in range(n_s + n_t)]
        seed = _seed(self.seed, step, micro, rank, 2)
        conts: list[Tensor] = []
        if n_s:
            conts += sample_continuations(student, [p for p, _ in prompts[:n_s]], self.sampling, pad_id, seed)
        if n_t:
            conts += self._teacher_continuations(teacher, prompts[n_s:], pad_id, seed + 1)
        return self._assemble(batch, prompts, conts, n_s, pad_id)

    def _teacher_continuations(
        self, teacher: Any, prompts: list[tuple[Tensor, int]], pad_id: int, seed: int
    ) -> list[Tensor]:
        if self.cached is None:
            return sample_continuations(teacher.model, [p for p, _ in prompts], self.sampling, pad_id, seed)
        missing = [(p, key) for p, key in prompts if key not in self.cached]
        if missing:  # generated once: kept in memory now, published at the next flush
            new = sample_continuations(teacher.model, [p for p, _ in missing], self.sampling, pad_id, seed)
            for (_, key), cont in zip(missing, new, strict=True):
                self.cached[key] = self.fresh[key] = cont
        return [self.cached[key] for _, key in prompts]

    def _assemble(
        self, batch: dict[str, Tensor], prompts: list[tuple[Tensor, int]], conts: list[Tensor], n_s: int, pad_id: int
    ) -> tuple[dict[str, Tensor], int]:
        ids, width = batch["input_ids"].clone(), batch["input_ids"].shape[1]
        mask = batch.get("attention_mask", torch.ones_like(ids)).clone()
        labels = batch["labels"].clone()
        kd_labels = batch.get("kd_labels", labels).clone()
        generated = 0
        for i, ((prompt, _), cont) in enumerate(zip(prompts, conts, strict=True)):
            row = torch.cat([prompt, cont])[:width].to(ids.device)
            real, start = len(row), len(prompt)
            ids[i] = pad_id
            ids[i, :real] = row
            mask[i] = 0
            mask[i, :real] = 1
            kd_labels[i] = IGNORE_INDEX
            kd_labels[i, :real] = row
            labels[i] = kd_labels[i]
            if i < n_s:  # the student's own tokens are no CE target
                labels[i, start:] = IGNORE_INDEX
            generated += real - start
        return {**batch, "input_ids": ids, "attention_mask": mask, "labels": labels, "kd_labels": kd_labels}, generated

    # -- the teacher cache ---------------------------------------------------------------------------------
    def cache_folder(self, teacher: Any, data_key: str) -> Path:
        """Where this teacher's continuations of these prompts live, keyed by everything that decides them.

        The teacher is keyed by its identity (name and tokenizer) and by a hash of its weights' bytes and dtypes
        (:func:`~distill.fingerprint.weights_hash`, the top-k teacher cache's key): a fine-tune saved over
        the same path, another hub revision, or the same teacher in bf16 instead of fp32 writes other
        continuations, so each gets its own folder. The hash reads bytes, not sums, so every rank and every later
        run on any device or thread count finds the same folder.
        """
        teacher_key = {**teacher.identity, "weights": weights_hash(teacher.model)}
        sampling = {k: v for k, v in self.settings().items() if k not in ("student_fraction", "teacher_fraction")}
        if self.prompt_file:  # the prompts themselves, so an edited file never reuses another prompt's continuations
            sampling["prompts"] = hashlib.sha256(Path(self.prompt_file).read_bytes()).hexdigest()
        key = json.dumps({"teacher": teacher_key, "data": data_key, **sampling}, sort_keys=True)
        return Path(self.teacher_cache) / hashlib.sha256(key.encode()).hexdigest()[:20]

    def load_cache(self, folder: Path) -> None:
        """Read every published shard; where shards disagree on a prompt, the oldest shard's continuation wins."""
        self.cached, self.fresh, self.folder = {}, {}, folder
        for shard in sorted(folder.glob("shard-*")) if folder.is_dir() else []:
            rows = datasets.load_from_disk(str(shard))
            for key, cont in zip(rows["key"], rows["continuation"], strict=True):
                self.cached.setdefault(int(key), torch.tensor(cont, dtype=torch.long))

    def flush(self, step: int) -> None:
        """Publish the continuations generated since the last flush (every rank calls it; rank 0 writes).

        Every rank then holds every rank's new continuations, exactly as a run resumed here would after
        :meth:`load_cache`: where two ranks wrote the same prompt, the lower rank's continuation wins on both.
        """
        if self.cached is None or self.folder is None:
            return
        fresh = {k: v.tolist() for k, v in self.fresh.items()}
        parts = [fresh]
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        if distributed and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, fresh)
        merged: dict[int, list[int]] = {}
        for part in parts:
            for key, cont in sorted(part.items()):
                merged.setdefault(key, cont)
        for key, cont in merged.items():
            self.cached[key] = torch.tensor(cont, dtype=torch.long)
        self.fresh = {}
        if merged and (not distributed or dist.get_rank() == 0):
            # Never replaced: a run resumed from an older checkpoint, or a second run on the same folder, adds its
            # own shard next to the others, so no continuation a run has used is ever lost.
            with atomic_directory(self.folder / f"shard-{step:09d}-{uuid.uuid4().hex[:8]}", replace=False) as tmp:
                keys = sorted(merged)
                datasets.Dataset.from_dict({"key": keys, "continuation": [merged[k] for k in keys]}).save_to_disk(
                    str(tmp)
                )
