"""The training objective: (1-α)·CE + α·T²·KD, plus an optional intermediate-layer term."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from distill.errors import config_error
from distill.losses import IGNORE_INDEX, HiddenStateLoss, get_divergence, next_token_ce


class DistillationObjective(nn.Module):
    """Combines the hard-label CE with a soft-label divergence to the teacher.

    The divergence is scaled by T² so its gradient magnitude does not shrink as the temperature
    grows (Hinton et al., 2015). The CE term always uses temperature 1.

    Args:
        loss: divergence name, one of :data:`distill.losses.DIVERGENCES`.
        alpha: weight of the KD term in ``[0, 1]``; ``1 - alpha`` weighs the CE term.
        temperature: softmax temperature ``T > 0`` of the KD term.
        beta: JSD(β) mixture weight (``loss=jsd`` only).
        skew: skew weight of the skew KL losses.
        hidden: optional intermediate-layer loss settings: ``weight``, ``kind``, ``layer_map``. Its
            projection is built by :meth:`attach` once both models exist.

    """

    def __init__(
        self,
        loss: str = "forward_kl",
        alpha: float = 0.5,
        temperature: float = 1.0,
        beta: float = 0.5,
        skew: float = 0.1,
        hidden: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.divergence = get_divergence(loss)
        if not 0.0 <= alpha <= 1.0:
            raise config_error("distill.objective.alpha", alpha, "alpha must lie in [0, 1]")
        if not temperature > 0.0:
            raise config_error("distill.objective.temperature", temperature, "temperature must be > 0")
        if not 0.0 <= beta <= 1.0:
            raise config_error("distill.objective.beta", beta, "beta must lie in [0, 1]")
        if not 0.0 <= skew < 1.0:
            raise config_error("distill.objective.skew", skew, "skew must lie in [0, 1)")
        self.loss_name, self.alpha, self.temperature = loss, float(alpha), float(temperature)
        self.kwargs: dict[str, float] = {}
        if loss == "jsd":
            self.kwargs["beta"] = float(beta)
        if loss.startswith("skew"):
            self.kwargs["skew"] = float(skew)
        self.hidden_settings = dict(hidden or {})
        self.hidden_weight = float(self.hidden_settings.get("weight", 0.0))
        if self.hidden_settings.get("kind", "mse") not in ("mse", "cosine"):
            raise config_error(
                "distill.objective.hidden.kind", self.hidden_settings["kind"], "choose 'mse' or 'cosine'"
            )
        self.hidden: HiddenStateLoss | None = None

    def attach(self, student_config: Any, teacher_config: Any) -> DistillationObjective:
        """Build the parts that depend on the models (the hidden-state projection), once they exist."""
        if self.hidden_weight > 0:
            self.hidden = HiddenStateLoss(
                student_config.hidden_size,
                teacher_config.hidden_size,
                student_config.num_hidden_layers,
                teacher_config.num_hidden_layers,
                kind=self.hidden_settings.get("kind", "mse"),
                layer_map=self.hidden_settings.get("layer_map"),
            )
        return self

    @property
    def needs_hidden_states(self) -> bool:
        """Whether forward passes must return hidden states."""
        return self.hidden is not None

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor,
        student_hidden: tuple[Tensor, ...] | None = None,
        teacher_hidden: tuple[Tensor, ...] | None = None,
        attention_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss terms for one batch.

        Logits are unshifted ``(B, T, V)`` over the shared vocabulary; ``labels`` are the input ids
        with ``-100`` at positions that must not be predicted. Position t predicts label t+1.
        """
        s, t, y = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
        mask = y != IGNORE_INDEX
        ce = next_token_ce(s, y)
        kd = self.divergence(s, t, mask, temperature=self.temperature, **self.kwargs)
        loss = (1.0 - self.alpha) * ce + self.alpha * self.temperature**2 * kd
        out = {"ce": ce.detach(), "kd": kd.detach()}
        if self.hidden is not None and student_hidden is not None and teacher_hidden is not None:
            h = self.hidden(student_hidden, teacher_hidden, attention_mask)
            loss = loss + self.hidden_weight * h
            out["hidden"] = h.detach()
        out["loss"] = loss
        return out
