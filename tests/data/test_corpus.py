"""The raw corpus: the embedded documents (pydoc topics, stdlib docstrings), fingerprint, packing, held-out split."""

from __future__ import annotations

import sysconfig

import pytest

from distill.config import ConfigError
from distill.data.corpus import (
    _without_repeated_paragraphs,
    embedded_corpus,
    heldout_documents,
    load_raw,
    pack,
    stdlib_docstrings,
)


def test_pack_cuts_full_blocks_and_drops_tail():
    assert pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert pack([[1, 2]], 4) == []


def test_heldout_documents_are_whole_seeded_and_large_enough():
    lengths = [100, 5, 40, 300, 7, 60, 90, 12]
    held = heldout_documents(lengths, 0.2, seed=3)
    assert held == heldout_documents(lengths, 0.2, seed=3)
    assert len(set(held)) == len(held)
    tokens = sum(lengths[i] for i in held)
    assert tokens >= 0.2 * sum(lengths)
    assert tokens - lengths[held[-1]] < 0.2 * sum(lengths)  # stops as soon as the share is reached
    assert heldout_documents(lengths, 0.2, seed=4) != held


def test_embedded_source_is_the_corpus_under_the_text_field_with_a_stable_fingerprint():
    raw, fingerprint = load_raw("embedded", None, None, None, "train", "body")
    assert raw.column_names == ["body"] and raw["body"] == embedded_corpus()
    assert fingerprint == load_raw("embedded", None, None, None, "train", "text")[1]
    assert fingerprint.startswith("embedded-")


def test_mixed_file_kinds_and_a_missing_hub_name_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data.files=.*use one kind of file among"):
        load_raw("text", [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], None, None, "train", "text")
    with pytest.raises(ConfigError, match=r"data.name=None: give a hub dataset id"):
        load_raw("hub", None, None, None, "train", "text")


def test_embedded_corpus_adds_the_stdlib_docstrings_after_the_pydoc_topics():
    from pydoc_data.topics import topics

    docs = embedded_corpus()
    assert sum(len(d.encode()) for d in docs) > 1_500_000  # the topics alone are ~460 KB
    assert docs[0] == topics[sorted(topics)[0]].strip()
    assert any(d.startswith("JSON (JavaScript Object Notation) <https://json.org> is a subset") for d in docs)
    assert len(set(docs)) == len(docs)
    assert len(stdlib_docstrings()) > 2000 and all(len(d) >= 100 for d in stdlib_docstrings())
    assert embedded_corpus() == docs


def test_stdlib_docstrings_are_parsed_not_imported_sorted_and_skip_test_suites(tmp_path, monkeypatch):
    long = "x " * 60  # 120 characters: above the 100-character floor
    files = {
        "b.py": f'"""B module. {long}"""\nimport not_a_module_at_all\n',  # never imported, so no ImportError
        "a.py": (
            f'"""A module. {long}"""\n'
            "if True:\n"
            "    class C:\n"
            f'        """C class. {long}"""\n'
            "        async def f(self):\n"
            f'            """f coroutine. {long}"""\n'
            "        def g(self):\n"
            '            """Too short."""\n'
        ),
        "dup.py": f'"""A module. {long}"""\n',  # the same text as a.py's: kept once
        "bad.py": f'"""Bad. {long}"""\ndef (:\n',  # does not parse: skipped
        "test/test_a.py": f'"""Test suite. {long}"""\n',
        "pkg/tests/t.py": f'"""Package tests. {long}"""\n',
        "idlelib/x.py": f'"""IDLE. {long}"""\n',
        "site-packages/third.py": f'"""Third party. {long}"""\n',
        "pkg/__init__.py": f'"""Package. {long}"""\n',
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    stdlib_docstrings.cache_clear()
    try:
        docs = stdlib_docstrings()
    finally:
        stdlib_docstrings.cache_clear()  # the next caller sees the real standard library again
    assert [d.split(".")[0] for d in docs] == ["A module", "C class", "f coroutine", "B module", "Package"]


def test_repeated_paragraphs_are_kept_once_so_no_text_sits_on_both_sides_of_the_split():
    para = (
        "The first sentence of a paragraph that several documents repeat word for word here. Twice, to be long enough."
    )
    near = "The first sentence of a paragraph that several documents repeat word for word here. And then it differs."
    short = "Changed in version 3.3."
    own = "Own text, " + "y " * 60 + "end."
    docs = [f"Intro one.\n\n{para}", f"{short}\n\n{para}\n\n{near}", para, f"{short}\n\n{own}"]
    # doc 2 loses the repeat and the near copy (one shared 60+ character sentence); doc 3 is all repeat: dropped
    assert _without_repeated_paragraphs(docs) == [f"Intro one.\n\n{para}", short, f"{short}\n\n{own}"]
