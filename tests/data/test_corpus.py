"""The raw corpus: the embedded documents and their fingerprint, packing into blocks, the held-out documents."""

from __future__ import annotations

import pytest

from distill.config import ConfigError
from distill.data.corpus import embedded_corpus, heldout_documents, load_raw, pack


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
