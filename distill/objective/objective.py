"""The training objective: (1-α)·CE + α·s(T)·KD, plus an optional intermediate-layer term."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from distill.config import config_error
from distill.objective.buckets import TopKBuckets, bucket_logprobs
from distill.objective.chunked import TeacherRows, chunkable, chunked_distill_loss
from distill.objective.cross_batch import METHODS, CrossTokenizer
from distill.objective.cross_tokenizer import align_kd, uld_loss
from distill.objective.divergences import (
    IGNORE_INDEX,
    HiddenStateLoss,
    get_divergence,
    next_token_ce,
    real_rows,
    temperature_scale,
)


class DistillationObjective(nn.Module):
    """Combines the hard-label CE with a soft-label divergence to the teacher.

    The divergence is scaled by :func:`temperature_scale` so its gradient magnitude does not shrink as the
    temperature grows: T² for the KL family (Hinton et al., 2015), T for total variation. The CE term always
    uses temperature 1.

    Args:
        loss: divergence name, one of :data:`distill.objective.divergences.DIVERGENCES`.
        alpha: weight of the KD term in ``[0, 1]``; ``1 - alpha`` weighs the CE term.
        temperature: softmax temperature ``T > 0`` of the KD term.
        beta: JSD(β) mixture weight (``loss=jsd`` only).
        skew: skew weight of the skew KL losses.
        hidden: optional intermediate-layer loss settings: ``weight``, ``kind``, ``layer_map``. Its
            projection is built by :meth:`attach` once both models exist.
        chunked: compute CE + KD from final hidden states and the output layer chunk by chunk, never
            materialising B·T·V logits (:mod:`distill.objective.chunked`): ``true``, ``false`` or ``auto`` (on when
            the vocabulary has at least ``chunked_min_vocab`` entries and both models support it).
        chunk_size: token rows per chunk.
        chunked_min_vocab: the vocabulary size from which ``auto`` turns chunking on.
        cross_tokenizer: for a teacher whose tokenizer differs from the student's: ``uld`` (sorted probability
            vectors) or ``align`` (shared tokens plus a rest bucket), both at byte-aligned positions
            (:mod:`distill.objective.cross_batch`); null = the tokenizers must be the same.

    """

    def __init__(
        self,
        loss: str = "forward_kl",
        alpha: float = 0.5,
        temperature: float = 1.0,
        beta: float = 0.5,
        skew: float = 0.1,
        hidden: Mapping[str, Any] | None = None,
        chunked: bool | str = "auto",
        chunk_size: int = 128,
        chunked_min_vocab: int = 32768,
        cross_tokenizer: str | None = None,
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
        self.kd_weight = self.alpha * temperature_scale(loss, self.temperature)
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
        if chunked not in (True, False, "auto"):
            raise config_error("distill.objective.chunked", chunked, "choose true, false or auto")
        if chunk_size < 1:
            raise config_error("distill.objective.chunk_size", chunk_size, "must be at least 1 token row")
        self.chunked, self.chunk_size, self.chunked_min_vocab = chunked, int(chunk_size), int(chunked_min_vocab)
        if cross_tokenizer not in (None, *METHODS):
            raise config_error("distill.objective.cross_tokenizer", cross_tokenizer, "choose uld, align or null")
        if cross_tokenizer and chunked is True:
            raise config_error(
                "distill.objective.chunked", True, "the cross-tokenizer loss needs whole logits; use false or auto"
            )
        if cross_tokenizer and self.hidden_weight > 0:
            raise config_error(
                "distill.objective.hidden.weight",
                self.hidden_weight,
                "teacher and student positions differ across tokenizers; set it to 0 with cross_tokenizer",
            )
        self.cross_tokenizer = cross_tokenizer
        if cross_tokenizer == "uld":
            # ULD is an L1 distance between (sorted) probability vectors, like total variation: its gradient shrinks
            # as 1/T, so it is scaled by T as tvd is, whatever distill.objective.loss names.
            self.kd_weight = self.alpha * temperature_scale("tvd", self.temperature)
        self.cross: CrossTokenizer | None = None  # built by attach_tokenizers once both tokenizers exist

    def use_chunked(self, vocab_size: int, *models: Any) -> bool:
        """Whether to take the chunked path for this vocabulary and these models.

        Models whose logits are not a plain linear map of the final hidden state (soft-capped or scaled
        logits) cannot be chunked this way; asking for it explicitly is an error.
        """
        if self.chunked is False or self.cross_tokenizer:
            return False
        unsupported = [type(m).__name__ for m in models if not chunkable(m)]
        if self.chunked is True and unsupported:
            raise config_error(
                "distill.objective.chunked",
                True,
                f"{', '.join(unsupported)} post-process logits (soft-capping or scaling) or have no "
                "separate output layer; set distill.objective.chunked=false",
            )
        if unsupported:
            return False
        return self.chunked is True or vocab_size >= self.chunked_min_vocab

    def chunk_terms(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, kd_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(CE sum, KD sum) of one chunk of aligned rows: CE over the labelled rows, KD over ``kd_mask`` (or those)."""
        mask = labels != IGNORE_INDEX
        (rows,) = real_rows(mask, student_logits)  # ignored rows never enter the softmax (NaN-safe)
        ce = F.cross_entropy(rows.float(), labels[mask], reduction="sum")
        kd_rows = mask if kd_mask is None else kd_mask
        return ce, self.kd(student_logits, teacher_logits, kd_rows) * kd_rows.sum()

    def kd(self, student_logits: Tensor, teacher: Tensor | TopKBuckets, mask: Tensor) -> Tensor:
        """The divergence at the objective's temperature, averaged over the real positions of ``mask``.

        ``teacher`` is dense logits (a live teacher) or a cached teacher's :class:`TopKBuckets`, already
        tempered: then the student is coarsened to the same k + 1 buckets and compared at temperature 1.
        """
        if isinstance(teacher, TopKBuckets):
            (student_rows,) = real_rows(mask, student_logits)
            target = teacher[mask.bool()]
            student = bucket_logprobs(student_rows, target.indices, self.temperature)
            return self.divergence(student, target.logprobs, None, temperature=1.0, **self.kwargs)
        return self.divergence(student_logits, teacher, mask, temperature=self.temperature, **self.kwargs)

    def forward_chunked(
        self,
        student_final: Tensor,
        head: nn.Module,
        teacher_rows: TeacherRows,
        labels: Tensor,
        vocab: int,
        student_hidden: tuple[Tensor, ...] | None = None,
        teacher_hidden: tuple[Tensor, ...] | None = None,
        attention_mask: Tensor | None = None,
        kd_labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The same loss as :meth:`forward`, from the student's final hidden states and output layer ``head``.

        ``teacher_rows(start, stop)`` returns teacher logits for the aligned rows ``[start, stop)`` of
        ``student_final[:, :-1]`` flattened, so the teacher's logits are also produced one chunk at a time.
        """
        rows = student_final[:, :-1].reshape(-1, student_final.shape[-1])
        loss, ce, kd = chunked_distill_loss(
            rows,
            head,
            labels[:, 1:].reshape(-1),
            teacher_rows,
            self.chunk_terms,
            (1.0 - self.alpha, self.kd_weight),
            vocab,
            self.chunk_size,
            kd_mask=None if kd_labels is None else kd_labels[:, 1:].reshape(-1) != IGNORE_INDEX,
        )
        return self._with_hidden({"loss": loss, "ce": ce, "kd": kd}, student_hidden, teacher_hidden, attention_mask)

    def _with_hidden(
        self,
        out: dict[str, Tensor],
        student_hidden: tuple[Tensor, ...] | None,
        teacher_hidden: tuple[Tensor, ...] | None,
        attention_mask: Tensor | None,
    ) -> dict[str, Tensor]:
        if self.hidden is not None and student_hidden is not None and teacher_hidden is not None:
            h = self.hidden(student_hidden, teacher_hidden, attention_mask)
            out["loss"] = out["loss"] + self.hidden_weight * h
            out["hidden"] = h.detach()
        return out

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

    def attach_tokenizers(self, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
        """With ``cross_tokenizer``: build the position pairing (and, for ``align``, the shared vocabulary)."""
        if self.cross_tokenizer:
            self.cross = CrossTokenizer(self.cross_tokenizer, teacher_tokenizer, student_tokenizer)

    def forward_cross(
        self, student_logits: Tensor, labels: Tensor, student_rows: Tensor, teacher_rows: Tensor
    ) -> dict[str, Tensor]:
        """The loss across tokenizers: CE on the student's labels, KD on the paired rows (``(N, Vs)``, ``(N, Vt)``)."""
        assert self.cross is not None, "attach_tokenizers first"
        ce = next_token_ce(student_logits[:, :-1], labels[:, 1:])
        if self.cross.method == "uld":
            kd = uld_loss(student_rows, teacher_rows, self.temperature)
        else:
            shared = self.cross.shared.to(student_rows.device)
            kd = align_kd(student_rows, teacher_rows, shared, self.divergence, self.temperature, **self.kwargs)
        loss = (1.0 - self.alpha) * ce + self.kd_weight * kd
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}

    @property
    def needs_hidden_states(self) -> bool:
        """Whether forward passes must return hidden states."""
        return self.hidden is not None

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | TopKBuckets,
        labels: Tensor,
        student_hidden: tuple[Tensor, ...] | None = None,
        teacher_hidden: tuple[Tensor, ...] | None = None,
        attention_mask: Tensor | None = None,
        kd_labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss terms for one batch.

        Logits are unshifted ``(B, T, V)`` over the shared vocabulary (a cached teacher gives its
        :class:`TopKBuckets` at this temperature instead); ``labels`` are the input ids
        with ``-100`` at positions that must not be predicted. Position t predicts label t+1. ``kd_labels``, when
        given, marks the positions the KD term averages over instead (CE skips a student's own generated
        tokens, KD does not: :mod:`distill.data.generation`).
        """
        s, t, y = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
        mask = (y if kd_labels is None else kd_labels[:, 1:]) != IGNORE_INDEX
        ce = next_token_ce(s, y)
        kd = self.kd(s, t, mask)
        loss = (1.0 - self.alpha) * ce + self.kd_weight * kd
        return self._with_hidden(
            {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}, student_hidden, teacher_hidden, attention_mask
        )
