"""Token-level divergences between teacher and student next-token distributions.

Every divergence takes raw logits of shape ``(..., V)`` plus a mask of real tokens, applies the
temperature, computes in float32 whatever the input dtype, and averages over real tokens only.

Masked positions are *selected out* before anything is computed, never multiplied by 0: a NaN or inf in
the logits of a padded or ``-100`` position then reaches neither the loss nor its gradient (0·NaN is NaN,
and so is the gradient of a softmax over a NaN row, whatever weight the row's loss gets).
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
    """KL(p || q) per position, from log-probabilities; 0·log 0 is taken as 0.

    A token with p = 0 (a ``-inf`` logit, e.g. a masked vocabulary entry) contributes 0 whatever q is.
    ``torch.where`` picks the 0 before the product, so neither the value nor the gradient meets
    0·(−inf − log q) = NaN; ``xlogy`` alone would fix the value but not the gradient through ``exp``.
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def _mix_log(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1-w)·b) computed stably in log space.

    Where both are -inf (a token neither distribution can emit) the mixture is -inf too, and its
    gradient is 0: ``logaddexp(-inf, -inf)`` alone would pass back 0/0 = NaN.
    """
    a, b = log_a + math.log(weight_a), log_b + math.log1p(-weight_a)
    both = torch.isneginf(a) & torch.isneginf(b)
    return torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0)).masked_fill(both, float("-inf"))


def real_rows(mask: Tensor | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The rows of each ``(..., D)`` tensor at the real positions of ``mask`` (``(...)``), as ``(N, D)``.

    Selecting, rather than zero-weighting, keeps whatever the masked rows hold out of the computation.
    """
    if mask is None:
        return tuple(x.reshape(-1, x.shape[-1]) for x in tensors)
    keep = mask.bool()
    return tuple(x[keep] for x in tensors)


def _mean(per_token: Tensor) -> Tensor:
    """Mean over the selected tokens; 0 (still differentiable) when there are none."""
    return per_token.sum() / max(per_token.numel(), 1)


def _pair(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor]:
    """Tempered log-probabilities of student and teacher at the real positions only."""
    s, t = real_rows(mask, student_logits, teacher_logits)
    return _log_probs(s, temperature), _log_probs(t, temperature)


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0
) -> Tensor:
    """KL(teacher || student): mode-covering, the classic Hinton KD objective."""
    s, t = _pair(student_logits, teacher_logits, mask, temperature)
    return _mean(_kl(t, s))


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0
) -> Tensor:
    """KL(student || teacher): mode-seeking (MiniLLM)."""
    s, t = _pair(student_logits, teacher_logits, mask, temperature)
    return _mean(_kl(s, t))


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
    s, t = _pair(student_logits, teacher_logits, mask, temperature)
    m = _mix_log(t, s, beta)
    return _mean(beta * _kl(t, m) + (1.0 - beta) * _kl(s, m))


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> Tensor:
    """Skew forward KL of DistiLLM (Ko et al., 2024): KL(T || skew·T + (1-skew)·S)."""
    s, t = _pair(student_logits, teacher_logits, mask, temperature)
    return _mean(_kl(t, _mix_log(t, s, skew) if skew > 0 else s))


def skew_rkl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> Tensor:
    """Skew reverse KL of DistiLLM: KL(S || skew·S + (1-skew)·T)."""
    s, t = _pair(student_logits, teacher_logits, mask, temperature)
    return _mean(_kl(s, _mix_log(s, t, skew) if skew > 0 else t))


def total_variation(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0
) -> Tensor:
    """Total variation distance ½·Σ|T − S|, bounded in [0, 1]."""
    s, t = _pair(student_logits, teacher_logits, mask, temperature)
    return _mean(0.5 * (t.exp() - s.exp()).abs().sum(-1))


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_rkl": skew_rkl,
    "tvd": total_variation,
}


def temperature_scale(loss: str, temperature: float) -> float:
    """The factor on the KD term that keeps its gradient's size independent of the temperature.

    At high T the tempered probabilities are ``1/V + z/(V·T)`` to first order. The KL family (forward,
    reverse, JSD, skew KL) is quadratic in the difference of those, so its gradient with respect to the
    logits shrinks as 1/T² and gets T² (Hinton et al., 2015). Total variation is the absolute value of the
    difference, linear in it, so its gradient shrinks as 1/T only: it gets T, not T², which would make a
    T = 4 run weigh the KD term 4× more than it meant to. ``tests/objective/test_divergences.py`` checks both
    scalings against measured gradients.
    """
    return temperature if loss == "tvd" else temperature**2


def get_divergence(name: str, field: str = "distill.objective.loss") -> Callable[..., Tensor]:
    """Look a divergence up by name, with an error that lists the valid names."""
    if name not in DIVERGENCES:
        raise config_error(field, name, f"unknown loss; choose one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def next_token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of already-shifted logits against labels, in float32, over the non-``-100`` labels.

    The ignored rows are selected out first (``ignore_index`` alone still runs the softmax, and its
    gradient, over them); with no real label the loss is 0, not NaN.
    """
    keep = labels != IGNORE_INDEX
    (rows,) = real_rows(keep, logits)
    return F.cross_entropy(rows.float(), labels[keep], reduction="sum") / max(rows.shape[0], 1)


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
            hs, ht = real_rows(mask, student_hidden[s], teacher_hidden[t])
            hs, ht = self.proj(hs.float()), ht.float()
            if self.kind == "mse":
                per_token = (hs - ht).pow(2).mean(-1)
            else:
                per_token = 1.0 - F.cosine_similarity(hs, ht, dim=-1)
            losses.append(_mean(per_token))
        return torch.stack(losses).mean()
