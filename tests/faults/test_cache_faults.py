"""Faults in the teacher cache's shard writes and the report's writes: whole files or none, and a clean rerun."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from distill.data.datamodule import DistillDataModule
from distill.eval.report import build_report, write_report
from distill.models import cache_builder
from distill.models.cache_builder import build_cache
from tests.faults.checks import temporaries
from tests.faults.inject import fail_call, full_disk

SMALL = {"top_k": 8, "max_blocks": 24, "blocks_per_shard": 8, "splits": ("train",), "progress": False}


@pytest.fixture
def dm(tiny_teacher, cache_dir):
    d = DistillDataModule(tiny_teacher.tokenizer, cache_dir=str(cache_dir / "data"), block_size=32)
    d.setup()
    return d


def _shards(folder) -> dict[str, dict[str, torch.Tensor]]:
    """Every shard file of a cache, loaded: a half-written one fails here."""
    return {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors"))}


def test_disk_full_while_writing_a_shard_then_the_build_is_resumed(tiny_teacher, dm, tmp_path, monkeypatch):
    whole = build_cache(tiny_teacher, dm, tmp_path / "whole", **SMALL)
    calls = fail_call(monkeypatch, cache_builder, "save_file", call=2, disk_bytes=4096)
    with pytest.raises(Exception, match="File too large"):
        build_cache(tiny_teacher, dm, tmp_path / "c", **SMALL)
    assert calls == [1, 2]
    assert sorted(_shards(tmp_path / "c")) == ["train-00000.safetensors"]  # the first, whole; the second absent
    assert not json.loads((tmp_path / "c" / "manifest.json").read_text())["complete"]
    assert temporaries(tmp_path / "c") == []
    monkeypatch.undo()
    resumed = build_cache(tiny_teacher, dm, tmp_path / "c", **SMALL)
    assert resumed["complete"] and resumed["splits"] == whole["splits"]
    a, b = _shards(tmp_path / "whole"), _shards(tmp_path / "c")
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=0)


def test_two_builders_of_one_shard_never_publish_each_others_half_written_file(tiny_teacher, dm, tmp_path, monkeypatch):
    """Builder B is halfway through writing shard 0 when builder A publishes its own copy of it.

    With one temporary name for both (``.train-00000.safetensors.tmp``), A's rename published B's half file.
    """
    real = cache_builder.save_file
    shard = tmp_path / "c" / "train-00000.safetensors"
    a_written, b_halfway, a_published = threading.Event(), threading.Event(), threading.Event()
    seen, errors = [], []

    def scheduled(tensors, filename, metadata=None):
        if threading.current_thread().name == "A":
            real(tensors, filename, metadata=metadata)
            if not a_written.is_set():
                a_written.set()
                b_halfway.wait(60)  # B writes half of its copy now
            return
        if not b_halfway.is_set():
            with open(filename, "wb") as fh:  # B's file, halfway
                fh.write(b"\x00" * 64)
            b_halfway.set()
            a_published.wait(60)
            seen.append(_shards(tmp_path / "c")["train-00000.safetensors"]["topk_indices"].shape)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(cache_builder, "save_file", scheduled)

    def builder(name: str) -> None:
        try:
            if name == "B":
                a_written.wait(60)  # A has scored shard 0 and written it under its temporary name
            build_cache(tiny_teacher, dm, tmp_path / "c", **SMALL)
        except Exception as err:
            errors.append(err)
        finally:
            if name == "A":
                a_published.set()

    threads = [threading.Thread(target=builder, args=(n,), name=n) for n in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert seen == [torch.Size([8, 32, 8])]  # A's shard 0, whole, while B was halfway through its own
    assert shard.is_file() and len(_shards(tmp_path / "c")) == 3
    assert temporaries(tmp_path / "c") == []


def test_disk_full_while_writing_the_report_keeps_the_previous_one(tmp_path):
    teacher, student = {"heldout/ppl": 10.0}, {"heldout/ppl": 12.0}
    report = build_report(teacher, student, [{"kind": "distillation", "config": {}}], {"seed": 1}, {})
    write_report({**report, "run": {"n": 1}}, tmp_path)
    before = (tmp_path / "report.json").read_bytes(), (tmp_path / "report.md").read_bytes()
    bigger = {**report, "run": {"n": 2, "notes": "x" * 20_000}}
    with pytest.raises(OSError, match="File too large"), full_disk(4096):
        write_report(bigger, tmp_path)
    assert ((tmp_path / "report.json").read_bytes(), (tmp_path / "report.md").read_bytes()) == before
    assert temporaries(tmp_path) == []
    write_report(bigger, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["run"]["n"] == 2
