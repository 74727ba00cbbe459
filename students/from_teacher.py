"""A depth-reduced copy of the teacher: its embeddings, head and evenly spaced layers (as DistilBERT)."""

from __future__ import annotations

import re

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.config import config_error
from distill.models.teacher import FrozenTeacher, Teacher
from students.config import student_config

_LAYER_KEY = re.compile(r"(^|\.)layers\.(\d+)\.")


def pick_layers(teacher_layers: int, num_layers: int) -> list[int]:
    """Evenly spaced teacher layers, always keeping the first and the last."""
    if num_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (num_layers - 1)) for i in range(num_layers)]


def build(
    teacher: Teacher, *, num_layers: int, layers: list[int] | None = None, hidden_size: int | None = None
) -> PreTrainedModel:
    """Copy the teacher's embeddings, final norm, output head and ``num_layers`` of its layers.

    Args:
        teacher: the live teacher to copy from (a cached teacher has no weights and is refused).
        num_layers: student depth, between 1 and the teacher's depth.
        layers: explicit teacher layer indices to copy (default: evenly spaced).
        hidden_size: must equal the teacher's (the copy keeps the full width); only checked.

    """
    if not isinstance(teacher, FrozenTeacher):  # only a live teacher has weights to copy
        raise config_error(
            "student",
            "from_teacher",
            "copies the teacher's weights, which a cached teacher does not "
            "have; use student=tiny or student=pretrained with teacher=cached",
        )
    t_layers, t_hidden = teacher.config.num_hidden_layers, teacher.config.hidden_size
    if hidden_size is not None and hidden_size != t_hidden:
        kind = "wider than" if hidden_size > t_hidden else "narrower than"
        raise config_error(
            "student.hidden_size",
            hidden_size,
            f"{kind} the teacher ({t_hidden}); from_teacher copies whole layers at the teacher's width, "
            "so leave it unset (for a narrower student use student=tiny)",
        )
    if not 1 <= num_layers <= t_layers:
        raise config_error(
            "student.num_layers",
            num_layers,
            f"from_teacher can copy between 1 and {t_layers} layers (the teacher's depth)",
        )
    layers = list(layers) if layers is not None else pick_layers(t_layers, num_layers)
    if len(layers) != num_layers or any(not 0 <= i < t_layers for i in layers):
        raise config_error("student.layers", layers, f"give {num_layers} indices in 0..{t_layers - 1}")
    config = student_config(teacher.config, num_hidden_layers=num_layers, dtype=torch.float32)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    targets: dict[int, list[int]] = {}  # teacher layer → student positions (a layer may be copied twice)
    for student_idx, teacher_idx in enumerate(layers):
        targets.setdefault(teacher_idx, []).append(student_idx)
    state = {}
    for key, value in teacher.model.state_dict().items():
        m = _LAYER_KEY.search(key)
        if m is None:
            state[key] = value
            continue
        for student_idx in targets.get(int(m.group(2)), []):
            state[_LAYER_KEY.sub(f"{m.group(1)}layers.{student_idx}.", key, count=1)] = value
    student.load_state_dict({k: v.detach().clone().float() for k, v in state.items()}, strict=True)
    return student
