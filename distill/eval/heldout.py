"""Held-out evaluation of teacher and student: perplexity, KL to the teacher, top-1 agreement.

One pass over the held-out batches also breaks agreement and accuracy down by how frequent the label
token was in the training split (the long tail) and by held-out document.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.eval.intervals import ratio_interval
from distill.objective.divergences import IGNORE_INDEX

log = logging.getLogger("distill")

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
        metrics: name → {``ppl``, ``kl_to_teacher``, ``top1_agreement``, ``tokens``, ``documents``}, each rate
            with its 95 % interval over documents (``<metric>_ci_low`` / ``_ci_high``).
        tail: name → bucket (:data:`TAIL_BUCKETS`) → {``top1_agreement``, ``accuracy``, ``tokens``} with
            intervals over documents; empty without training token counts. A bucket with no scored token has only
            ``tokens`` (0).
        documents: one entry per held-out document: ``index``, ``tokens`` (scored positions), ``head`` (its
            first token ids) and name → {``top1_agreement``, ``accuracy``}; empty without an EOS id.
        rows: name → {``doc``, ``nll``, ``kl``, ``agree``, ``correct``, ``tokens``}: per held-out document (per
            batch row when the batches carry no documents), the summed scores over its scored tokens. The
            intervals resample these units; two models scored on the same documents can be compared pairwise
            (:func:`paired_difference`).

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
    eos_token_id: int | None = None,
) -> dict[str, dict[str, float]]:
    """Score each model against the held-out labels and against the teacher, token by token.

    Args:
        models: name → causal LM to score (the teacher itself may be among them).
        teacher: the reference model for KL and agreement.
        batches: batches with ``input_ids``, ``labels`` and optionally ``attention_mask``, ``doc``.
        vocab_size: vocabulary compared (the shared prefix of both output layers).
        max_batches: stop after this many batches.
        device: where to run.
        eos_token_id: the id that ends each packed document (the intervals then resample documents).

    Returns:
        name → {``ppl``, ``kl_to_teacher`` (KL(teacher‖model), nats per token), ``top1_agreement``, ``tokens``,
        ``documents``}, each metric with its 95 % interval (``<metric>_ci_low`` / ``_ci_high``; the teacher's own
        agreement and KL, 1 and 0 by definition, have none).

    """
    return heldout_analysis(
        models, teacher, batches, vocab_size, max_batches=max_batches, device=device, eos_token_id=eos_token_id
    ).metrics


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
        batches: batches with ``input_ids``, ``labels`` and optionally ``attention_mask``. Documents are found
            from ``eos_token_id``: a batch with ``doc`` (each row's first document, as the datamodule's held-out
            splits give) and ``block`` (each row's place in the split) may come in any order; a batch without
            them is read as a stream, documents in order.
        vocab_size: vocabulary compared (the shared prefix of both output layers).
        max_batches: stop after this many batches.
        device: where to run.
        token_counts: training count per token id; buckets the label tokens (:func:`frequency_buckets`).
        eos_token_id: the id that ends each packed document; a label token belongs to the document it is
            in (an EOS to the document it ends). Without it every batch row is its own unit.
        shard: ``(rank, world_size)`` to split the batches across the ranks of a process group: every rank
            must call this with the same batches and models; rank ``r`` scores batches ``r, r+W, ...``, and
            rank 0 merges the ranks' sums into the one-process result (the others get ``None``).

    Returns:
        The scores; ``tail`` stays empty without ``token_counts``, ``documents`` without ``eos_token_id``.

    """
    buckets = None if token_counts is None else frequency_buckets(token_counts, vocab_size).to(device)
    tally = _Tally(list(models), buckets, eos_token_id, {n for n, m in models.items() if m is teacher})
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    rank, world = shard or (0, 1)
    try:
        _walk(tally, models, teacher, batches, vocab_size, device, max_batches, rank, world)
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


def _walk(
    tally: _Tally,
    models: dict[str, nn.Module],
    teacher: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    vocab_size: int,
    device: torch.device | str,
    max_batches: int | None,
    rank: int,
    world: int,
) -> None:
    """Score ``batches`` into ``tally``: every rank walks every batch, rank ``r`` scores ``r, r+W, ...``."""
    total = len(batches) if hasattr(batches, "__len__") else None
    started = time.perf_counter()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if i and i % 10 == 0 and rank == 0:  # a whole split takes minutes on a CPU: say how far it is
            log.info("held-out pass: batch %d/%s, %.0f s", i, total or "?", time.perf_counter() - started)
        # Every rank walks every batch for the document bookkeeping (cheap); only its own are scored.
        _accumulate(tally, models, teacher, batch, vocab_size, device, score=i % world == rank)


def _merged_on_rank_zero(tally: _Tally, rank: int, world: int) -> _Tally | None:
    """Rank 0's tally with every rank's sums added (a collective; None on other ranks)."""
    import torch.distributed as dist

    parts: list[_Tally | None] = [None] * world if rank == 0 else []
    dist.gather_object(tally, parts if rank == 0 else None, dst=0)
    if rank != 0:
        return None
    merged = parts[0]
    for part in parts[1:]:
        merged.count += part.count
        for unit, entry in part.units.items():
            mine = merged.units.setdefault(unit, {"tokens": 0.0})
            mine["tokens"] += entry["tokens"]
            for name in merged.names:
                if name in entry:
                    mine[name] = mine[name] + entry[name] if name in mine else entry[name].clone()
        for d, head in part.heads.items():  # heads are the same on every rank (all batches were walked)
            merged.heads.setdefault(d, head)
    return merged


# Per model and unit (document, or batch row), summed over its scored tokens: NLL, KL, agreements, correct
# predictions, then agreements, correct predictions and tokens per long-tail bucket.
_SUMS = ("nll", "kl", "agree", "correct")
_N_SUMS = len(_SUMS) + 3 * len(TAIL_BUCKETS)


class _Tally:
    """Running sums over the held-out batches, per model and per unit (document, or batch row)."""

    def __init__(self, names: list[str], buckets: Tensor | None, eos: int | None, references: set[str]) -> None:
        self.names, self.buckets, self.eos, self.references = names, buckets, eos, references
        self.count = 0
        # unit → {"tokens": scored tokens, name: float64 tensor of the _N_SUMS sums}
        self.units: dict[int, dict[str, Any]] = {}
        self.heads: dict[int, list[tuple[int, int]]] = {}  # unit → (stream position, token) of its first tokens
        self.next_doc = 0  # stream reading: the document index of the next token
        self.next_row = 0  # no EOS: the next batch row's unit
        self.streamed = 0  # stream reading: tokens walked so far (positions for the heads)

    def units_of(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Each position's unit and stream position (a batch with ``doc``/``block`` may come in any order)."""
        ids = batch["input_ids"]
        rows, width = ids.shape
        if self.eos is None:
            unit = torch.arange(self.next_row, self.next_row + rows).unsqueeze(1).expand(rows, width)
            self.next_row += rows
            return unit, torch.arange(rows * width).view(rows, width)
        ends = (ids == self.eos).long()
        if "doc" in batch:
            # An EOS still belongs to the document it ends; each row starts in its own ``doc``.
            unit = batch["doc"].unsqueeze(1) + torch.cumsum(ends, 1) - ends
            where = batch["block"].unsqueeze(1) * width + torch.arange(width)
            return unit, where
        flat = ends.flatten()
        unit = self.next_doc + torch.cumsum(flat, 0) - flat
        self.next_doc += int(flat.sum())
        where = self.streamed + torch.arange(flat.numel())
        self.streamed += flat.numel()
        return unit.view_as(ids), where.view_as(ids)

    def add_heads(self, ids: Tensor, unit: Tensor, where: Tensor) -> None:
        """Keep each document's first tokens (EOS excluded), by stream position, for a text preview."""
        keep = ids != self.eos if self.eos is not None else torch.ones_like(ids, dtype=torch.bool)
        for u, w, t in zip(unit[keep].tolist(), where[keep].tolist(), ids[keep].tolist(), strict=True):
            head = self.heads.setdefault(u, [])
            if (len(head) < _HEAD_TOKENS or w < head[-1][0]) and all(w != p for p, _ in head):
                head.append((w, t))
                head.sort()
                del head[_HEAD_TOKENS:]

    def add(self, name: str, unit: Tensor, values: Tensor, first: bool) -> None:
        """Add per-position ``values`` (positions × _N_SUMS) to their units; count the tokens once (``first``)."""
        if unit.numel() == 0:
            return
        base = int(unit.min())
        local = (unit - base).cpu()
        n = int(local.max()) + 1
        sums = torch.zeros(n, _N_SUMS, dtype=torch.float64).index_add_(0, local, values.double().cpu())
        tokens = torch.bincount(local, minlength=n)
        for j in torch.nonzero(tokens).flatten().tolist():
            entry = self.units.setdefault(base + j, {"tokens": 0.0})
            if first:  # the scored positions are the same for every model
                entry["tokens"] += float(tokens[j])
            entry[name] = entry[name] + sums[j] if name in entry else sums[j].clone()

    def result(self) -> Heldout:
        """Totals, intervals over units, the long tail and the documents."""
        order = sorted(u for u, e in self.units.items() if e["tokens"] > 0)
        tokens = torch.tensor([self.units[u]["tokens"] for u in order], dtype=torch.float64)
        metrics, tail, rows = {}, {}, {}
        for name in self.names:
            table = torch.stack([self.units[u][name] for u in order])  # units × _N_SUMS
            nll, kl, agree, correct = table[:, 0], table[:, 1], table[:, 2], table[:, 3]
            total = float(tokens.sum())
            metrics[name] = {
                "ppl": math.exp(float(nll.sum()) / total),
                "kl_to_teacher": float(kl.sum()) / total,
                "top1_agreement": float(agree.sum()) / total,
                "tokens": total,
                "documents": float(len(order)),
            }
            rows[name] = {
                "doc": order,
                "nll": nll.tolist(),
                "kl": kl.tolist(),
                "agree": agree.tolist(),
                "correct": correct.tolist(),
                "tokens": tokens.tolist(),
            }
            metrics[name].update(_intervals(rows[name], reference=name in self.references))
            if self.buckets is not None:
                tail[name] = _tail(table[:, len(_SUMS) :].view(-1, 3, len(TAIL_BUCKETS)))
        documents = []
        if self.eos is not None:
            for u, t in zip(order, tokens.tolist(), strict=True):
                entry: dict[str, Any] = {"index": u, "tokens": t, "head": [tok for _, tok in self.heads.get(u, [])]}
                for name in self.names:
                    s = self.units[u][name]
                    entry[name] = {"top1_agreement": float(s[2]) / t, "accuracy": float(s[3]) / t}
                documents.append(entry)
        return Heldout(metrics, tail, documents, rows)


def _tail(per_unit: Tensor) -> dict[str, dict[str, float]]:
    """Each bucket's agreement and accuracy, with intervals resampling the units (``per_unit``: units × 3 × B)."""
    out = {}
    for b, bucket in enumerate(TAIL_BUCKETS):
        agree, correct, tokens = per_unit[:, 0, b], per_unit[:, 1, b], per_unit[:, 2, b]
        n = float(tokens.sum())
        if n == 0:
            out[bucket] = {"tokens": 0.0}
            continue
        entry = {"top1_agreement": float(agree.sum()) / n, "accuracy": float(correct.sum()) / n, "tokens": n}
        if len(tokens) >= 2:
            for key, values in (("top1_agreement", agree), ("accuracy", correct)):
                low, high = ratio_interval(values.tolist(), tokens.tolist())
                entry[f"{key}_ci_low"], entry[f"{key}_ci_high"] = low, high
        out[bucket] = entry
    return out


def _intervals(rows: dict[str, list[float]], reference: bool) -> dict[str, float]:
    """95 % intervals of ppl, KL and agreement, resampling whole documents (a cluster bootstrap).

    Tokens of one document share their subject, vocabulary and context, so resampling tokens or blocks would
    make the interval too narrow; the document is the unit a user's own text varies by.
    A model's agreement with itself (the teacher) is 1 and its KL 0 with no uncertainty: no interval.
    """
    if len(rows["tokens"]) < 2:
        return {}  # one unit: nothing to resample
    out = {}
    pairs = [("ppl", "nll", math.exp)] + (
        [] if reference else [("kl_to_teacher", "kl", None), ("top1_agreement", "agree", None)]
    )
    for metric, key, transform in pairs:
        low, high = ratio_interval(rows[key], rows["tokens"], transform)
        out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = low, high
    return out


def paired_difference(
    a: dict[str, list[float]], b: dict[str, list[float]], key: str = "agree"
) -> tuple[float, float, float, int]:
    """``a − b`` of a rate (``key`` summed over tokens) on the documents both scored, with its 95 % interval.

    Both models' per-document sums (:attr:`Heldout.rows`) are matched by document, and the documents are
    resampled together (a paired cluster bootstrap), so what the two share (the same hard documents) cancels.

    Returns:
        ``(difference, low, high, documents)``.

    """
    import numpy as np

    from distill.eval.intervals import resample_interval

    index_b = {d: i for i, d in enumerate(b["doc"])}
    shared = [(i, index_b[d]) for i, d in enumerate(a["doc"]) if d in index_b]
    if not shared:
        raise ValueError("the two models share no scored document; they were not scored on the same split")
    ia, ib = (np.array(x) for x in zip(*shared, strict=True))
    va, vb = np.asarray(a[key])[ia], np.asarray(b[key])[ib]
    ta, tb = np.asarray(a["tokens"])[ia], np.asarray(b["tokens"])[ib]

    def stat(idx: np.ndarray) -> float:
        return float(va[idx].sum() / ta[idx].sum() - vb[idx].sum() / tb[idx].sum())

    low, high = resample_interval(stat, len(shared))
    return stat(np.arange(len(shared))), low, high, len(shared)


def _accumulate(
    tally: _Tally,
    models: dict[str, nn.Module],
    teacher: nn.Module,
    batch: dict[str, Tensor],
    vocab_size: int,
    device: torch.device | str,
    score: bool = True,
) -> None:
    """Add one batch's per-unit NLL, KL, agreement, accuracy and buckets per model to ``tally``.

    With ``score=False`` only the document bookkeeping runs (another rank scores this batch).
    """
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = mask.to(device) if mask is not None else None
    labels = batch["labels"].to(device)[:, 1:]
    real = labels != IGNORE_INDEX
    unit, where = tally.units_of(batch)
    if tally.eos is not None:
        tally.add_heads(batch["input_ids"], unit, where)
    if not score:
        return
    unit = unit[:, 1:].to(device)[real]
    bucket = None if tally.buckets is None else tally.buckets[labels.clamp(0, len(tally.buckets) - 1)][real]
    t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab_size].float()
    t_logp = F.log_softmax(t_logits, -1)
    t_top = t_logp.argmax(-1)
    for k, (name, model) in enumerate(models.items()):
        same = model is teacher or model is getattr(teacher, "model", None)  # the teacher itself: no second forward
        logits = t_logits if same else model(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab_size].float()
        logp = F.log_softmax(logits, -1)
        nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[real]
        kl = (t_logp.exp() * (t_logp - logp)).sum(-1)[real]
        top = logp.argmax(-1)
        agree = (top == t_top)[real].double()
        correct = (top == labels)[real].double()
        values = torch.zeros(len(nll), _N_SUMS, dtype=torch.float64, device=nll.device)
        values[:, 0], values[:, 1], values[:, 2], values[:, 3] = nll.double(), kl.double(), agree, correct
        if bucket is not None:
            n = len(TAIL_BUCKETS)
            for row, hits in enumerate((agree, correct, torch.ones_like(agree))):
                values[torch.arange(len(hits)), len(_SUMS) + row * n + bucket] = hits
        tally.add(name, unit, values, first=k == 0)
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
