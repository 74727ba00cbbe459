"""Deriving a student's model config from the teacher's."""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

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
