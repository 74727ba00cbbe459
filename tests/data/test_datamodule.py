"""The datamodule: tokenisation, the document-level split, the on-disk cache and its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.config import ConfigError
from distill.data.datamodule import DistillDataModule


def _dm(tiny_teacher, cache: Path, **kw) -> DistillDataModule:
    return DistillDataModule(tiny_teacher.tokenizer, cache_dir=str(cache), block_size=kw.pop("block_size", 32), **kw)


def test_split_is_deterministic_and_disjoint_and_cached(tiny_teacher, tmp_path, monkeypatch):
    a = _dm(tiny_teacher, tmp_path)
    a.setup()
    assert not a.cache_hit
    assert len(a.train_set) > 4 * len(a.test_set) > len(a.val_set) > 0  # 10 % test, 5 % validation by default
    assert a.train_set[0]["input_ids"].shape == (32,)

    # A second module with the same settings loads the cache without calling the tokenizer.
    calls = []
    tok = tiny_teacher.tokenizer
    monkeypatch.setattr(type(tok), "__call__", lambda *args, **kwargs: calls.append(1))
    b = _dm(tiny_teacher, tmp_path)
    b.setup()
    assert b.cache_hit and calls == []
    assert torch.equal(a.train_set[:]["input_ids"], b.train_set[:]["input_ids"])
    assert torch.equal(a.val_set[:]["input_ids"], b.val_set[:]["input_ids"])
    monkeypatch.undo()

    # The corpus repeats some grammar snippets, so a few identical blocks may exist; most must not.
    train_rows = {tuple(r.tolist()) for r in a.train_set[:]["input_ids"]}
    shared = sum(tuple(r.tolist()) in train_rows for r in a.val_set[:]["input_ids"])
    assert shared < 0.05 * len(a.val_set)

    # Another seed gives another split, in its own cache entry.
    c = _dm(tiny_teacher, tmp_path, seed=7)
    c.setup()
    assert not c.cache_hit and c.cache_path != a.cache_path


def test_local_text_and_jsonl_files(tiny_teacher, tmp_path):
    from pydoc_data.topics import topics

    docs = sorted(topics.values())[:20]
    (tmp_path / "a.txt").write_text("\n".join(docs))
    dm = _dm(tiny_teacher, tmp_path / "cache", source="text", files=str(tmp_path / "*.txt"))
    dm.setup()
    assert len(dm.train_set) > 0
    import json

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"content": d}) for d in docs))
    dm = _dm(tiny_teacher, tmp_path / "cache", source="text", files=str(tmp_path / "d.jsonl"), text_field="content")
    dm.setup()
    assert len(dm.val_set) > 0


def test_corpus_too_short_is_refused(tiny_teacher, tmp_path):
    (tmp_path / "short.txt").write_text("just a few words\n")
    dm = _dm(tiny_teacher, tmp_path / "cache", source="text", files=str(tmp_path / "short.txt"))
    with pytest.raises(ConfigError, match=r"data.block_size=32: the corpus has \d+ tokens .* lower data.block_size"):
        dm.setup()
    assert not any((tmp_path / "cache").glob("*/done"))  # nothing half-written was published


def test_missing_files_and_bad_source_are_refused(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="data.files"):
        _dm(tiny_teacher, tmp_path, source="text", files=str(tmp_path / "missing.txt")).setup()
    with pytest.raises(ConfigError, match="data.source='ftp'"):
        _dm(tiny_teacher, tmp_path, source="ftp").setup()
    with pytest.raises(ConfigError, match="data.val_fraction"):
        _dm(tiny_teacher, tmp_path, val_fraction=1.0)


def test_data_key_names_the_cache_without_tokenising(tiny_teacher, tmp_path, monkeypatch):
    a = _dm(tiny_teacher, tmp_path)
    a.setup()
    calls = []
    monkeypatch.setattr(type(tiny_teacher.tokenizer), "__call__", lambda *args, **kwargs: calls.append(1))
    b = _dm(tiny_teacher, tmp_path / "elsewhere")
    assert b.data_key() == a.cache_path.name and b.cache_path is None and calls == []
    assert _dm(tiny_teacher, tmp_path, seed=7).data_key() != a.data_key()
    assert _dm(tiny_teacher, tmp_path, block_size=16).data_key() != a.data_key()


def test_order_seed_reorders_the_batches_over_the_same_split(tiny_teacher, tmp_path):
    from types import SimpleNamespace

    def first_batches(**kw) -> tuple[torch.Tensor, torch.Tensor, str]:
        dm = _dm(tiny_teacher, tmp_path, **kw)
        dm.setup()
        dm.trainer = SimpleNamespace(max_steps=3, accumulate_grad_batches=1, world_size=1, global_rank=0, global_step=0)
        ids = torch.cat([b["input_ids"] for b in dm.train_dataloader()])
        return ids, dm.val_set[:]["input_ids"], dm.data_key()

    base, val, key = first_batches()
    same, _, _ = first_batches(order_seed=1234)  # order_seed equal to seed: the default order
    other, other_val, other_key = first_batches(order_seed=5)
    assert torch.equal(base, same)
    assert not torch.equal(base, other) and base.shape == other.shape
    assert torch.equal(val, other_val) and key == other_key  # the same held-out documents and the same cache


def _split_documents(dm: DistillDataModule) -> dict[str, set[str]]:
    """Each split's documents as text: held-out ones from their recorded corpus indices, training ones decoded."""
    from distill.data.corpus import load_raw

    raw, _ = load_raw(dm.source, dm.files, dm.name, dm.config_name, dm.split, dm.text_field)
    texts = raw[dm.text_field]
    held = {split: {texts[i] for i in dm.heldout_docs[split]} for split in ("val", "test")}
    chosen = set(dm.heldout_docs["val"]) | set(dm.heldout_docs["test"])
    held["train"] = {texts[i] for i in range(len(texts)) if i not in chosen}
    return held


@pytest.mark.parametrize("source", ["embedded", "text"])
def test_train_validation_and_test_hold_disjoint_documents_drawn_by_seed(tiny_teacher, tmp_path, source):
    from pydoc_data.topics import topics

    extra = {}
    if source == "text":
        (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in sorted(topics.values())))
        extra = {"source": "text", "files": str(tmp_path / "docs.jsonl")}
    dm = _dm(tiny_teacher, tmp_path / "cache", **extra)
    dm.setup()
    docs = _split_documents(dm)
    assert docs["val"] and docs["test"] and docs["train"]
    assert not docs["val"] & docs["test"] and not docs["train"] & (docs["val"] | docs["test"])
    # Drawn by a seeded shuffle, not corpus order: the test documents are spread over the corpus.
    test_index = sorted(dm.heldout_docs["test"])
    assert test_index != list(range(test_index[0], test_index[0] + len(test_index)))
    # Every held-out token is kept: the blocks' real tokens add up to the documents' tokens (EOS included).
    lengths = [len(tiny_teacher.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in docs["test"]]
    assert sum(int(x) for x in dm.test_set.with_format(None)["length"]) == sum(lengths)
    again = _dm(tiny_teacher, tmp_path / "other", **extra)
    again.setup()
    assert again.heldout_docs == dm.heldout_docs  # the same seed, the same documents


def test_a_run_resumed_with_another_split_is_refused(tiny_teacher, tmp_path):
    a = _dm(tiny_teacher, tmp_path)
    a.setup()
    state = a.state_dict()
    b = _dm(tiny_teacher, tmp_path, seed=7)
    b.setup()
    with pytest.raises(ConfigError, match=r"seed=7: the checkpoint was trained with seed=1234"):
        b.load_state_dict(state)
    a.load_state_dict(state)  # the same settings resume
