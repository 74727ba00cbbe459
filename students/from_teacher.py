"""A depth-reduced copy of the teacher: its embeddings, head and a subset of its layers.

The layers are evenly spaced (as DistilBERT), given explicitly, or the most important ones measured on
training text (ShortGPT-style, :mod:`distill.compress.depth`). With a cached teacher (``teacher=cached``) the
teacher the cache was built from is loaded once to copy from, then let go: the cache still trains the student.
"""

from __future__ import annotations

import gc
import logging
import os
import re
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.compress.depth import SCORERS, calibration_batches
from distill.compress.depth import choose_layers as choose_by_score
from distill.config import config_error
from distill.models.teacher import FrozenTeacher, Teacher
from distill.models.teacher_cache import CachedTeacher
from students.config import student_config

log = logging.getLogger("distill")

_LAYER_KEY = re.compile(r"(^|\.)layers\.(\d+)\.")
SELECTIONS = ("even", *SCORERS)
CALIBRATION_ROWS = 4  # rows per calibration batch: 4 × 256 ids keeps one drop_loss pass small on CPU


def pick_layers(teacher_layers: int, num_layers: int) -> list[int]:
    """Evenly spaced teacher layers, always keeping the first and the last."""
    if num_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (num_layers - 1)) for i in range(num_layers)]


def _scoring_device() -> torch.device:
    """Where to measure layer importance: this process's GPU when there is one (a big teacher on CPU is slow)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def measure_layers(
    teacher: FrozenTeacher, select: str, num_layers: int, calibration: Any, batches: int, tokens: int
) -> tuple[list[int], dict[str, Any]]:
    """Score every teacher layer with ``select`` on calibration text and keep the ``num_layers`` best.

    Returns:
        The kept teacher layer indices (ascending) and the record of the choice (for the run's report).

    """
    data = calibration_batches(calibration, batches=batches, rows=CALIBRATION_ROWS, tokens=tokens)
    model = teacher.model
    home = next(model.parameters()).device
    model.to(_scoring_device())
    try:
        scores = SCORERS[select](model, data)
    finally:
        model.to(home)  # the trainer places the teacher later; leave it where it was built
    # First and last layers are not forced (as in ShortGPT): the measurement decides, and it usually
    # ranks them highest anyway.
    kept = choose_by_score(scores, num_layers, keep_first_last=False)
    used = sum(b.numel() for b in data)
    log.info(
        "kept teacher layers %s of %d by %s on %d training tokens (scores %s)",
        kept,
        len(scores),
        select,
        used,
        ", ".join(f"{s:.4g}" for s in scores),
    )
    record = {"select": select, "teacher_layers": len(scores), "kept": kept, "scores": scores, "tokens": used}
    return kept, record


def _check_selection(
    select: str, layers: list[int] | None, calibration: Any, calibration_batches: int, calibration_tokens: int
) -> None:
    """Refuse an unknown ``select``, a choice made twice, and a measurement with nothing to measure on."""
    if select not in SELECTIONS:
        raise config_error("student.select", select, f"choose one of {', '.join(SELECTIONS)}")
    if layers is not None and select != "even":
        raise config_error(
            "student.layers",
            list(layers),
            f"explicit layers and student.select={select} both choose the layers; give one "
            "(layers with student.select=even, or layers=null to measure)",
        )
    if select != "even" and calibration is None:
        raise config_error(
            "student.select",
            select,
            "measures the layers on training text and none was given; train.py passes it, a direct call "
            "must give calibration=<packed training blocks>",
        )
    if calibration_batches < 1:
        raise config_error("student.calibration_batches", calibration_batches, "must be at least 1")
    if calibration_tokens < 2:
        raise config_error("student.calibration_tokens", calibration_tokens, "must be at least 2 (one prediction)")


def _copy_layers(teacher: FrozenTeacher, layers: list[int]) -> PreTrainedModel:
    """A model of the teacher's config with ``layers`` (teacher indices, in order) and everything else copied."""
    config = student_config(teacher.config, num_hidden_layers=len(layers), dtype=torch.float32)
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


def _depth(teacher: Teacher, num_layers: int | float | None, hidden_size: int | None) -> int:
    """The student depth, checked, and a ``hidden_size`` that must be the teacher's.

    ``num_layers`` None is the teacher's depth; a float in (0, 1) is that share of it (rounded, at least 1).
    """
    t_layers, t_hidden = teacher.config.num_hidden_layers, teacher.config.hidden_size
    if hidden_size is not None and hidden_size != t_hidden:
        kind = "wider than" if hidden_size > t_hidden else "narrower than"
        raise config_error(
            "student.hidden_size",
            hidden_size,
            f"{kind} the teacher ({t_hidden}); from_teacher copies whole layers at the teacher's width, "
            "so leave it unset (for a narrower student use student=tiny)",
        )
    if num_layers is None:
        num_layers = t_layers
    elif isinstance(num_layers, float) and 0 < num_layers < 1:
        # A share of the teacher's depth, so one student config fits teachers of any depth.
        num_layers = max(1, round(num_layers * t_layers))
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= t_layers:
        raise config_error(
            "student.num_layers",
            num_layers,
            f"from_teacher can copy between 1 and {t_layers} layers (the teacher's depth), or give a share of "
            "them in (0, 1)",
        )
    return num_layers


def build(
    teacher: Teacher,
    *,
    num_layers: int | float | None,
    layers: list[int] | None = None,
    hidden_size: int | None = None,
    select: str = "even",
    calibration_batches: int = 8,
    calibration_tokens: int = 256,
    calibration: Any = None,
) -> PreTrainedModel:
    """Copy the teacher's embeddings, final norm, output head and ``num_layers`` of its layers.

    Args:
        teacher: the live teacher to copy from, or a cached one: the teacher its manifest records is loaded to
            copy from (and to measure with), then freed, so a depth-reduced copy of a big teacher trains from
            its cache without the teacher held during training.
        num_layers: student depth, between 1 and the teacher's depth, or a share of the teacher's depth in (0, 1)
            (rounded, at least 1: one setting for teachers of any depth); None keeps every layer (a full-depth
            copy, the starting point of quantization-aware distillation).
        layers: explicit teacher layer indices to copy (default: chosen by ``select``).
        hidden_size: must equal the teacher's (the copy keeps the full width); only checked.
        select: how to choose the layers: ``even`` (evenly spaced, first and last kept), or by measured
            importance, ``block_influence`` or ``drop_loss`` (:mod:`distill.compress.depth`).
        calibration_batches: batches of training text the importance is measured on.
        calibration_tokens: ids per batch row (each batch has :data:`CALIBRATION_ROWS` rows).
        calibration: the packed training blocks to measure on (a 2-D id tensor, or the datamodule's
            ``train_set``); ``train.py`` passes them when ``select`` measures. Never held-out text.

    Returns:
        The student. A measured choice is also kept on it as ``student.layer_selection`` (method, kept
        layers, scores), a plain attribute that stays out of the exported config.

    """
    _check_selection(select, layers, calibration, calibration_batches, calibration_tokens)
    settings = {"layers": layers, "hidden_size": hidden_size, "select": select}
    measure = {"calibration": calibration, "batches": calibration_batches, "tokens": calibration_tokens}
    if isinstance(teacher, FrozenTeacher):
        return _build(teacher, num_layers, settings, measure)
    if not isinstance(teacher, CachedTeacher):
        raise config_error(
            "student", "from_teacher", f"copies a live or cached teacher's weights, not a {type(teacher).__name__}'s"
        )
    _depth(teacher, num_layers, hidden_size)  # the cache knows the architecture: refuse a bad depth before loading
    source = teacher.source_teacher()  # only a live teacher has weights to copy: the one the cache was built from
    try:
        return _build(source, num_layers, settings, measure)
    finally:
        del source  # the student holds copies; the cache trains it
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _build(
    teacher: FrozenTeacher, num_layers: int | float | None, settings: dict[str, Any], measure: dict[str, Any]
) -> PreTrainedModel:
    """:func:`build` for a live teacher: choose the layers, copy them, keep a measured choice on the student."""
    layers, select = settings["layers"], settings["select"]
    t_layers = teacher.config.num_hidden_layers
    num_layers = _depth(teacher, num_layers, settings["hidden_size"])
    record = None
    if layers is not None:
        layers = list(layers)
    elif select != "even" and num_layers < t_layers:  # at full depth every layer is kept: nothing to measure
        layers, record = measure_layers(
            teacher, select, num_layers, measure["calibration"], measure["batches"], measure["tokens"]
        )
    else:
        layers = pick_layers(t_layers, num_layers)
    if len(layers) != num_layers or any(not 0 <= i < t_layers for i in layers):
        raise config_error("student.layers", layers, f"give {num_layers} indices in 0..{t_layers - 1}")
    student = _copy_layers(teacher, layers)
    if record is not None:
        # A plain attribute, not a config field: it must not end up in the exported config.json.
        student.layer_selection = record
    return student
