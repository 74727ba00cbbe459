"""Held-out scores of a teacher and a student that read text through different tokenizers.

Perplexities over two vocabularies are not comparable, and neither is token-by-token agreement. What is:

* **bits per byte**: each model's negative log-likelihood of the same stretch of text, divided by its bytes.
  The stretch of each row runs from its first to its last byte-aligned pair
  (:class:`~distill.objective.cross_batch.AlignedBatch`), where both models have a token boundary, so both are
  scored on exactly the same bytes.
* **top-1 agreement in bytes**: at every aligned pair, whether the two models' most likely next tokens are the
  same byte string.

Intervals resample whole rows (a cluster bootstrap, as for the one-tokenizer report).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.eval.intervals import ratio_interval
from distill.objective.cross_batch import AlignedBatch, CrossTokenizer
from distill.objective.cross_tokenizer import token_bytes


def _next_token_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """``(B, T-1)``: the log-probability each position gave the token that followed it."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


class _Rows:
    """Per-row sums: NLL of each model, bytes scored, pairs and agreeing pairs."""

    def __init__(self) -> None:
        self.nll: dict[str, list[float]] = {"teacher": [], "student": []}
        self.bytes: list[float] = []
        self.agree: list[float] = []
        self.pairs: list[float] = []

    def add_batch(self, pairs: AlignedBatch, s_tok: Tensor, t_tok: Tensor, same: Tensor) -> None:
        """Add each row with at least two pairs; ``s_tok`` / ``t_tok`` are :func:`_next_token_logprobs`."""
        ts, tt = s_tok.shape[1] + 1, t_tok.shape[1] + 1
        s_rows, t_rows, at = pairs.student_rows.cpu(), pairs.teacher_rows.cpu(), pairs.pair_bytes.cpu()
        rows = s_rows // ts
        for b in rows.unique().tolist():
            sel = (rows == b).nonzero().squeeze(-1)
            if len(sel) < 2:
                continue
            i0, i1 = (s_rows[sel[[0, -1]]] % ts).tolist()
            j0, j1 = (t_rows[sel[[0, -1]]] % tt).tolist()
            self.nll["student"].append(-float(s_tok[b, i0:i1].sum()))  # tokens i0+1..i1, read at i0..i1-1
            self.nll["teacher"].append(-float(t_tok[b, j0:j1].sum()))
            self.bytes.append(float(at[sel[-1]] - at[sel[0]]))
            self.agree.append(float(same[sel].sum()))
            self.pairs.append(float(len(sel)))


@torch.no_grad()
def cross_heldout(
    student: nn.Module,
    teacher: nn.Module,
    cross: CrossTokenizer,
    loader: Any,
    max_batches: int | None,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Bits per byte of both models and their top-1 agreement in bytes, with 95 % intervals, per side.

    Args:
        student: the student causal LM (reads the loader's tokens).
        teacher: the teacher causal LM (reads the same text in its own tokens).
        cross: the pairing of the two tokenizers.
        loader: held-out batches of student tokens (``input_ids``, ``labels``).
        max_batches: how many batches to score (None: all).
        device: where the models run.

    Raises:
        ValueError: the teacher's tokenizer changes the text of a held-out document (a normaliser), so no
            position can be paired by bytes (:meth:`~distill.objective.cross_batch.CrossTokenizer.align` checks
            every document of every row).

    """
    rows = _Rows()
    s_bytes = [token_bytes(cross.student_tok, i) or b"" for i in range(len(cross.student_tok))]
    t_bytes = [token_bytes(cross.teacher_tok, i) or b"" for i in range(len(cross.teacher_tok))]
    for n, batch in enumerate(loader):
        if max_batches is not None and n >= max_batches:
            break
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        pairs = cross.align(ids, labels)
        if len(pairs.student_rows) == 0:
            continue
        s_logits = student(input_ids=ids, use_cache=False).logits
        t_logits = teacher(input_ids=pairs.teacher_ids, attention_mask=pairs.teacher_mask, use_cache=False).logits
        s_top = s_logits.reshape(-1, s_logits.shape[-1])[pairs.student_rows].argmax(-1).tolist()
        t_top = t_logits.reshape(-1, t_logits.shape[-1])[pairs.teacher_rows].argmax(-1).tolist()
        # An id past the tokenizer (a padded embedding row) spells nothing, so it agrees with nothing.
        spelled = [
            (s_bytes[a] if a < len(s_bytes) else None, t_bytes[b] if b < len(t_bytes) else False)
            for a, b in zip(s_top, t_top, strict=True)
        ]
        same = torch.tensor([a == b for a, b in spelled])
        s_tok = _next_token_logprobs(s_logits, ids).cpu()
        t_tok = _next_token_logprobs(t_logits, pairs.teacher_ids).cpu()
        rows.add_batch(pairs, s_tok, t_tok, same)
    return _summary(rows)


def _summary(rows: _Rows) -> dict[str, dict[str, float]]:
    if not rows.bytes:
        raise ValueError("no held-out row had two byte-aligned positions: nothing to compare across tokenizers")
    per_bit = 1.0 / math.log(2)
    sides: dict[str, dict[str, float]] = {}
    for side, nll in rows.nll.items():
        bpb = sum(nll) / sum(rows.bytes) * per_bit
        low, high = ratio_interval(nll, rows.bytes, transform=lambda x: x * per_bit)
        sides[side] = {
            "heldout/bits_per_byte": bpb,
            "heldout/bits_per_byte_ci_low": low,
            "heldout/bits_per_byte_ci_high": high,
            "heldout/bytes": float(sum(rows.bytes)),
        }
    agree = sum(rows.agree) / sum(rows.pairs)
    low, high = ratio_interval(rows.agree, rows.pairs)
    sides["student"] |= {
        "heldout/top1_byte_agreement": agree,
        "heldout/top1_byte_agreement_ci_low": low,
        "heldout/top1_byte_agreement_ci_high": high,
        "heldout/aligned_positions": float(sum(rows.pairs)),
    }
    sides["teacher"]["heldout/top1_byte_agreement"] = 1.0
    return sides
