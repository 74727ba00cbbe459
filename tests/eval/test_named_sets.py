"""The report's held-out sets: the whole test split by default, a capped spread, the shipped English set, a user's."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from distill.config import ConfigError
from distill.data.datamodule import DistillDataModule
from distill.data.named_sets import load_set
from distill.eval.assess import build_heldout


@pytest.fixture
def dm(tiny_teacher, tmp_path):
    data = DistillDataModule(tiny_teacher.tokenizer, cache_dir=str(tmp_path / "data"), block_size=32, eval_batch_size=8)
    data.setup()
    return data


def _docs(loader) -> set[int]:
    return {int(d) for batch in loader for d in batch["doc"]}


def _settings(**kw) -> OmegaConf:
    return OmegaConf.create({"heldout": {"test": "split"}, "max_batches": None, **kw})


def test_the_default_evaluation_reads_every_test_block_and_every_document(dm, tiny_teacher, tmp_path):
    (test,) = build_heldout(_settings(), dm, tiny_teacher.tokenizer, tmp_path)
    blocks = [b for batch in test.loader for b in batch["block"].tolist()]
    assert sorted(blocks) == list(range(len(dm.test_set)))  # every block once
    # Every test document has a scored token: the documents the blocks start in, and the ones inside them.
    starts = _docs(test.loader)
    assert len(starts) <= test.about["documents"] == len(dm.heldout_docs["test"])
    capped = build_heldout(_settings(max_batches=3), dm, tiny_teacher.tokenizer, tmp_path)[0]
    assert len(capped.loader) == 3 and len(_docs(capped.loader)) == 24  # a spread: 24 blocks, 24 documents


def test_the_shipped_english_set_and_a_users_files_are_packed_whole(dm, tiny_teacher, tmp_path):
    english = load_set("english", "distill:data/heldout_sets/*.jsonl", tiny_teacher.tokenizer, 32, tmp_path)
    assert english.documents == 115
    lengths = sum(int(x) for x in english.blocks.with_format(None)["length"])
    from tests.conftest import ROOT

    folder = ROOT / "distill" / "data" / "heldout_sets"
    texts = [json.loads(line)["text"] for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]
    tokens = sum(len(tiny_teacher.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert lengths == tokens  # every token of every document, EOS included, and nothing else
    (tmp_path / "mine.txt").write_text("First line of my own held-out text.\nA second document, shorter.\n")
    sets = build_heldout(
        OmegaConf.create({"heldout": {"test": "split", "mine": str(tmp_path / "mine.txt")}, "max_batches": None}),
        dm,
        tiny_teacher.tokenizer,
        tmp_path,
    )
    assert [s.name for s in sets] == ["test", "mine"] and sets[1].about["documents"] == 2


@pytest.mark.parametrize(
    ("heldout", "message"),
    [
        ({"mine": "x.txt"}, r"eval.heldout=.*name the run's test split first"),
        ({"test": "split", "bad": 3}, r"eval.heldout.bad=3: give 'split'"),
        ({"test": "split", "bad": {"files": "a.txt", "colour": 1}}, r"eval.heldout.bad=.*unknown keys \['colour'\]"),
        ({"test": "split", "gone": "/no/such/*.txt"}, r"eval.heldout.gone=.*matches no file"),
    ],
)
def test_bad_heldout_sets_are_refused_naming_the_set(dm, tiny_teacher, tmp_path, heldout, message):
    with pytest.raises(ConfigError, match=message):
        build_heldout(OmegaConf.create({"heldout": heldout, "max_batches": None}), dm, tiny_teacher.tokenizer, tmp_path)
    with pytest.raises(ConfigError, match=r"eval.max_batches=0"):
        build_heldout(_settings(max_batches=0), dm, tiny_teacher.tokenizer, tmp_path)
