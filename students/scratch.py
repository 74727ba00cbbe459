"""A randomly initialised student of the teacher's family with chosen sizes."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.config import config_error
from distill.models.teacher import Teacher
from distill.models.tokenizer import load_tokenizer
from students.config import attach_tokenizer, student_config


def build(
    teacher: Teacher,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    head_dim: int | None = None,
    tie_word_embeddings: bool | None = None,
    tokenizer: str | None = None,
    cross_tokenizer: str | None = None,
) -> PreTrainedModel:
    """Build a student from scratch, with the teacher's vocabulary and special-token ids.

    Args:
        teacher: the teacher (live or cached) whose config is the template.
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: query heads; ``hidden_size`` must divide by it unless ``head_dim`` is set.
        num_kv_heads: key/value heads for GQA (defaults to ``num_heads``); must divide ``num_heads``.
        intermediate_size: MLP width (defaults to 4 × hidden_size).
        head_dim: per-head width (defaults to hidden_size / num_heads).
        tie_word_embeddings: share input and output embeddings (defaults to the teacher's choice).
        tokenizer: a folder or hub id whose tokenizer the student uses instead of the teacher's (its vocabulary
            size and special ids then come from it); needs ``cross_tokenizer``.
        cross_tokenizer: ``distill.objective.cross_tokenizer``.

    """
    sizes = {"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads}
    sizes |= {"num_kv_heads": num_kv_heads, "intermediate_size": intermediate_size, "head_dim": head_dim}
    num_kv_heads, head_dim = _heads(**sizes)
    own, specials = _own_tokenizer(tokenizer)
    config = student_config(
        teacher.config,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings,
        dtype=torch.float32,
    )
    for key, value in specials.items():  # student_config skips None; these must be the tokenizer's, None or not
        setattr(config, key, value)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return attach_tokenizer(model, teacher, own, cross_tokenizer) if own is not None else model


def _own_tokenizer(source: str | None) -> tuple[Any, dict[str, int | None]]:
    """The student's own tokenizer (or None) and the config fields it decides: vocabulary size and special ids.

    Every special id is set, None included: an id left unset would be the teacher's, which names another token
    in this vocabulary (or none). A tokenizer without a pad token pads with its EOS, as :func:`load_tokenizer` does.
    """
    if not source:
        return None, {}
    own = load_tokenizer(source, field="student.tokenizer")
    pad = own.pad_token_id if own.pad_token_id is not None else own.eos_token_id
    ids = {"bos_token_id": own.bos_token_id, "eos_token_id": own.eos_token_id, "pad_token_id": pad}
    return own, {**ids, "vocab_size": len(own)}


def _heads(**sizes: int | None) -> tuple[int, int]:
    """Check the sizes (each a positive integer, heads dividing the width) and return (KV heads, head width)."""
    for key, value in sizes.items():
        # A 0-layer or negative-width model would build, train and export without complaint, and mean nothing.
        if value is not None and (not isinstance(value, int) or value < 1):
            raise config_error(f"student.{key}", value, "must be a positive integer")
    num_heads, hidden_size = sizes["num_heads"], sizes["hidden_size"]
    num_kv_heads = sizes["num_kv_heads"] or num_heads
    if num_heads % num_kv_heads:
        raise config_error("student.num_kv_heads", num_kv_heads, f"must divide student.num_heads={num_heads}")
    if sizes["head_dim"] is not None:
        return num_kv_heads, sizes["head_dim"]
    if hidden_size % num_heads:
        raise config_error(
            "student.num_heads", num_heads, f"must divide student.hidden_size={hidden_size}, or set student.head_dim"
        )
    return num_kv_heads, hidden_size // num_heads
