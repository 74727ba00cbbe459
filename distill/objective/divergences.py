"""Token-level divergences between teacher and student next-token distributions.

Every divergence takes raw logits of shape ``(..., V)`` plus a mask of real tokens, applies the
temperature, computes in float32 whatever the input dtype, and averages over real tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config import config_error

IGNORE_INDEX = -100


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per position, from log-probabilities; 0·log 0 is taken as 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _mix_log(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1-w)·b) computed stably in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _masked_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    # clamp keeps an all-padding batch at 0 instead of NaN
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0
) -> Tensor:
    """KL(teacher || student): mode-covering, the classic Hinton KD objective."""
    s = _log_probs(student_logits, temperature)
    t = _log_probs(teacher_logits, temperature)
    return _masked_mean(_kl(t, s), mask)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0
) -> Tensor:
    """KL(student || teacher): mode-seeking (MiniLLM)."""
    s = _log_probs(student_logits, temperature)
    t = _log_probs(teacher_logits, temperature)
    return _masked_mean(_kl(s, t), mask)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """Generalized Jensen-Shannon divergence JSD(β) of GKD (Agarwal et al., 2024).

    ``β·KL(T || M) + (1-β)·KL(S || M)`` with ``M = β·T + (1-β)·S``. As β → 0 it behaves like a
    scaled forward KL and as β → 1 like a scaled reverse KL, so the endpoints are defined as exactly
    forward KL (β=0) and reverse KL (β=1); the mixture formula would give 0 there.
    """
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature=temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature=temperature)
    s = _log_probs(student_logits, temperature)
    t = _log_probs(teacher_logits, temperature)
    m = _mix_log(t, s, beta)
    return _masked_mean(beta * _kl(t, m) + (1.0 - beta) * _kl(s, m), mask)


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> Tensor:
    """Skew forward KL of DistiLLM (Ko et al., 2024): KL(T || skew·T + (1-skew)·S)."""
    s = _log_probs(student_logits, temperature)
    t = _log_probs(teacher_logits, temperature)
    return _masked_mean(_kl(t, _mix_log(t, s, skew) if skew > 0 else s), mask)


def skew_rkl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> Tensor:
    """Skew reverse KL of DistiLLM: KL(S || skew·S + (1-skew)·T)."""
    s = _log_probs(student_logits, temperature)
    t = _log_probs(teacher_logits, temperature)
    return _masked_mean(_kl(s, _mix_log(s, t, skew) if skew > 0 else t), mask)


def total_variation(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0
) -> Tensor:
    """Total variation distance ½·Σ|T − S|, bounded in [0, 1]."""
    s = _log_probs(student_logits, temperature).exp()
    t = _log_probs(teacher_logits, temperature).exp()
    return _masked_mean(0.5 * (t - s).abs().sum(-1), mask)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_rkl": skew_rkl,
    "tvd": total_variation,
}


def get_divergence(name: str, field: str = "distill.objective.loss") -> Callable[..., Tensor]:
    """Look a divergence up by name, with an error that lists the valid names."""
    if name not in DIVERGENCES:
        raise config_error(field, name, f"unknown loss; choose one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def next_token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of already-shifted logits against labels, in float32, ignoring -100."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


class HiddenStateLoss(nn.Module):
    """Intermediate-layer loss: student hidden states matched to chosen teacher layers.

    When the widths differ, a learned linear projection maps student width to teacher width
    (as in TinyBERT). ``layer_map`` maps student hidden-state index → teacher hidden-state index,
    where index 0 is the embedding output and index i the output of decoder layer i.
    """

    def __init__(
        self,
        student_hidden: int,
        teacher_hidden: int,
        student_layers: int,
        teacher_layers: int,
        kind: str = "mse",
        layer_map: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise config_error("distill.objective.hidden.kind", kind, "choose 'mse' or 'cosine'")
        self.kind = kind
        if layer_map is None:
            # Evenly spaced, last student layer ↔ last teacher layer, like DistilBERT's layer pick.
            layer_map = {i: round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)}
        layer_map = {int(k): int(v) for k, v in layer_map.items()}
        for s, t in layer_map.items():
            if not 0 <= s <= student_layers or not 0 <= t <= teacher_layers:
                raise config_error(
                    "distill.objective.hidden.layer_map",
                    {s: t},
                    f"indices must lie in 0..{student_layers} (student) and 0..{teacher_layers} (teacher)",
                )
        self.layer_map = layer_map
        self.proj = (
            nn.Linear(student_hidden, teacher_hidden, bias=False) if student_hidden != teacher_hidden else nn.Identity()
        )

    def forward(
        self, student_hidden: tuple[Tensor, ...], teacher_hidden: tuple[Tensor, ...], mask: Tensor | None = None
    ) -> Tensor:
        """Mean over mapped layers of the per-token MSE or (1 − cosine), averaged over real tokens."""
        losses = []
        for s, t in self.layer_map.items():
            hs = self.proj(student_hidden[s].float())
            ht = teacher_hidden[t].float()
            if self.kind == "mse":
                per_token = (hs - ht).pow(2).mean(-1)
            else:
                per_token = 1.0 - F.cosine_similarity(hs, ht, dim=-1)
            losses.append(_masked_mean(per_token, mask))
        return torch.stack(losses).mean()
