"""Top-k targets with one lumped tail bucket: how KD reads a cached teacher (:mod:`distill.models.teacher_cache`).

A cache keeps the teacher's k most likely next tokens and, per temperature, the mass of all the others. KD then
compares teacher and student over k + 1 buckets, both tempered consistently, and assumes nothing about how the
teacher's tail mass is spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class TopKBuckets:
    """The cached teacher's target at one temperature: its top-k tokens and one lumped tail bucket.

    Attributes:
        logprobs: ``(..., k + 1)`` tempered log-probabilities of the top k tokens, then of the tail.
        indices: ``(..., k)`` the top-k token ids.

    Indexing (``buckets[:, :-1]``, ``buckets[mask]``) applies to the leading dimensions of both.

    """

    logprobs: Tensor
    indices: Tensor

    def __getitem__(self, key: Any) -> TopKBuckets:
        return TopKBuckets(self.logprobs[key], self.indices[key])


def bucket_logprobs(student_logits: Tensor, indices: Tensor, temperature: float) -> Tensor:
    """The student's tempered log-probabilities over the teacher's buckets: each top-k id, then all others.

    Args:
        student_logits: ``(..., V)`` raw logits.
        indices: ``(..., k)`` the teacher's top-k ids at each position (k < V).
        temperature: the KD temperature.

    Returns:
        ``(..., k + 1)``: ``log q_τ(i)`` for the k ids and ``log Σ_{j ∉ top k} q_τ(j)``.

    """
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    idx = indices.long()
    top = logq.gather(-1, idx)
    tail = logq.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, tail], -1)
