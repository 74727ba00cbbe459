"""Held-out evaluation of teacher and student: perplexity, KL to the teacher, top-1 agreement."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.objective.divergences import IGNORE_INDEX


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
        name → {``ppl``, ``kl_to_teacher`` (KL(teacher‖model), nats per token), ``top1_agreement``, ``tokens``}.

    """
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in models}
    count = 0
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            count += _accumulate(sums, models, teacher, batch, vocab_size, device)
    finally:
        for name, m in models.items():
            m.train(was_training[name])
    if count == 0:
        raise ValueError("held-out evaluation saw no tokens")
    return {
        name: {
            "ppl": math.exp(s["nll"] / count),
            "kl_to_teacher": s["kl"] / count,
            "top1_agreement": s["agree"] / count,
            "tokens": float(count),
        }
        for name, s in sums.items()
    }


def _accumulate(
    sums: dict[str, dict[str, float]],
    models: dict[str, nn.Module],
    teacher: nn.Module,
    batch: dict[str, Tensor],
    vocab_size: int,
    device: torch.device | str,
) -> int:
    """Add one batch's summed NLL, KL and agreement per model into ``sums``; returns its real-token count."""
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = mask.to(device) if mask is not None else None
    labels = batch["labels"].to(device)[:, 1:]
    real = labels != IGNORE_INDEX
    t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab_size].float()
    t_logp = F.log_softmax(t_logits, -1)
    t_top = t_logp.argmax(-1)
    for name, model in models.items():
        logits = (
            t_logits
            if model is teacher
            else model(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab_size].float()
        )
        logp = F.log_softmax(logits, -1)
        nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
        agree = (logp.argmax(-1) == t_top).float()
        sums[name]["nll"] += float(nll[real].sum())
        sums[name]["kl"] += float(kl[real].sum())
        sums[name]["agree"] += float(agree[real].sum())
    return int(real.sum())


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
