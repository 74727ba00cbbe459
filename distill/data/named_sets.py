"""Named held-out sets for the evaluation (``eval.heldout``): the run's own test split and text from elsewhere.

A student distilled on one corpus is trained toward the teacher on that text only; whether it keeps the teacher's
behaviour on other text is what a user needs to know, so the report scores every named set separately:

- ``split``: the run's test split (in domain, never read while training);
- ``distill:<path glob>``: files shipped inside this package, e.g. ``distill:data/heldout_sets/*.jsonl``, the
  English prose sets unlike the embedded corpus (Austen's novels, the CIA World Factbook, State of the Union
  addresses; sources and licences in ``distill/data/heldout_sets/SOURCES.md``);
- a path or glob of the user's own ``txt``/``md``/``jsonl``/``parquet``/``csv`` files, or a mapping
  ``{files: ..., text_field: ...}`` / ``{name: <datasets id>, config_name: ..., split: ..., text_field: ...}``.

Each set is tokenised with the student's tokenizer (documents joined by EOS), packed into blocks that keep every
token and know their document (:func:`~distill.data.corpus.pack_documents`), and cached like the training data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
from torch.utils.data import DataLoader

from distill.config import config_error
from distill.data.corpus import load_raw, pack_documents, spread_order
from distill.data.datamodule import doc_column
from distill.data.sampler import EvalBatchSampler, PaddedEvalSet
from distill.fingerprint import tokenizer_fingerprint
from distill.runtime.files import atomic_directory

SPLIT = "split"
PACKAGE_PREFIX = "distill:"


@dataclass
class HeldoutSet:
    """One named held-out set, packed and ready to score.

    Attributes:
        name: the set's name in ``eval.heldout`` and in the report.
        blocks: the packed blocks (``input_ids``, ``length``, ``doc``), documents in order.
        source: what the set is (for the report).
        documents: how many documents it holds.

    """

    name: str
    blocks: datasets.Dataset
    source: str
    documents: int

    def loader(self, batch_size: int, collate: Any, max_batches: int | None = None, seed: int = 0) -> DataLoader:
        """Every block (``max_batches`` None) or a seeded spread of ``max_batches`` batches over its documents."""
        order = spread_order(doc_column(self.blocks), seed) if max_batches is not None else None
        sampler = EvalBatchSampler(len(self.blocks), batch_size, limit_batches=max_batches, order=order)
        return DataLoader(PaddedEvalSet(self.blocks), batch_sampler=sampler, collate_fn=collate)

    def stream(self, batch_size: int, collate: Any) -> DataLoader:
        """Every block in document order (what text is decoded from)."""
        return DataLoader(
            PaddedEvalSet(self.blocks), batch_sampler=EvalBatchSampler(len(self.blocks), batch_size), collate_fn=collate
        )


def _spec(name: str, value: Any) -> dict[str, Any]:
    """A set's setting as ``load_raw`` arguments; a refusal names ``eval.heldout.<name>``."""
    field = f"eval.heldout.{name}"
    if isinstance(value, str):
        value = {"files": value}
    if not isinstance(value, Mapping) or not (value.get("files") or value.get("name")):
        raise config_error(
            field,
            value,
            "give 'split' (the run's test split), a file glob (distill:data/heldout_sets/*.jsonl for the shipped "
            "English sets), or {files: ...} / {name: <datasets id>, split: ...}",
        )
    unknown = set(value) - {"files", "name", "config_name", "split", "text_field"}
    if unknown:
        raise config_error(
            field, dict(value), f"unknown keys {sorted(unknown)}; use files, name, config_name, split, text_field"
        )
    files = value.get("files")
    if isinstance(files, str) and files.startswith(PACKAGE_PREFIX):
        files = str(resources.files("distill") / files[len(PACKAGE_PREFIX) :])
    return {
        "source": "text" if files else "hub",
        "files": files,
        "name": value.get("name"),
        "config_name": value.get("config_name"),
        "split": value.get("split", "train"),
        "text_field": value.get("text_field", "text"),
    }


def check_sets(heldout: Mapping[str, Any] | None, max_batches: Any) -> None:
    """Refuse bad ``eval.heldout`` / ``eval.max_batches`` settings before anything loads (files must exist)."""
    from distill.data.corpus import existing_files

    wanted = dict(heldout or {SPLIT: SPLIT})
    if list(wanted.values()).count(SPLIT) != 1 or next(iter(wanted.values())) != SPLIT:
        raise config_error(
            "eval.heldout", wanted, "name the run's test split first, once (e.g. test: split), then other sets"
        )
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise config_error(
            "eval.max_batches", max_batches, "give a number of batches >= 1, or null to score every block"
        )
    for name, value in wanted.items():
        if value == SPLIT:
            continue
        spec = _spec(str(name), value)
        if spec["files"]:
            files = [spec["files"]] if isinstance(spec["files"], str) else list(spec["files"])
            try:
                existing_files(files)
            except Exception as err:  # the corpus reader names data.files: say which setting it was
                raise config_error(f"eval.heldout.{name}", value, str(err).split(": ", 1)[-1]) from None


def load_set(name: str, value: Any, tokenizer: Any, block_size: int, cache_dir: str | Path) -> HeldoutSet:
    """Tokenise, pack and cache one named set (not the run's ``split``, which the datamodule holds)."""
    spec = _spec(name, value)
    try:
        raw, fingerprint = load_raw(**spec)
    except Exception as err:
        from distill.config import ConfigError

        if isinstance(err, ConfigError):  # the message names data.*: say which setting it really was
            raise config_error(f"eval.heldout.{name}", value, str(err)) from err
        raise
    if spec["text_field"] not in raw.column_names:
        raise config_error(
            f"eval.heldout.{name}.text_field", spec["text_field"], f"no such column; the data has {raw.column_names}"
        )
    key = {"set": fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer), "block": block_size, "version": 1}
    folder = Path(cache_dir) / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    if not (folder / "done").is_file():
        eos = tokenizer.eos_token_id
        texts = [t for t in raw[spec["text_field"]] if t and t.strip()]
        ids = [x + [eos] for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        blocks = datasets.Dataset.from_dict(pack_documents(ids, block_size))
        with atomic_directory(folder, replace=False) as tmp:
            blocks.save_to_disk(str(tmp / "blocks"))
            (tmp / "about.json").write_text(json.dumps({"documents": len(ids), **spec}, default=str))
            (tmp / "done").touch()
    about = json.loads((folder / "about.json").read_text())
    blocks = datasets.load_from_disk(str(folder / "blocks")).with_format("torch")
    what = shown_source(about["files"]) if about["source"] == "text" else f"{about['name']} ({about['split']})"
    return HeldoutSet(name, blocks, str(what), int(about["documents"]))


def shown_source(files: Any) -> Any:
    """``files`` as a user writes it: a path inside this package as ``distill:<path>`` (no machine's path)."""
    root = str(resources.files("distill")).rstrip("/") + "/"
    if isinstance(files, str) and files.startswith(root):
        return PACKAGE_PREFIX + files[len(root) :]
    return files
