"""A pretrained student loaded from a hub id or local folder (with the teacher's tokenizer, or cross_tokenizer set)."""

from __future__ import annotations

from transformers import PreTrainedModel

from distill.models.loading import load_causal_lm, resolve_source
from distill.models.teacher import Teacher
from distill.models.tokenizer import load_tokenizer
from students.config import attach_tokenizer


def load(
    teacher: Teacher,
    *,
    path: str,
    gguf_file: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    cross_tokenizer: str | None = None,
) -> PreTrainedModel:
    """Load the student; stop at once if its tokenizer differs from the teacher's and ``cross_tokenizer`` is unset."""
    source = resolve_source(path, None, gguf_file, "student")
    tokenizer = load_tokenizer(
        source, gguf_file=gguf_file, trust_remote_code=trust_remote_code, revision=revision, field="student"
    )
    model = load_causal_lm(
        source,
        gguf_file=gguf_file,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        revision=revision,
        field="student",
    )
    return attach_tokenizer(model, teacher, tokenizer, cross_tokenizer)
