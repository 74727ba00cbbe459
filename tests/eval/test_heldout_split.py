"""The held-out pass split across 2 gloo ranks gives rank 0 exactly the one-process result."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaForCausalLM

from distill.eval.heldout import heldout_analysis
from tests.helpers import free_port, tiny_llama

EOS = 3


def _models() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    return tiny_llama(0, vocab_size=64).eval(), tiny_llama(1, vocab_size=64).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(5):  # odd: rank 0 scores 3 batches, rank 1 scores 2
        ids = torch.randint(4, 64, (2, 16), generator=g)
        ids[ids % 7 == 0] = EOS  # documents end inside and across batches
        labels = ids.clone()
        labels[1, -3:] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _analysis(shard):
    teacher, student = _models()
    return heldout_analysis(
        {"teacher": teacher, "student": student},
        teacher,
        _batches(),
        64,
        token_counts=torch.arange(64.0),
        eos_token_id=EOS,
        shard=shard,
    )


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = _analysis((rank, 2))
        if rank == 0:
            torch.save(result, out)
        else:
            assert result is None
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_ranks_merge_to_the_one_process_result(tmp_path):
    out = tmp_path / "split.pt"
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=2)
    split, whole = torch.load(out, weights_only=False), _analysis(None)
    assert split.metrics.keys() == whole.metrics.keys()
    for name in whole.metrics:
        assert split.metrics[name] == pytest.approx(whole.metrics[name], rel=1e-9), name
    assert split.tail == whole.tail  # counts: exact
    assert split.rows == whole.rows  # per-sequence rows in the one-process order
    assert split.documents == whole.documents
    assert len(whole.documents) > 3 and whole.metrics["student"]["tokens"] > 100
