"""The raw corpus: the embedded reference prose or local/hub datasets, packing into blocks, the held-out split."""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import torch

from distill.config import config_error, root_message

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


# Folders of the standard library whose docstrings are left out: test suites (their docstrings describe
# test cases, and some files there are deliberately invalid), third-party packages, bytecode, and the
# parts Linux distributions ship as separate packages (IDLE, Tk, lib2to3, distutils, venv/ensurepip), so
# that two installs of the same Python version yield the same corpus whichever extras they carry.
_SKIPPED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "distutils",
        "ensurepip",
        "venv",
    }
)
MIN_DOCSTRING_CHARS = 100  # shorter ones are one-liners ("Return the foo."), too short to train or test on
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _documented_nodes(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Classes and functions at any depth, reached through statement bodies only.

    Docstrings can only sit in statement bodies, so expressions are never visited: ``ast.walk`` over every
    node would take seconds longer on the whole standard library.
    """
    for node in body:
        if isinstance(node, _DOCUMENTED):
            yield node
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            sub = getattr(node, name, None)
            if isinstance(sub, list):
                yield from _documented_nodes(sub)


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """The standard library's own docstrings (modules, classes, functions) of 100 characters or more.

    The sources are parsed with ``ast``, never imported, in a sorted walk, so the result depends only on the
    installed files. Files that do not parse are skipped, and a docstring seen before (inherited or copied
    text) is kept once, so that no text can land in both the training and the held-out split. The walk
    parses about 10 MB of source (seconds), hence the in-process cache: ``load_raw`` needs the corpus for
    its fingerprint as well as for its content.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, None] = {}  # insertion-ordered set
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        for file in sorted(f for f in files if f.endswith(".py")):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # invalid escape sequences and the like in old sources
                    tree = ast.parse((Path(folder) / file).read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue
            for node in (tree, *_documented_nodes(tree.body)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    seen.setdefault(doc)
    return tuple(seen)


def embedded_corpus() -> list[str]:
    """The English reference prose every CPython ships, one document per topic or docstring.

    First the pydoc topics (``pydoc_data.topics``, the language reference), then the standard library's
    docstrings (:func:`stdlib_docstrings`): ~1.5 MB in all on CPython 3.11. Many topics repeat sections of
    others and docstrings repeat each other's paragraphs, so a paragraph seen in an earlier document is
    dropped from the later ones: the split holds out whole documents, and a repeated paragraph would
    otherwise sit on both sides of it (a held-out task example the student was trained on).
    """
    from pydoc_data.topics import topics

    return _without_repeated_paragraphs([*(topics[k] for k in sorted(topics)), *stdlib_docstrings()])


# Where a sentence ends inside a paragraph (to find paragraphs that repeat another one with small edits).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _without_repeated_paragraphs(docs: Sequence[str]) -> list[str]:
    """Each document without the paragraphs that repeat an earlier one; empty or repeated documents dropped.

    A paragraph (of 100+ characters) repeats an earlier one when it shares a sentence of 60+ characters
    with it, which also catches near copies (``os.getenv`` and ``os.getenvb`` differ in one word). Shorter
    paragraphs ("Changed in version 3.3.") are kept: they are headings and notes, too short for a held-out
    example and needed for the documents to read.
    """
    seen: set[str] = set()
    out = []
    for doc in docs:
        kept = []
        for para in re.split(r"\n\s*\n", doc):
            flat = " ".join(para.split())
            if len(flat) >= MIN_DOCSTRING_CHARS:
                sentences = {s for s in _SENTENCE_END.split(flat) if len(s) >= 60} | {flat}
                if sentences & seen:
                    continue
                seen |= sentences
            kept.append(para)
        text = "\n\n".join(kept).strip()
        if text and text not in seen:
            seen.add(text)
            out.append(text)
    return out


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
        source: ``embedded`` (CPython's pydoc topics and stdlib docstrings), ``text`` (local files) or ``hub``.
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
        file_list = [str(f) for f in ([files] if isinstance(files, str) else list(files))]
        for f in file_list:
            if Path(f).is_dir():
                raise config_error("data.files", f, "is a folder; name the files in it, e.g. data.files='folder/*.txt'")
        suffixes = {Path(f).suffix.lower() for f in file_list}
        builders = {_FILE_BUILDERS.get(s) for s in suffixes}
        if None in builders or len(builders) != 1:
            raise config_error("data.files", files, f"use one kind of file among {', '.join(sorted(_FILE_BUILDERS))}")
        builder = builders.pop()
        paths = existing_files(file_list)
        try:
            raw = datasets.load_dataset(builder, data_files=paths, split=split)
        except FileNotFoundError as err:
            raise config_error("data.files", files, f"no such file ({err}); check the path or glob") from err
        except Exception as err:  # datasets wraps parse errors (DatasetGenerationError, ArrowInvalid, ...)
            raise config_error("data.files", files, _unreadable(paths, builder, err)) from err
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


def existing_files(entries: Sequence[str]) -> list[str]:
    """Every file the entries name (globs expanded, in order); refuses a glob that matches nothing and an empty file."""
    found: list[str] = []
    for entry in entries:
        matches = sorted(glob.glob(os.path.expanduser(entry))) if glob.has_magic(entry) else [entry]
        if not matches:
            raise config_error("data.files", entry, "the pattern matches no file; check the folder and the pattern")
        for m in matches:
            p = Path(m).expanduser()
            if p.is_file() and p.stat().st_size == 0:
                raise config_error("data.files", m, "the file is empty; add text to it or leave it out")
            found.append(str(p))
    return found


def _unreadable(paths: Sequence[str], builder: str, err: BaseException) -> str:
    """Why ``datasets`` could not read the files: the first broken JSON line when there is one, else its reason."""
    if builder == "json":
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as fh:
                head = fh.read(1).strip()
                fh.seek(0)
                if head == "[":  # one JSON array, not JSON lines
                    try:
                        rows = json.load(fh)
                    except json.JSONDecodeError as bad:
                        return f"{path} is not valid JSON (line {bad.lineno}: {bad.msg}); fix the file"
                    if not rows:
                        return f"{path} holds no rows (an empty JSON array); add records with a text field"
                    continue
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            json.loads(line)
                        except json.JSONDecodeError as bad:
                            return f"line {n} of {path} is not valid JSON ({bad.msg}); fix or remove that line"
    return f"could not read the files as {builder} ({root_message(err)[:200]}); check that they are {builder} files"


def pack(token_lists: Sequence[Sequence[int]], block_size: int) -> list[list[int]]:
    """Concatenate documents and cut the stream into full blocks; the incomplete tail is dropped."""
    stream = [t for ids in token_lists for t in ids]
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def heldout_documents(lengths: Sequence[int], val_fraction: float, seed: int) -> list[int]:
    """Indices of whole documents to hold out, drawn in a seeded order until ``val_fraction`` of tokens is reached."""
    return split_documents(lengths, (val_fraction,), seed)[0]


def split_documents(lengths: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Disjoint sets of whole documents, one per fraction, drawn in one seeded shuffle of the documents.

    The documents are taken in a seeded random order (never corpus order); the first set takes them until it
    holds ``fractions[0]`` of all tokens, the next one continues from there, and so on. What no set took is
    the training split. The same lengths, fractions and seed always give the same sets.

    Returns:
        One list of document indices per fraction, in the order they were drawn.

    """
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    total = sum(lengths)
    sets: list[list[int]] = []
    at = 0
    for fraction in fractions:
        held, tokens = [], 0
        while at < len(order) and tokens < fraction * total:
            held.append(order[at])
            tokens += lengths[order[at]]
            at += 1
        sets.append(held)
    return sets


def pack_documents(token_lists: Sequence[Sequence[int]], block_size: int) -> dict[str, list]:
    """Held-out documents packed into blocks that keep every token: the last block is padded, not dropped.

    Returns columns: ``input_ids`` (blocks of ``block_size``; the last padded with its own final token),
    ``length`` (the real tokens in each block) and ``doc`` (the index, in ``token_lists``, of the document the
    block's first token belongs to; a block's later documents follow from the end-of-document tokens in it).
    """
    ids, length, doc = [], [], []
    stream = [t for d in token_lists for t in d]
    owners = [i for i, d in enumerate(token_lists) for _ in d]
    for start in range(0, len(stream), block_size):
        block = stream[start : start + block_size]
        length.append(len(block))
        doc.append(owners[start])
        ids.append(block + [block[-1]] * (block_size - len(block)))
    return {"input_ids": ids, "length": length, "doc": doc}


def spread_order(docs: Sequence[int], seed: int) -> list[int]:
    """An order of held-out blocks whose first ``n`` spread over as many documents as ``n`` allows.

    Documents are visited in a seeded random order, one block of each per round (a document's blocks in
    stream order), so a capped evaluation or validation reads a sample of every document it can reach rather
    than the first documents of the split.

    Args:
        docs: each block's document (``pack_documents``' ``doc`` column).
        seed: the order's seed.

    """
    by_doc: dict[int, list[int]] = {}
    for i, d in enumerate(docs):
        by_doc.setdefault(int(d), []).append(i)
    keys = list(by_doc)
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    queues = [by_doc[keys[p]] for p in perm]
    order: list[int] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        order += [q[depth] for q in queues if depth < len(q)]
    return order
