"""The raw corpus: the embedded reference prose or local/hub datasets, packing into blocks, the held-out split."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch

from distill.config import config_error

SOURCES = ("embedded", "text", "hub")

_FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def embedded_corpus() -> list[str]:
    """The English reference prose every CPython ships (``pydoc_data.topics``), one document per topic."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def load_raw(
    source: str,
    files: str | Sequence[str] | None,
    name: str | None,
    config_name: str | None,
    split: str,
    text_field: str,
) -> tuple[datasets.Dataset, str]:
    """The raw documents as a ``datasets.Dataset`` plus a fingerprint of their content.

    Args:
        source: ``embedded`` (CPython's pydoc topics), ``text`` (local files) or ``hub``.
        files: for ``text``: a path, glob or list of files of one kind (txt/md, json/jsonl, parquet or csv).
        name: for ``hub``: the dataset id.
        config_name: for ``hub``: the dataset configuration.
        split: the split to load.
        text_field: the column that holds the text (the embedded corpus is stored under it).

    """
    if source == "embedded":
        docs = embedded_corpus()
        digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]
        return datasets.Dataset.from_dict({text_field: docs}), f"embedded-{sys.version_info[:2]}-{digest}"
    if source == "text":
        if not files:
            raise config_error("data.files", files, "give a file, a glob or a list of txt/jsonl/parquet files")
        file_list = [files] if isinstance(files, str) else list(files)
        suffixes = {Path(f).suffix.lower() for f in file_list}
        builders = {_FILE_BUILDERS.get(s) for s in suffixes}
        if None in builders or len(builders) != 1:
            raise config_error("data.files", files, f"use one kind of file among {', '.join(sorted(_FILE_BUILDERS))}")
        try:
            raw = datasets.load_dataset(builders.pop(), data_files=file_list, split=split)
        except FileNotFoundError as err:
            raise config_error("data.files", files, f"no such file ({err}); check the path or glob") from err
        return raw, raw._fingerprint
    if source == "hub":
        if not name:
            raise config_error("data.name", name, "give a hub dataset id such as 'wikitext'")
        try:
            raw = datasets.load_dataset(name, config_name, split=split)
        except (ConnectionError, FileNotFoundError, ValueError) as err:
            raise config_error(
                "data.name",
                name,
                f"could not load it ({type(err).__name__}: {str(err)[:160]}); "
                "download it while online or use data=text with local files",
            ) from err
        return raw, raw._fingerprint
    raise config_error("data.source", source, f"choose one of {', '.join(SOURCES)}")


def pack(token_lists: Sequence[Sequence[int]], block_size: int) -> list[list[int]]:
    """Concatenate documents and cut the stream into full blocks; the incomplete tail is dropped."""
    stream = [t for ids in token_lists for t in ids]
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def heldout_documents(lengths: Sequence[int], val_fraction: float, seed: int) -> list[int]:
    """Indices of whole documents to hold out, drawn in a seeded order until ``val_fraction`` of tokens is reached."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    total, held, tokens = sum(lengths), [], 0
    for i in order:
        if tokens >= val_fraction * total:
            break
        held.append(i)
        tokens += lengths[i]
    return held
