"""The long tail and the per-document scores of the held-out pass, checked against plain recomputations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.eval.heldout import (
    TAIL_BUCKETS,
    frequency_buckets,
    heldout_analysis,
    heldout_metrics,
    summarize_documents,
)

V, EOS = 16, 0


class Bigram(nn.Module):
    """A causal LM whose next-token logits depend on the current token only: cheap and exactly predictable."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def _stream(teacher: Bigram, n: int, seed: int) -> list[int]:
    """Tokens sampled from a sharpened teacher, so accuracy is neither 0 nor 1; EOS (0) ends documents."""
    g = torch.Generator().manual_seed(seed)
    out = [1]
    for _ in range(n - 1):
        probs = torch.softmax(3 * teacher.table[out[-1]].detach(), -1)
        out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out


def _batches(stream: list[int], block: int, batch: int) -> list[dict[str, torch.Tensor]]:
    blocks = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    return [{"input_ids": b, "labels": b.clone()} for b in blocks.split(batch)]


def test_buckets_split_the_training_tokens_in_thirds_by_rank():
    #            id:  0   1   2  3   4   5   6   7   8
    counts = torch.tensor([20, 5, 25, 0, 15, 10, 10, 5, 10])
    # Ranked: 2 (25), 0 (20) | 4 (15), 5 (10) | 6, 8 (10, ties by id), 1, 7 (5), 3 (0). The ids ranked before
    # each hold 0, .25 | .45, .60 | .70, .80, .90, .95, 1.0 of the 100 training tokens.
    common, middle, rare = 2, 1, 0
    expected = [common, rare, common, rare, middle, middle, rare, rare, rare]
    assert frequency_buckets(counts).tolist() == expected
    assert frequency_buckets(counts, 11).tolist() == expected + [rare, rare]  # ids past the counts: unseen
    assert frequency_buckets(counts, 4).tolist() == expected[:4]
    assert frequency_buckets(torch.zeros(5)).tolist() == [rare] * 5
    assert [TAIL_BUCKETS[i] for i in (common, middle, rare)] == ["common", "middle", "rare"]


def test_tail_and_documents_match_a_plain_recount():
    teacher, student = Bigram(0), Bigram(1)
    stream = _stream(teacher, 6 * 5 * 12, seed=2)
    batches = _batches(stream, block=12, batch=5)
    counts = torch.bincount(torch.tensor(_stream(teacher, 2000, seed=3)), minlength=V)
    res = heldout_analysis(
        {"teacher": teacher, "student": student}, teacher, batches, V, token_counts=counts, eos_token_id=EOS
    )
    assert res.metrics == heldout_metrics(
        {"teacher": teacher, "student": student}, teacher, batches, V, eos_token_id=EOS
    )

    # The same numbers position by position, in plain Python.
    bucket_of = frequency_buckets(counts).tolist()
    t_top = teacher.table.argmax(-1).tolist()
    s_top = student.table.argmax(-1).tolist()
    tail = {name: {b: [0, 0, 0] for b in TAIL_BUCKETS} for name in ("teacher", "student")}
    docs: dict[int, dict[str, int]] = {}
    doc = 0
    for i, tok in enumerate(stream[: len(stream) // 12 * 12]):
        if i % 12:  # a block's first token is context only
            prev = stream[i - 1]
            for name, top in (("teacher", t_top), ("student", s_top)):
                cell = tail[name][TAIL_BUCKETS[bucket_of[tok]]]
                cell[0] += top[prev] == t_top[prev]
                cell[1] += top[prev] == tok
                cell[2] += 1
            d = docs.setdefault(doc, {"tokens": 0, "s_agree": 0, "s_correct": 0, "t_correct": 0})
            d["tokens"] += 1
            d["s_agree"] += s_top[prev] == t_top[prev]
            d["s_correct"] += s_top[prev] == tok
            d["t_correct"] += t_top[prev] == tok
        doc += tok == EOS  # an EOS is the last token of its document
    assert sum(tail["student"][b][2] for b in TAIL_BUCKETS) == res.metrics["student"]["tokens"]
    for name in tail:
        for b, (agree, correct, n) in tail[name].items():
            got = res.tail[name][b]
            assert got["tokens"] == n
            if n:
                assert got["top1_agreement"] == pytest.approx(agree / n)
                assert got["accuracy"] == pytest.approx(correct / n)
    assert all(res.tail["teacher"][b].get("top1_agreement", 1.0) == 1.0 for b in TAIL_BUCKETS)
    assert 0 < res.tail["student"]["common"]["accuracy"] < 1  # the example is not degenerate

    assert len(docs) > 5 and [d["index"] for d in res.documents] == sorted(docs)
    for got in res.documents:
        want = docs[got["index"]]
        assert got["tokens"] == want["tokens"]
        assert got["student"]["top1_agreement"] == pytest.approx(want["s_agree"] / want["tokens"])
        assert got["student"]["accuracy"] == pytest.approx(want["s_correct"] / want["tokens"])
        assert got["teacher"]["accuracy"] == pytest.approx(want["t_correct"] / want["tokens"])


def test_documents_split_at_eos_across_blocks_and_batches():
    model = Bigram(0)
    # Three batches of one 6-token block each; documents: [5 6 0] [7 8 9 | 4 0] [3 0] [2 9 | 1 ...
    blocks = [[5, 6, 0, 7, 8, 9], [4, 0, 3, 0, 2, 9], [1, 1, 0, 5, 5, 5]]
    batches = [{"input_ids": torch.tensor([b]), "labels": torch.tensor([b])} for b in blocks]
    res = heldout_analysis({"m": model}, model, batches, V, eos_token_id=EOS)
    # Scored positions are every token but a block's first: doc 0 gets 6, 0; doc 1 gets 7 8 9 and 0
    # (4 is a block start); doc 2 gets 3 0; doc 3 gets 2 9 and 1 0 (1 is a block start); doc 4 gets 5 5 5.
    assert [(d["index"], d["tokens"]) for d in res.documents] == [(0, 2), (1, 4), (2, 2), (3, 4), (4, 3)]
    assert [d["head"] for d in res.documents] == [[5, 6], [7, 8, 9, 4], [3], [2, 9, 1, 1], [5, 5, 5]]
    assert sum(d["tokens"] for d in res.documents) == res.metrics["m"]["tokens"]
    assert heldout_analysis({"m": model}, model, batches, V).documents == []  # no EOS id, no documents


def test_document_summary_keeps_long_documents_only():
    docs = [
        {"tokens": t, "student": {"top1_agreement": a}}
        for t, a in [(40, 0.5), (100, 0.9), (31, 0.0), (32, 0.7), (64, 0.8), (50, 0.6)]
    ]
    got = summarize_documents(docs, min_tokens=32)
    long_ones = sorted([0.5, 0.9, 0.7, 0.8, 0.6])
    assert got["n"] == 5 and got["top1_agreement_min"] == 0.5  # the 31-token document at 0.0 is left out
    assert got["top1_agreement_median"] == pytest.approx(0.7)
    assert got["top1_agreement_p10"] == pytest.approx(long_ones[0] + 0.4 * (long_ones[1] - long_ones[0]))
    assert summarize_documents(docs[2:3], min_tokens=32) == {}


def test_token_counts_come_from_the_training_blocks_only(tiny_teacher, cache_dir):
    from collections import Counter

    from distill.data.datamodule import DistillDataModule

    dm = DistillDataModule(tiny_teacher.tokenizer, block_size=32, cache_dir=str(cache_dir / "data"))
    counts = dm.train_token_counts(chunk=4000)  # several chunks, the last one partial
    ids = dm.train_set[:]["input_ids"]
    assert len(ids) % 4000
    plain = Counter(ids.flatten().tolist())
    assert len(counts) >= len(tiny_teacher.tokenizer)
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(plain)
    assert int(counts.sum()) == ids.numel()  # no held-out token among them
    assert dm.train_token_counts() is counts  # computed once


def test_rows_add_up_to_the_totals_and_the_intervals_resample_sequences():
    teacher, student = Bigram(0), Bigram(1)
    batches = _batches(_stream(teacher, 6 * 5 * 12, seed=2), block=12, batch=5)
    batches[-1]["labels"][0, 6:] = -100  # a partly masked row: its tokens count as it has them
    res = heldout_analysis({"teacher": teacher, "student": student}, teacher, batches, V)
    for name, rows in res.rows.items():
        m = res.metrics[name]
        assert len(rows["tokens"]) == 30  # one entry per sequence, in order
        assert sum(rows["tokens"]) == m["tokens"] and rows["tokens"][-5] == 5  # 11 scored positions minus 6
        assert sum(rows["agree"]) / m["tokens"] == pytest.approx(m["top1_agreement"])
        assert sum(rows["kl"]) / m["tokens"] == pytest.approx(m["kl_to_teacher"])
        assert torch.tensor(sum(rows["nll"]) / m["tokens"]).exp().item() == pytest.approx(m["ppl"])
    s = res.metrics["student"]
    for metric in ("ppl", "kl_to_teacher", "top1_agreement"):
        low, high = s[f"{metric}_ci_low"], s[f"{metric}_ci_high"]
        assert low < s[metric] < high  # a real spread around the point estimate
    # The teacher agrees with itself with no uncertainty: only its perplexity has an interval.
    t = res.metrics["teacher"]
    assert "top1_agreement_ci_low" not in t and "kl_to_teacher_ci_low" not in t
    assert t["ppl_ci_low"] < t["ppl"] < t["ppl_ci_high"]
    # Resampling is seeded: the same pass gives the same intervals.
    again = heldout_analysis({"teacher": teacher, "student": student}, teacher, batches, V)
    assert again.metrics == res.metrics


def test_intervals_resample_documents_as_a_brute_force_bootstrap_does():
    import itertools

    import numpy as np

    from distill.eval.intervals import ratio_interval

    # Four documents of unequal length: the exact bootstrap distribution of the token-weighted agreement
    # enumerates all 4^4 resamples; 20,000 seeded resamples must land on its 2.5th and 97.5th percentiles.
    agree, tokens = [30.0, 5.0, 80.0, 12.0], [40.0, 20.0, 90.0, 30.0]
    exact = sorted(
        sum(agree[i] for i in pick) / sum(tokens[i] for i in pick) for pick in itertools.product(range(4), repeat=4)
    )
    low, high = ratio_interval(agree, tokens, resamples=20000)
    assert low == pytest.approx(np.percentile(exact, 2.5), abs=0.01)
    assert high == pytest.approx(np.percentile(exact, 97.5), abs=0.01)


def test_heldout_intervals_are_over_documents_not_blocks():
    # One long document over many blocks and a few short ones: resampling documents gives the interval of the
    # per-document sums, which is wider than resampling the blocks would be.
    teacher, student = Bigram(0), Bigram(1)
    stream = _stream(teacher, 4 * 5 * 12, seed=4)
    batches = _batches(stream, block=12, batch=5)
    res = heldout_analysis({"teacher": teacher, "student": student}, teacher, batches, V, eos_token_id=EOS)
    rows = res.rows["student"]
    assert rows["doc"] == [d["index"] for d in res.documents]
    assert sum(rows["tokens"]) == res.metrics["student"]["tokens"] and len(rows["tokens"]) == len(res.documents)
    from distill.eval.intervals import ratio_interval

    assert (
        res.metrics["student"]["top1_agreement_ci_low"],
        res.metrics["student"]["top1_agreement_ci_high"],
    ) == ratio_interval(rows["agree"], rows["tokens"])
    assert res.metrics["student"]["documents"] == len(res.documents)


def test_paired_difference_matches_documents_and_cancels_what_both_share():
    from distill.eval.heldout import paired_difference

    a = {"doc": [0, 1, 2, 3], "agree": [9.0, 1.0, 8.0, 2.0], "tokens": [10.0, 10.0, 10.0, 10.0]}
    b = {"doc": [3, 2, 1, 0], "agree": [1.0, 7.0, 0.0, 8.0], "tokens": [10.0, 10.0, 10.0, 10.0]}  # reordered
    diff, low, high, n = paired_difference(a, b)
    assert n == 4 and diff == pytest.approx(0.1)
    assert low > 0  # every document moves by +0.1: the pairing cancels how hard each document is
    assert low <= diff <= high
    with pytest.raises(ValueError, match="share no scored document"):
        paired_difference(a, {"doc": [9], "agree": [1.0], "tokens": [2.0]})
