"""The LightningDataModule: tokenises the corpus (with the student's tokenizer), packs, caches and batches it."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from distill.config import ConfigError, config_error
from distill.data.corpus import load_raw, pack, pack_documents, split_documents, spread_order
from distill.data.sampler import EvalBatchSampler, IndexedSet, PaddedEvalSet, StepBatchSampler
from distill.fingerprint import tokenizer_fingerprint
from distill.runtime.files import atomic_directory

# Lightning warns that a mid-epoch resume replays batches unless the loader is stateful. Ours is
# resumable by construction: StepBatchSampler starts from the restored global step.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def doc_column(blocks: datasets.Dataset) -> list[int]:
    """Each held-out block's document (the ``doc`` column) as plain ints."""
    return [int(d) for d in blocks.with_format(None)["doc"]]


class DistillDataModule(pl.LightningDataModule):
    """Tokenises a corpus with the teacher's tokenizer and packs it into fixed-length blocks.

    Three splits by whole document, drawn in one seeded shuffle (no text appears in two of them): **train**,
    **validation** (read during training: the validation loss, early stopping, anything tuned) and **test**
    (the end-of-run report, ``evaluate.py`` and the benchmarks; never read while training). The held-out
    splits keep every token (their last block is padded) and record each block's document, so metrics can be
    resampled by document; a capped evaluation reads blocks spread over the documents (:func:`spread_order`).
    Tokenised, packed splits are stored under ``cache_dir`` keyed by the tokenizer, the data and the
    packing settings, so a second run loads them instead of tokenising again.

    Args:
        tokenizer: the teacher's tokenizer.
        source: ``embedded`` (CPython's pydoc topics and standard-library docstrings), ``text`` (local files)
            or ``hub``.
        files: for ``text``: a path, glob or list of txt/md, json/jsonl, parquet or csv files.
        name / config_name / split: for ``hub``: ``datasets.load_dataset(name, config_name, split=split)``.
        text_field: the column that holds the text.
        block_size: tokens per training sequence.
        batch_size: sequences per device per step.
        eval_batch_size: sequences per validation batch (defaults to ``batch_size``).
        val_fraction: share of the tokens held out for validation, by whole documents.
        test_fraction: share of the tokens held out for the test split, by whole documents.
        seed: seed of the split and of the batch order.
        order_seed: seed of the batch order alone (None: ``seed``). Another value trains on another order of the
            same training split and scores on the same held-out documents: a replicate run stays comparable.
        num_workers: DataLoader worker processes.
        cache_dir: where tokenised splits live (defaults to the ``datasets`` cache).

    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        source: str = "embedded",
        files: str | Sequence[str] | None = None,
        name: str | None = None,
        config_name: str | None = None,
        split: str = "train",
        text_field: str = "text",
        block_size: int = 128,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.1,
        seed: int = 1234,
        order_seed: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if block_size < 2:
            raise config_error("data.block_size", block_size, "must be at least 2 tokens")
        if not 0.0 < val_fraction < 1.0:
            raise config_error("data.val_fraction", val_fraction, "must lie strictly between 0 and 1")
        if not 0.0 < test_fraction < 1.0:
            raise config_error("data.test_fraction", test_fraction, "must lie strictly between 0 and 1")
        if val_fraction + test_fraction >= 1.0:
            raise config_error(
                "data.test_fraction",
                test_fraction,
                f"with data.val_fraction={val_fraction} it leaves no training text; keep their sum below 1",
            )
        if batch_size < 1:
            raise config_error("data.batch_size", batch_size, "must be at least 1")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise config_error(
                "data.eval_batch_size", eval_batch_size, "must be at least 1, or null for data.batch_size"
            )
        if num_workers < 0:
            raise config_error("data.num_workers", num_workers, "must be 0 (load in the main process) or more")
        self.tokenizer = tokenizer
        self.source, self.files, self.name, self.config_name = source, files, name, config_name
        self.split, self.text_field, self.block_size = split, text_field, block_size
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.seed, self.num_workers = seed, num_workers
        self.order_seed = seed if order_seed is None else order_seed
        self.cache_dir = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE) / "distill"
        self.train_set: datasets.Dataset | None = None
        self.val_set: datasets.Dataset | None = None
        self.test_set: datasets.Dataset | None = None
        self.cache_path: Path | None = None
        self.cache_hit = False
        self._token_counts: torch.Tensor | None = None

    def _settings(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "text_field": self.text_field,
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "version": 2,  # 2: train/validation/test; held-out blocks keep every token and their document
        }

    def _raw(self) -> tuple[datasets.Dataset, str]:
        return load_raw(self.source, self.files, self.name, self.config_name, self.split, self.text_field)

    def _cache_path(self, fingerprint: str) -> Path:
        key = hashlib.sha256(json.dumps({**self._settings(), "data": fingerprint}, sort_keys=True).encode())
        return self.cache_dir / key.hexdigest()[:20]

    def data_key(self) -> str:
        """The name of the tokenised cache for this data and these settings, found without tokenising.

        It equals ``cache_path.name`` once the data is set up; a cached teacher was built for one such key
        and refuses any other (``Teacher.check_data``).
        """
        return self._cache_path(self._raw()[1]).name

    def _build(self) -> None:
        raw, fingerprint = self._raw()
        self.cache_path = self._cache_path(fingerprint)
        if (self.cache_path / "done").is_file():
            self.cache_hit = True
            return
        if self.text_field not in raw.column_names:
            raise config_error("data.text_field", self.text_field, f"no such column; the data has {raw.column_names}")
        kind = getattr(raw.features[self.text_field], "dtype", type(raw.features[self.text_field]).__name__)
        if kind not in ("string", "large_string"):
            raise config_error(
                "data.text_field", self.text_field, f"the column holds {kind} values, not text; name a text column"
            )
        if len(raw) == 0:
            raise config_error(
                f"data.{'files' if self.source == 'text' else 'name'}", self.files or self.name, "no rows"
            )
        tokenizer, field, block = self.tokenizer, self.text_field, self.block_size
        eos = tokenizer.eos_token_id

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            ids = [x + [eos] for x in tokenizer(batch[field], add_special_tokens=False)["input_ids"]]
            return {"input_ids": ids, "length": [len(x) for x in ids]}

        def group(batch: dict[str, list]) -> dict[str, list]:
            return {"input_ids": pack(batch["input_ids"], block)}

        docs = raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc="tokenize")
        lengths = docs["length"]
        total = sum(lengths)
        val, test = split_documents(lengths, (self.val_fraction, self.test_fraction), self.seed)
        held = set(val) | set(test)
        train = docs.select([i for i in range(len(docs)) if i not in held])
        # Packing runs over batches of 1000 documents, so at most one partial block per batch is dropped.
        packed = {"train": train.map(group, batched=True, batch_size=1000, remove_columns=train.column_names)}
        documents = {}
        for split, chosen in (("val", sorted(val)), ("test", sorted(test))):
            # Held-out documents in corpus order, every token kept, each block knowing its document.
            ids = docs.select(chosen)["input_ids"] if chosen else []
            packed[split] = datasets.Dataset.from_dict(pack_documents(ids, block))
            documents[split] = chosen
        if any(len(packed[k]) == 0 for k in packed) or len(packed["train"]) == 0:
            raise config_error(
                "data.block_size",
                self.block_size,
                f"the corpus has {total} tokens in {len(docs)} documents, too few for one training, one "
                "validation and one test block; lower data.block_size, raise data.val_fraction / "
                "data.test_fraction, or add text",
            )
        # Published whole or not at all; when another process published the same cache first, its copy is kept.
        with atomic_directory(self.cache_path, replace=False) as tmp:
            for split, blocks in packed.items():
                blocks.save_to_disk(str(tmp / split))
            (tmp / "settings.json").write_text(json.dumps({**self._settings(), "data": fingerprint}, indent=1))
            # Which corpus documents each held-out split holds (their index in the raw data), for the report.
            (tmp / "documents.json").write_text(json.dumps(documents))
            (tmp / "done").touch()

    def prepare_data(self) -> None:
        """Tokenise and cache once per node (Lightning calls this on local rank 0 only)."""
        self._build()

    def setup(self, stage: str | None = None) -> None:
        """Load the cached splits on every rank."""
        if self.train_set is not None:
            return
        self._build()
        assert self.cache_path is not None
        self.train_set = datasets.load_from_disk(str(self.cache_path / "train")).with_format("torch")
        self.val_set = datasets.load_from_disk(str(self.cache_path / "val")).with_format("torch")
        self.test_set = datasets.load_from_disk(str(self.cache_path / "test")).with_format("torch")
        # The corpus index of every held-out document, per split (the report counts and names them).
        self.heldout_docs: dict[str, list[int]] = json.loads((self.cache_path / "documents.json").read_text())

    def train_token_counts(self, chunk: int = 4096) -> torch.Tensor:
        """How often each token id occurs in the packed training blocks (what the student was trained on).

        The evaluation buckets held-out tokens by these counts (rare / middle / common); they come from the
        training split only, so the held-out text never decides its own buckets. Computed once and kept.

        Args:
            chunk: blocks counted at a time, so a large corpus is never held in memory as one tensor.

        Returns:
            A long tensor of length ``max(len(tokenizer), largest id + 1)``.

        """
        if self._token_counts is None:
            self.setup()
            assert self.train_set is not None
            counts = torch.zeros(len(self.tokenizer), dtype=torch.long)
            for start in range(0, len(self.train_set), chunk):
                ids = self.train_set[start : start + chunk]["input_ids"].flatten()
                part = torch.bincount(ids, minlength=len(counts))
                if len(part) > len(counts):
                    counts = torch.cat([counts, counts.new_zeros(len(part) - len(counts))])
                counts += part
            self._token_counts = counts
        return self._token_counts

    @staticmethod
    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack packed blocks; the mask is all ones (the models are causal: a padded tail changes no earlier logit).

        A validation padding row (:class:`~distill.data.sampler.PaddedEvalSet`) keeps its tokens, so the forward
        is an ordinary one, but every label is ignored (-100), so it adds no loss and no token to any metric. A
        held-out block's padded tail (past its ``length``) is ignored the same way; its ``doc`` is passed on.
        """
        ids = torch.stack([r["input_ids"] for r in rows])
        labels = ids.clone()
        labels[torch.tensor([bool(r.get("padding", False)) for r in rows])] = -100
        if "length" in rows[0]:
            lengths = torch.tensor([int(r["length"]) for r in rows])
            labels[torch.arange(ids.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)] = -100
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if "doc" in rows[0]:  # held-out rows: the document each block starts in, and the block's place
            out["doc"] = torch.tensor([int(r["doc"]) for r in rows])
            out["block"] = torch.tensor([int(r["block"]) for r in rows])
        if "index" in rows[0]:  # training rows: which block each is (a cached teacher continuation is found by it)
            out["index"] = torch.tensor([int(r["index"]) for r in rows])
        return out

    def train_dataloader(self) -> DataLoader:
        """Batches for ``max_steps`` optimizer steps, resuming where the restored global step left off."""
        trainer = self.trainer
        if trainer is None or trainer.max_steps is None or trainer.max_steps <= 0:
            raise ConfigError(
                f"trainer.max_steps={getattr(trainer, 'max_steps', None)!r}: distillation runs by "
                "optimizer steps; set trainer.max_steps to a positive number"
            )
        accumulate = trainer.accumulate_grad_batches
        sampler = StepBatchSampler(
            len(self.train_set),
            self.batch_size,
            trainer.max_steps * accumulate,
            seed=self.order_seed,
            world_size=trainer.world_size,
            rank=trainer.global_rank,
            start=trainer.global_step * accumulate,
        )
        return DataLoader(
            IndexedSet(self.train_set),
            batch_sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """The validation blocks (never the test split), split across ranks (:class:`EvalBatchSampler`).

        Under an integer ``trainer.limit_val_batches`` the batches read are a seeded spread over the validation
        documents (:func:`~distill.data.corpus.spread_order`), and the ranks together validate exactly the
        batches one process would, so ``val/*`` do not depend on the number of ranks. A fractional limit is
        applied by Lightning to each rank's share.
        """
        trainer = self.trainer
        limit = trainer.limit_val_batches if trainer is not None else None
        sampler = EvalBatchSampler(
            len(self.val_set),
            self.eval_batch_size,
            limit_batches=limit if isinstance(limit, int) else None,
            world_size=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            order=self.spread("val"),
        )
        return self._eval_loader(self.val_set, sampler)

    def heldout_dataloader(self, split: str = "test", max_batches: int | None = None) -> DataLoader:
        """A held-out split for the final evaluation, in one process: all of it, or ``max_batches`` spread batches.

        Args:
            split: ``test`` (the report's) or ``val``.
            max_batches: a cap; the batches kept are a seeded spread over the split's documents, never its
                first documents. None: every block.

        """
        data = self._split(split)
        order = self.spread(split) if max_batches is not None else None
        return self._eval_loader(
            data, EvalBatchSampler(len(data), self.eval_batch_size, limit_batches=max_batches, order=order)
        )

    def stream_dataloader(self, split: str = "test") -> DataLoader:
        """A held-out split's blocks in stream order (documents in order): what text is decoded from."""
        data = self._split(split)
        return self._eval_loader(data, EvalBatchSampler(len(data), self.eval_batch_size))

    def spread(self, split: str) -> list[int]:
        """The seeded spread order of a held-out split's blocks (:func:`~distill.data.corpus.spread_order`)."""
        return spread_order(doc_column(self._split(split)), self.seed)

    def _split(self, split: str) -> datasets.Dataset:
        self.setup()
        if split not in ("val", "test"):
            raise ValueError(f"held-out split {split!r}: choose val or test")
        return self.val_set if split == "val" else self.test_set

    def _eval_loader(self, data: datasets.Dataset, sampler: EvalBatchSampler) -> DataLoader:
        return DataLoader(
            PaddedEvalSet(data),
            batch_sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the settings that decide the splits (``evaluate.py`` rebuilds them)."""
        return {"split": self.split_facts()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A run resumed with other split settings would train on its own held-out text: refused, naming the key."""
        saved = state_dict.get("split") or {}
        now = self.split_facts()
        # The settings first, so the message names what the user changed; the data key (which they decide,
        # with the corpus and tokenizer) last.
        for key in ("seed", "val_fraction", "test_fraction", "block_size", "data_key"):
            if key in saved and saved[key] != now[key]:
                field = {"seed": "seed", "data_key": "data"}.get(key, f"data.{key}")
                raise config_error(
                    field,
                    now[key],
                    f"the checkpoint was trained with {key}={saved[key]!r}, whose held-out documents differ from "
                    f"these; resume with {field}={saved[key]!r} or start a new run (another run_name)",
                )

    def split_text(self, split: str) -> str:
        """A held-out split's documents (``validation``, ``test``) as one text, in corpus order (after ``setup``)."""
        raw, _ = self._raw()
        return "\n\n".join(raw[i][self.text_field] for i in self.heldout_docs[split])

    def split_facts(self) -> dict[str, Any]:
        """What decides the splits, for exports and checkpoints (``evaluate.py`` rebuilds the split from it)."""
        return {
            "data_key": self.cache_path.name if self.cache_path is not None else self.data_key(),
            "source": self.source,
            "files": self.files if self.files is None or isinstance(self.files, str) else list(self.files),
            "name": self.name,
            "config_name": self.config_name,
            "split": self.split,
            "text_field": self.text_field,
            "block_size": self.block_size,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
        }
