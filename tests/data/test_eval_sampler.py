"""Validation split across ranks: together the ranks see exactly one process's batches, in equal counts."""

from __future__ import annotations

import pytest
import torch

from distill.data.datamodule import DistillDataModule
from distill.data.sampler import EvalBatchSampler, PaddedEvalSet


@pytest.mark.parametrize(
    ("n", "batch", "limit", "world"), [(10, 3, None, 2), (10, 3, 3, 2), (7, 2, None, 3), (4, 4, 8, 2)]
)
def test_ranks_share_one_process_batches_and_pad_to_equal_counts(n, batch, limit, world):
    single = list(EvalBatchSampler(n, batch, limit_batches=limit))
    shares = [list(EvalBatchSampler(n, batch, limit_batches=limit, world_size=world, rank=r)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # same number of forwards on every rank (FSDP's collectives)
    real = [b for s in shares for b in s if all(i < n for i in b)]
    padding = [b for s in shares for b in s if all(i >= n for i in b)]
    assert sorted(real) == sorted(single)  # each of one process's batches exactly once, none cut or merged
    assert len(real) + len(padding) == sum(len(s) for s in shares)  # no batch mixes real and padding rows
    assert len(padding) == world * len(shares[0]) - len(single)
    assert len(single) == min(-(-n // batch), limit or 10**9)


def test_padding_rows_keep_their_tokens_and_ignore_every_label():
    rows = [{"input_ids": torch.arange(4) + i} for i in range(3)]
    padded = PaddedEvalSet(rows)
    batch = DistillDataModule.collate([padded[0], padded[3 + 1]])
    torch.testing.assert_close(batch["input_ids"][1], rows[1]["input_ids"])
    assert (batch["labels"][0] == batch["input_ids"][0]).all()
    assert (batch["labels"][1] == -100).all()


def test_each_rank_of_a_trainer_validates_its_share_and_the_final_evaluation_everything(tiny_teacher, tmp_path):
    from types import SimpleNamespace

    dm = DistillDataModule(tiny_teacher.tokenizer, cache_dir=str(tmp_path), block_size=32, eval_batch_size=2)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, limit_val_batches=3)
    one = [b["input_ids"] for b in dm.val_dataloader()]
    assert len(one) == 3
    seen = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, limit_val_batches=3)
        batches = list(dm.val_dataloader())
        assert len(batches) == 2  # batches 0, 2 on rank 0; batch 1 and a padding batch on rank 1
        seen += [b["input_ids"] for b in batches if (b["labels"] != -100).any()]
    assert len(seen) == 3

    def order(t: torch.Tensor) -> float:
        return t.sum().item()

    for got, want in zip(sorted(seen, key=order), sorted(one, key=order), strict=True):
        torch.testing.assert_close(got, want)
    # The final evaluation reads the test split whole, whatever the trainer's split and limit.
    blocks = len(dm.test_set)
    assert sum(len(b["input_ids"]) for b in dm.heldout_dataloader()) == blocks


def test_a_capped_evaluation_reads_a_spread_over_documents_not_the_first_ones(tiny_teacher, tmp_path):
    dm = DistillDataModule(tiny_teacher.tokenizer, cache_dir=str(tmp_path), block_size=32, eval_batch_size=4)
    dm.setup("fit")
    docs = {int(d) for b in dm.heldout_dataloader("test", max_batches=5) for d in b["doc"]}
    first = {int(d) for i, b in enumerate(dm.stream_dataloader("test")) if i < 5 for d in b["doc"]}
    assert len(docs) == 20  # 20 blocks, each starting in another document
    assert len(first) < len(docs)  # the first 20 blocks in stream order start in fewer documents
    assert max(docs) > max(first)  # and reach past the split's first documents
