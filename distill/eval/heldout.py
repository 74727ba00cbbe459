"""Held-out evaluation of teacher and student: perplexity, KL to the teacher, top-1 agreement.

One pass over the held-out batches also breaks agreement and accuracy down by how frequent the label
token was in the training split (the long tail) and by held-out document.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.eval.intervals import ratio_interval
from distill.objective.divergences import IGNORE_INDEX

TAIL_BUCKETS = ("rare", "middle", "common")
MIN_DOC_TOKENS = 32  # documents shorter than this are listed but left out of the summary statistics
_HEAD_TOKENS = 24  # tokens kept from each document's start, enough to decode a ~60-character preview


def frequency_buckets(counts: Tensor, size: int | None = None) -> Tensor:
    """The long-tail bucket of every token id, from its count in the training split.

    Token ids are ranked by training count, most frequent first (ties by ascending id, so the ranking is
    deterministic), and cut where the cumulative count crosses one third and two thirds of all training
    tokens: a token is ``common`` when the tokens ranked before it hold less than a third of the training
    tokens, ``middle`` when they hold less than two thirds, and ``rare`` otherwise. Each bucket therefore
    covers about a third of the training tokens (``common`` is a few dozen very frequent ids, ``rare`` the
    long tail of thousands), so on held-out text drawn like the training text each holds about a third of
    the scored tokens. Ids never seen in training, and ids past the end of ``counts``, are always ``rare``.

    Args:
        counts: training count per token id (``DistillDataModule.train_token_counts``).
        size: length of the result (the vocabulary scored); defaults to ``len(counts)``.

    Returns:
        A long tensor of length ``size``: the index into :data:`TAIL_BUCKETS` (0 rare, 1 middle, 2 common).

    """
    counts = counts.detach().to("cpu", torch.float64).flatten()
    size = len(counts) if size is None else size
    buckets = torch.zeros(max(size, len(counts)), dtype=torch.long)
    total = float(counts.sum())
    if total > 0:
        order = torch.sort(counts, descending=True, stable=True).indices
        before = (torch.cumsum(counts[order], 0) - counts[order]) / total  # share held by higher-ranked ids
        ranked = torch.where(before < 1 / 3, 2, torch.where(before < 2 / 3, 1, 0))
        ranked[counts[order] == 0] = 0
        buckets[order] = ranked
    return buckets[:size]


@dataclass
class Heldout:
    """Everything one held-out pass measures.

    Attributes:
        metrics: name → {``ppl``, ``kl_to_teacher``, ``top1_agreement``, ``tokens``}.
        tail: name → bucket (:data:`TAIL_BUCKETS`) → {``top1_agreement``, ``accuracy``, ``tokens``}; empty
            without training token counts. A bucket with no scored token has only ``tokens`` (0).
        documents: one entry per held-out document in stream order: ``index``, ``tokens`` (scored
            positions), ``head`` (its first token ids) and name → {``top1_agreement``, ``accuracy``};
            empty without an EOS id.
        rows: name → {``nll``, ``kl``, ``agree``, ``tokens``}: per held-out sequence (batch row, in
            order), the summed NLL, KL and agreements over its scored tokens. The metrics' intervals
            resample these rows; two models scored on the same rows can be compared pairwise
            (``bench/kd_vs_ce.py``).

    """

    metrics: dict[str, dict[str, float]]
    tail: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    documents: list[dict[str, Any]] = field(default_factory=list)
    rows: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@torch.no_grad()
def heldout_metrics(
    models: dict[str, nn.Module],
    teacher: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    vocab_size: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """Score each model against the held-out labels and against the teacher, token by token.

    Args:
        models: name → causal LM to score (the teacher itself may be among them).
        teacher: the reference model for KL and agreement.
        batches: batches with ``input_ids``, ``labels`` and optionally ``attention_mask``.
        vocab_size: vocabulary compared (the shared prefix of both output layers).
        max_batches: stop after this many batches.
        device: where to run.

    Returns:
        name → {``ppl``, ``kl_to_teacher`` (KL(teacher‖model), nats per token), ``top1_agreement``, ``tokens``},
        each metric with its 95 % interval over held-out sequences (``<metric>_ci_low`` / ``_ci_high``; the
        teacher's own agreement and KL, 1 and 0 by definition, have none).

    """
    return heldout_analysis(models, teacher, batches, vocab_size, max_batches=max_batches, device=device).metrics


@torch.no_grad()
def heldout_analysis(
    models: dict[str, nn.Module],
    teacher: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    vocab_size: int,
    *,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    token_counts: Tensor | None = None,
    eos_token_id: int | None = None,
    shard: tuple[int, int] | None = None,
) -> Heldout | None:
    """:func:`heldout_metrics`, plus the long-tail buckets and the per-document scores, in the same pass.

    Args:
        models: name → causal LM to score (the teacher itself may be among them).
        teacher: the reference model for KL and agreement.
        batches: batches with ``input_ids``, ``labels`` and optionally ``attention_mask``; for the
            per-document scores, packed documents each ending in ``eos_token_id``, in stream order.
        vocab_size: vocabulary compared (the shared prefix of both output layers).
        max_batches: stop after this many batches.
        device: where to run.
        token_counts: training count per token id; buckets the label tokens (:func:`frequency_buckets`).
        eos_token_id: the id that ends each packed document; a label token belongs to the document it is
            in (an EOS to the document it ends).
        shard: ``(rank, world_size)`` to split the batches across the ranks of a process group: every rank
            must call this with the same batches and models; rank ``r`` scores batches ``r, r+W, ...``, and
            rank 0 merges the ranks' sums into the one-process result (the others get ``None``).

    Returns:
        The scores; ``tail`` and ``documents`` stay empty without ``token_counts`` / ``eos_token_id``.

    """
    buckets = None if token_counts is None else frequency_buckets(token_counts, vocab_size).to(device)
    tally = _Tally(list(models), buckets, eos_token_id, {n for n, m in models.items() if m is teacher})
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    rank, world = shard or (0, 1)
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            # Every rank walks every batch for the document bookkeeping (cheap); only its own are scored.
            _accumulate(tally, models, teacher, batch, vocab_size, device, score=i % world == rank)
    finally:
        for name, m in models.items():
            m.train(was_training[name])
    if shard is not None:
        tally = _merged_on_rank_zero(tally, rank, world)
        if tally is None:
            return None
    if tally.count == 0:
        raise ValueError("held-out evaluation saw no tokens")
    return tally.result()


def _merged_on_rank_zero(tally: _Tally, rank: int, world: int) -> _Tally | None:
    """Rank 0's tally with every rank's sums added, rows in batch order (a collective; None on other ranks)."""
    import torch.distributed as dist

    parts: list[_Tally | None] = [None] * world if rank == 0 else []
    dist.gather_object(tally, parts if rank == 0 else None, dst=0)
    if rank != 0:
        return None
    merged = parts[0]
    for part in parts[1:]:
        merged.count += part.count
        for name in merged.names:
            for key in merged.sums[name]:
                merged.sums[name][key] += part.sums[name][key]
            merged.tail[name] += part.tail[name]
        for d, entry in part.docs.items():  # heads are the same on every rank (all batches were walked)
            mine = merged.docs.setdefault(d, {"tokens": 0, "head": entry["head"]})
            mine["tokens"] += entry["tokens"]
            for name in merged.names:
                if name in entry:
                    side = mine.setdefault(name, {"agree": 0.0, "correct": 0.0})
                    side["agree"] += entry[name]["agree"]
                    side["correct"] += entry[name]["correct"]
    # Rank r scored batches r, r+W, ...: put the per-sequence rows back in the one-process order.
    for name in merged.names:
        scored = sorted((b, i, p) for p in parts for i, b in enumerate(p.batches))
        merged.rows[name] = [p.rows[name][i] for _, i, p in scored]
    return merged


class _Tally:
    """Running sums over the held-out batches: totals, per-bucket and per-document counts per model."""

    def __init__(self, names: list[str], buckets: Tensor | None, eos: int | None, references: set[str]) -> None:
        self.names, self.buckets, self.eos, self.references = names, buckets, eos, references
        self.count = 0
        self.sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in names}
        # Per model, per held-out sequence: (nll, kl, agreements, tokens) summed over its scored positions.
        self.rows: dict[str, list[Tensor]] = {name: [] for name in names}
        n = len(TAIL_BUCKETS)
        # Per model: (agreements, correct predictions, tokens) per bucket, kept as tensors until the end.
        self.tail = {name: torch.zeros(3, n, dtype=torch.float64) for name in names}
        self.docs: dict[int, dict[str, Any]] = {}
        self.next_doc = 0  # document index of the next token in the held-out stream
        self.batches: list[int] = []  # the index of each batch scored, in order (one rows entry each)
        self.seen = 0  # batches walked, scored or not

    def document_ids(self, ids: Tensor) -> Tensor:
        """Each position's document index: EOS tokens seen before it in the stream (rows in order)."""
        flat = ids.flatten()
        ends = (flat == self.eos).long()
        doc = self.next_doc + torch.cumsum(ends, 0) - ends  # an EOS still belongs to the document it ends
        self.next_doc += int(ends.sum())
        return doc.view_as(ids)

    def add_heads(self, ids: Tensor, doc: Tensor) -> None:
        """Keep each document's first tokens (EOS excluded) for a text preview."""
        flat_ids, flat_doc = ids.flatten().tolist(), doc.flatten().tolist()
        for t, d in zip(flat_ids, flat_doc, strict=True):
            head = self.docs.setdefault(d, {"tokens": 0, "head": []})["head"]
            if len(head) < _HEAD_TOKENS and t != self.eos:
                head.append(t)

    def add_documents(self, name: str, doc: Tensor, agree: Tensor, correct: Tensor, first: bool) -> None:
        """Add one batch's per-document agreements and correct predictions (of the real label positions)."""
        if doc.numel() == 0:
            return
        base = int(doc.min())
        local = (doc - base).cpu()
        agree_sum = torch.bincount(local, weights=agree.double().cpu())
        correct_sum = torch.bincount(local, weights=correct.double().cpu())
        tokens = torch.bincount(local)
        for j in torch.nonzero(tokens).flatten().tolist():
            entry = self.docs.setdefault(base + j, {"tokens": 0, "head": []})
            if first:  # the scored positions are the same for every model: count them once
                entry["tokens"] += int(tokens[j])
            side = entry.setdefault(name, {"agree": 0.0, "correct": 0.0})
            side["agree"] += float(agree_sum[j])
            side["correct"] += float(correct_sum[j])

    def result(self) -> Heldout:
        """Means of the running sums."""
        metrics = {
            name: {
                "ppl": math.exp(s["nll"] / self.count),
                "kl_to_teacher": s["kl"] / self.count,
                "top1_agreement": s["agree"] / self.count,
                "tokens": float(self.count),
            }
            for name, s in self.sums.items()
        }
        rows = {}
        for name in self.names:
            nll, kl, agree, tokens = torch.cat(self.rows[name]).T.tolist() if self.rows[name] else ([],) * 4
            rows[name] = {"nll": nll, "kl": kl, "agree": agree, "tokens": tokens}
            metrics[name].update(_intervals(rows[name], reference=name in self.references))
        tail = {}
        if self.buckets is not None:
            for name, (agree, correct, tokens) in self.tail.items():
                tail[name] = {
                    bucket: (
                        {
                            "top1_agreement": float(agree[b] / tokens[b]),
                            "accuracy": float(correct[b] / tokens[b]),
                            "tokens": float(tokens[b]),
                        }
                        if tokens[b] > 0
                        else {"tokens": 0.0}
                    )
                    for b, bucket in enumerate(TAIL_BUCKETS)
                }
        documents = [
            {
                "index": d,
                "tokens": e["tokens"],
                "head": e["head"],
                **{
                    name: {
                        "top1_agreement": e[name]["agree"] / e["tokens"],
                        "accuracy": e[name]["correct"] / e["tokens"],
                    }
                    for name in self.names
                },
            }
            for d, e in sorted(self.docs.items())
            if e["tokens"] > 0  # a document seen only as a block's unscored first token
        ]
        return Heldout(metrics, tail, documents, rows)


def _intervals(rows: dict[str, list[float]], reference: bool) -> dict[str, float]:
    """95 % intervals of ppl, KL and agreement, resampling whole held-out sequences (a cluster bootstrap).

    Tokens of one sequence share their context, so resampling tokens would make the interval too narrow.
    A model's agreement with itself (the teacher) is 1 and its KL 0 with no uncertainty: no interval.
    """
    if len(rows["tokens"]) < 2:
        return {}  # one sequence: nothing to resample
    out = {}
    pairs = [("ppl", "nll", math.exp)] + (
        [] if reference else [("kl_to_teacher", "kl", None), ("top1_agreement", "agree", None)]
    )
    for metric, key, transform in pairs:
        low, high = ratio_interval(rows[key], rows["tokens"], transform)
        out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = low, high
    return out


def _accumulate(
    tally: _Tally,
    models: dict[str, nn.Module],
    teacher: nn.Module,
    batch: dict[str, Tensor],
    vocab_size: int,
    device: torch.device | str,
    score: bool = True,
) -> None:
    """Add one batch's summed NLL, KL and agreement per model (and its buckets and documents) to ``tally``.

    With ``score=False`` only the document bookkeeping runs (another rank scores this batch).
    """
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = mask.to(device) if mask is not None else None
    labels = batch["labels"].to(device)[:, 1:]
    real = labels != IGNORE_INDEX
    doc = None
    if tally.eos is not None:
        positions = tally.document_ids(batch["input_ids"])
        tally.add_heads(batch["input_ids"], positions)
        doc = positions[:, 1:].to(device)[real]
    tally.seen += 1
    if not score:
        return
    tally.batches.append(tally.seen - 1)
    bucket = None if tally.buckets is None else tally.buckets[labels.clamp(0, len(tally.buckets) - 1)][real]
    t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab_size].float()
    t_logp = F.log_softmax(t_logits, -1)
    t_top = t_logp.argmax(-1)
    for k, (name, model) in enumerate(models.items()):
        logits = (
            t_logits
            if model is teacher
            else model(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab_size].float()
        )
        logp = F.log_softmax(logits, -1)
        nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
        top = logp.argmax(-1)
        agree = (top == t_top)[real]
        correct = (top == labels)[real]
        s = tally.sums[name]
        s["nll"] += float(nll[real].sum())
        s["kl"] += float(kl[real].sum())
        s["agree"] += float(agree.sum())
        per_row = [(nll * real).sum(1), (kl * real).sum(1), ((top == t_top) & real).sum(1), real.sum(1)]
        keep = real.any(1)  # a row of padding only has nothing to resample
        tally.rows[name].append(torch.stack([r.double() for r in per_row], 1)[keep].cpu())
        if bucket is not None:
            n = len(TAIL_BUCKETS)
            for row, hits in enumerate((agree, correct, torch.ones_like(agree))):
                tally.tail[name][row] += torch.bincount(bucket, weights=hits.double(), minlength=n).cpu()
        if doc is not None:
            tally.add_documents(name, doc, agree, correct, first=k == 0)
    tally.count += int(real.sum())


def summarize_documents(
    documents: Sequence[dict[str, Any]], name: str = "student", min_tokens: int = MIN_DOC_TOKENS
) -> dict[str, float]:
    """The spread of one model's per-document top-1 agreement over documents with ``min_tokens`` scored tokens.

    Returns:
        ``top1_agreement_min``, ``top1_agreement_p10`` (10th percentile, linear interpolation),
        ``top1_agreement_median`` and ``n`` (documents counted); empty when no document is long enough.

    """
    values = [d[name]["top1_agreement"] for d in documents if d["tokens"] >= min_tokens and name in d]
    if not values:
        return {}
    v = torch.tensor(values, dtype=torch.float64)
    return {
        "top1_agreement_min": float(v.min()),
        "top1_agreement_p10": float(torch.quantile(v, 0.1)),
        "top1_agreement_median": float(torch.quantile(v, 0.5)),
        "n": float(len(values)),
    }


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table, one row per model, for the console and the logs."""
    header = f"{'model':<10} {'ppl':>10} {'kl_to_teacher':>14} {'top1_agreement':>15} {'tokens':>8}"
    rows = [header, "-" * len(header)]
    for name, r in results.items():
        rows.append(
            f"{name:<10} {r['ppl']:>10.3f} {r['kl_to_teacher']:>14.4f} {r['top1_agreement']:>15.4f} "
            f"{int(r['tokens']):>8d}"
        )
    return "\n".join(rows)


@torch.no_grad()
def generation_fidelity(
    model: nn.Module, reference: nn.Module, prompts: Tensor, new_tokens: int = 16
) -> dict[str, float]:
    """Greedy continuations of held-out prompts by ``model`` against ``reference`` (the teacher).

    Returns the share of prompts whose whole continuation matches (``exact_match``) and the share of
    continuation positions with the same token (``token_agreement``).
    """
    outs = []
    for m in (model, reference):
        m.eval()
        out = m.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        outs.append(out[:, prompts.shape[1] :])
    same = outs[0] == outs[1]
    return {"exact_match": same.all(-1).float().mean().item(), "token_agreement": same.float().mean().item()}
