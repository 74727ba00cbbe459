"""Deriving a student's model config from the teacher's."""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from distill.models.tokenizer import shared_vocab_size

# Fields that describe the teacher's checkpoint, not an architecture a student should inherit.
_CHECKPOINT_FIELDS = ("quantization_config", "_name_or_path", "name_or_path", "auto_map", "_commit_hash")


def student_config(teacher_config: PretrainedConfig, **overrides: object) -> PretrainedConfig:
    """A copy of the teacher's config (same family, tokenizer ids and rotary setup) with new sizes."""
    config = copy.deepcopy(teacher_config)
    for field in _CHECKPOINT_FIELDS:
        if hasattr(config, field):
            try:
                delattr(config, field)
            except AttributeError:
                setattr(config, field, "" if "path" in field else None)
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    return config


def attach_tokenizer(
    model: PreTrainedModel, teacher: Any, tokenizer: PreTrainedTokenizerBase, cross_tokenizer: str | None
) -> PreTrainedModel:
    """Check a student's own tokenizer against the teacher's, and keep it on the model when they differ.

    Without ``cross_tokenizer`` the tokenizers must be the same (the error says how to proceed otherwise); with
    it, the student keeps its tokenizer as ``distill_tokenizer``, which the data, the loss and the export use.
    """
    rows = model.get_output_embeddings().weight.shape[0]
    if not cross_tokenizer:
        shared_vocab_size(teacher.tokenizer, tokenizer, teacher.vocab_size, rows)
        return model
    if len(tokenizer) > rows:
        raise ValueError(f"the student has {rows} output rows for a {len(tokenizer)}-token tokenizer")
    model.distill_tokenizer = tokenizer
    return model
