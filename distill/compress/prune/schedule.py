"""The pruning schedule: the targets from the config, the steps that prune, and the widths after each one.

Between ``start_step`` and ``end_step`` a pruning step falls every ``every_n_steps`` (and always at
``end_step``). The share of the total removal done by a step follows a cubic (Zhu & Gupta, 2017) or a
linear curve, so the widths shrink from the student's original ones to the targets, which are a fraction
to remove (float in [0, 1)) or a count to keep (int) per layer.

The hidden width (``hidden``, Minitron's embedding channels) is one number for the whole model. It must
stay a multiple of ``hidden_multiple`` (default 32, the smallest QAT group size, so grouped int4 schemes
still divide every q/k/v/gate/up in-feature and the embedding width) and of the attention-head count that
the exported config holds (transformers' ``LlamaConfig`` refuses ``hidden_size % num_attention_heads``),
and it shrinks in steps of the least common multiple of the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from distill.compress.prune.importance import METHODS
from distill.compress.prune.surgery import hidden_params
from distill.compress.stages import registry
from distill.config import ConfigError, config_error

SCHEDULES = ("cubic", "linear")
GROUPINGS = ("within_group", "kv_groups")
FIELD = "callbacks.prune"


def _check_target(name: str, value: float | int | None, unit: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise config_error(
            f"{FIELD}.{name}", value, f"give a fraction of {unit} to remove (0.5) or a count to keep (6)"
        )
    if isinstance(value, float) and not 0.0 <= value < 1.0:
        raise config_error(
            f"{FIELD}.{name}",
            value,
            f"a fraction of {unit} to remove must lie in [0, 1); 1.0 would remove every one of them",
        )
    if isinstance(value, int) and value < 1:
        raise config_error(
            f"{FIELD}.{name}", value, f"a count of {unit} to keep must be at least 1; 0 would remove all"
        )


def _kept(name: str, value: float | int, total: int, unit: str) -> int:
    """Target count to keep, from a fraction to remove (float) or a count to keep (int)."""
    keep = round(total * (1 - value)) if isinstance(value, float) else value
    if keep > total:
        raise config_error(f"{FIELD}.{name}", value, f"the student has only {total} {unit}; keep at most {total}")
    if keep < 1:
        raise config_error(f"{FIELD}.{name}", value, f"this would remove all {total} {unit}; keep at least 1")
    return keep


def _merge_target(channels: float | int | None, target: float | None) -> float | int | None:
    """The MLP channel target, given ``channels`` and the sweep knob ``target`` (its other name)."""
    if target is None:
        return channels
    # The sweep knob of conf/experiment/distill_prune.yaml. It drives the MLP width only (the bulk of
    # a decoder layer's weights); heads and layers have their own, grouping-constrained targets.
    if channels is not None and channels != target:
        raise config_error(
            f"{FIELD}.target",
            target,
            f"it sets the MLP channels to remove, but {FIELD}.channels={channels} does too; "
            f"set {FIELD}.channels=null or drop target",
        )
    return target


def _check_choices(importance: str, head_grouping: str, schedule: str) -> None:
    if importance not in METHODS:
        raise config_error(f"{FIELD}.importance", importance, f"choose one of {', '.join(METHODS)}")
    if head_grouping not in GROUPINGS:
        raise config_error(f"{FIELD}.head_grouping", head_grouping, f"choose one of {', '.join(GROUPINGS)}")
    if schedule not in SCHEDULES:
        raise config_error(f"{FIELD}.schedule", schedule, f"choose one of {', '.join(SCHEDULES)}")


def _check_steps(start_step: int, end_step: int, every_n_steps: int, calib_batches: int) -> None:
    if start_step < 0:
        raise config_error(f"{FIELD}.start_step", start_step, "must be 0 or more")
    if end_step < start_step:
        raise config_error(f"{FIELD}.end_step", end_step, f"must be at least start_step={start_step}")
    if every_n_steps < 1:
        raise config_error(f"{FIELD}.every_n_steps", every_n_steps, "must be at least 1")
    if calib_batches < 1:
        raise config_error(f"{FIELD}.calib_batches", calib_batches, "must be at least 1")


def _check_hidden_multiple(hidden_multiple: int) -> None:
    if isinstance(hidden_multiple, bool) or not isinstance(hidden_multiple, int) or hidden_multiple < 1:
        raise config_error(
            f"{FIELD}.hidden_multiple",
            hidden_multiple,
            "give a positive int the pruned hidden size must stay a multiple of (32: the QAT group size)",
        )


def _listed(unit: int, total: int) -> str:
    """The multiples of ``unit`` below ``total``, shortened when there are many."""
    valid = list(range(unit, total, unit))
    shown = valid if len(valid) <= 8 else [*valid[:3], "…", *valid[-2:]]
    return ", ".join(map(str, shown))


def check_calibration(importance: str, needs_data: bool, end_step: int) -> None:
    """Refuse a schedule whose last pruning step has no training batch before it to score on."""
    if needs_data and end_step < 1:
        why = (
            f"importance={importance!r} scores on training batches"
            if importance != "magnitude"
            else "layer pruning scores layers (block influence) on training batches"
        )
        raise config_error(
            f"{FIELD}.end_step",
            end_step,
            f"{why}, so the last pruning step needs a batch before it; use end_step ≥ 1",
        )


@dataclass(frozen=True)
class PruneSchedule:
    """Pruning targets and the steps that reach them; build it with :meth:`from_config`.

    ``heads``, ``channels`` and ``layers`` are a fraction to remove (float) or a count to keep (int) per
    layer, or None to leave that dimension alone; ``hidden`` is the same for the model's hidden width.
    ``head_grouping`` says whether query heads go inside each KV group (``within_group``) or as whole KV
    groups (``kv_groups``). ``uniform`` is False when each layer keeps its own widths (the config then
    keeps the unpruned head count, which the hidden width must stay a multiple of).
    """

    heads: float | int | None
    channels: float | int | None
    layers: float | int | None
    head_grouping: str
    start_step: int
    end_step: int
    every_n_steps: int
    schedule: str
    hidden: float | int | None = None
    hidden_multiple: int = 32
    uniform: bool = True

    @classmethod
    def from_config(
        cls,
        *,
        heads: float | int | None,
        channels: float | int | None,
        layers: float | int | None,
        target: float | None,
        importance: str,
        head_grouping: str,
        calib_batches: int,
        start_step: int,
        end_step: int,
        every_n_steps: int,
        schedule: str,
        hidden: float | int | None = None,
        hidden_multiple: int = 32,
        uniform: bool = True,
    ) -> PruneSchedule:
        """Check the callback's config values and build the schedule.

        ``importance`` and ``calib_batches`` are not part of the schedule, but they are checked here
        between the targets and the steps so that, with several mistakes, the first one reported follows
        the order of the fields in ``conf/callbacks/prune.yaml``.
        """
        channels = _merge_target(channels, target)
        for name, value in (("heads", heads), ("channels", channels), ("layers", layers)):
            _check_target(name, value, name)
        _check_target("hidden", hidden, "hidden channels")
        if heads is None and channels is None and layers is None and hidden is None:
            raise config_error(f"{FIELD}.heads", None, "set at least one of heads, channels, layers, hidden to prune")
        _check_hidden_multiple(hidden_multiple)
        _check_choices(importance, head_grouping, schedule)
        _check_steps(start_step, end_step, every_n_steps, calib_batches)
        steps = (start_step, end_step, every_n_steps, schedule)
        return cls(heads, channels, layers, head_grouping, *steps, hidden, hidden_multiple, uniform)

    def events(self) -> list[int]:
        """The steps at which a pruning step happens, ascending; the last is ``end_step``."""
        if self.end_step == self.start_step:
            return [self.end_step]
        steps = list(range(self.start_step + self.every_n_steps, self.end_step, self.every_n_steps))
        return [*steps, self.end_step]

    def fraction(self, step: int) -> float:
        """Share of the total removal done by ``step`` (0 at start_step, 1 at end_step)."""
        if self.end_step == self.start_step:
            return 1.0 if step >= self.end_step else 0.0
        t = min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
        return 1 - (1 - t) ** 3 if self.schedule == "cubic" else t

    def sizes_at(self, step: int, original: dict[str, int], final: dict[str, int]) -> dict[str, int]:
        """Layers, query heads, KV heads and channels after the pruning step at ``step``.

        Args:
            step: the training step.
            original: the student's widths before pruning (:func:`~distill.compress.prune.surgery.shapes`).
            final: the widths at the end of the schedule (:meth:`final_sizes`).

        Returns:
            ``layers``, ``channels``, ``heads`` and ``kv_heads`` per layer, and the ``hidden`` width.

        """
        o, f, phi = original, final, self.fraction(step)

        def between(a: int, b: int) -> int:
            return a - round((a - b) * phi)

        out = {"layers": between(o["layers"], f["layers"]), "channels": between(o["channels"], f["channels"])}
        group = o["heads"] // o["kv_heads"]
        if self.head_grouping == "within_group":
            per_group = between(group, f["heads"] // o["kv_heads"])
            out["kv_heads"], out["heads"] = o["kv_heads"], per_group * o["kv_heads"]
        else:
            kv = between(o["kv_heads"], f["kv_heads"])
            out["kv_heads"], out["heads"] = kv, kv * group
        # The width moves in whole units from the final width up, so every step keeps the multiples.
        unit = self._hidden_unit(o, f)
        out["hidden"] = min(o["hidden"], f["hidden"] + unit * round((o["hidden"] - f["hidden"]) * (1 - phi) / unit))
        return out

    def final_sizes(self, o: dict[str, int]) -> dict[str, int]:
        """The widths the targets give a student of widths ``o``; a target the student cannot meet is refused."""
        hidden = o.get("hidden")
        if self.hidden is not None:
            hidden = _kept("hidden", self.hidden, o["hidden"], "hidden channels")
        final = {
            "layers": _kept("layers", self.layers, o["layers"], "layers") if self.layers is not None else o["layers"],
            "channels": (
                _kept("channels", self.channels, o["channels"], "MLP channels per layer")
                if self.channels is not None
                else o["channels"]
            ),
            "heads": o["heads"],
            "kv_heads": o["kv_heads"],
            "hidden": hidden,
        }
        if self.heads is not None:  # the head count must divide the width the export will have
            final["heads"], final["kv_heads"] = self._head_target(self.heads, o["heads"], o["kv_heads"], hidden)
        if self.hidden is not None and final["hidden"] < o["hidden"]:
            self._check_width(final["hidden"], o, final)
        return final

    def _hidden_unit(self, o: dict[str, int], final: dict[str, int]) -> int:
        """The step of the hidden width: ``hidden_multiple`` and the config's final head count both divide it."""
        return math.lcm(self.hidden_multiple, final["heads"] if self.uniform else o["heads"])

    def _check_width(self, keep: int, o: dict[str, int], final: dict[str, int]) -> None:
        unit = self._hidden_unit(o, final)
        if keep % unit == 0:
            return
        heads = final["heads"] if self.uniform else o["heads"]
        why = (
            f"this keeps {keep} of {o['hidden']} hidden channels, but the width must stay a multiple of "
            f"{FIELD}.hidden_multiple={self.hidden_multiple} (QAT groups must divide it) and of the {heads} "
            f"attention heads in the config (transformers' LlamaConfig refuses anything else), i.e. of {unit}; "
        )
        fix = (
            f"keep one of {_listed(unit, o['hidden'])} (as an int) or lower {FIELD}.hidden_multiple"
            if unit < o["hidden"]
            else f"no smaller width is a multiple of {unit}; lower {FIELD}.hidden_multiple or prune heads"
        )
        raise config_error(f"{FIELD}.hidden", self.hidden, why + fix)

    def check_stack(
        self, student: nn.Module, final: dict[str, int], hidden_state_loss: bool, stages: Sequence[Any]
    ) -> None:
        """Refuse targets that the objective or the other compression stages of the run cannot work with.

        Args:
            student: the student about to be pruned.
            final: the widths at the end of the schedule (:meth:`final_sizes`).
            hidden_state_loss: whether the objective matches hidden states (``needs_hidden_states``).
            stages: the run's compression callbacks (:func:`~distill.compress.stages.compression_stages`).

        """
        if self.layers is not None and hidden_state_loss:
            raise config_error(
                f"{FIELD}.layers",
                self.layers,
                "layer pruning changes the student's depth, which breaks the hidden-state loss's layer map; "
                "set distill.objective.hidden.weight=0 or prune heads and channels only",
            )
        uniform = [s.stage for s in stages if registry()[s.stage].needs_uniform_layers]
        if not self.uniform and uniform:
            raise config_error(
                f"{FIELD}.uniform",
                False,
                f"callbacks.{uniform[0]} needs decoder layers of one shape, which per-layer widths break; "
                f"set {FIELD}.uniform=true or drop callbacks={uniform[0]}",
            )
        if self.hidden is not None:
            # A QAT stage quantizes the pruned width later: refuse now a width its groups would not divide.
            groups = [getattr(getattr(s, "spec", None), "group_size", None) for s in stages]
            self._check_hidden_stack(student, final["hidden"], hidden_state_loss, [g for g in groups if g])

    def _check_hidden_stack(self, student: nn.Module, keep: int, hidden_state_loss: bool, groups: list[int]) -> None:
        try:
            hidden_params(student)
        except (AttributeError, IndexError, TypeError, ConfigError):  # ConfigError: no decoder layers
            raise config_error(
                f"{FIELD}.hidden",
                self.hidden,
                "width pruning needs model.norm, every layer's input_layernorm/post_attention_layernorm and "
                f"input/output embeddings; set {FIELD}.hidden=null",
            ) from None
        if hidden_state_loss:
            raise config_error(
                f"{FIELD}.hidden",
                self.hidden,
                "width pruning changes the student's hidden size, which the hidden-state loss's projection is "
                f"built for; set distill.objective.hidden.weight=0 or {FIELD}.hidden=null",
            )
        for size in groups:
            if keep % size:
                raise config_error(
                    f"{FIELD}.hidden",
                    self.hidden,
                    f"this keeps {keep} hidden channels, which the QAT group size {size} does not divide; "
                    f"set {FIELD}.hidden_multiple={size} (and a width it allows) or use a smaller group size",
                )

    def _head_target(self, value: float | int, n_heads: int, n_kv: int, hidden: int | None) -> tuple[int, int]:
        group = n_heads // n_kv
        unit = n_kv if self.head_grouping == "within_group" else group
        exact = n_heads * (1 - value) if isinstance(value, float) else float(value)
        keep = round(exact)
        # transformers' LlamaConfig refuses hidden_size % num_attention_heads != 0 even with an explicit
        # head_dim, so a head count that does not divide the width would give an export nobody can load.
        valid = [v for v in range(unit, n_heads + 1, unit) if not hidden or hidden % v == 0]
        if abs(exact - keep) > 1e-6 or keep not in valid:
            fractions = ", ".join(f"{1 - v / n_heads:.3f}" for v in valid if v < n_heads)
            how = (
                f"removing query heads inside each of the {n_kv} KV groups keeps a multiple of {n_kv}"
                if self.head_grouping == "within_group"
                else f"removing whole KV groups of {group} query heads keeps a multiple of {group}"
            ) + f", and transformers needs the count to divide hidden_size={hidden}"
            shown = f"{exact:g} of {n_heads}" if isinstance(value, float) else f"{keep} of {n_heads}"
            raise config_error(
                f"{FIELD}.heads",
                value,
                f"this keeps {shown} query heads, which breaks GQA grouping or the width: {how}; keep one of "
                f"{', '.join(map(str, valid))} (as an int), remove one of {fractions} (as a fraction), or switch "
                f"{FIELD}.head_grouping",
            )
        if keep == 0:
            raise config_error(f"{FIELD}.heads", value, "this would remove every head; keep at least one KV group")
        return keep, (n_kv if self.head_grouping == "within_group" else keep // group)
