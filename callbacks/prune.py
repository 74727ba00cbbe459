"""Progressive structured pruning during distillation: attention heads, MLP channels, whole layers.

``callbacks=prune`` (``conf/callbacks/prune.yaml``). Between ``start_step`` and ``end_step`` the
callback prunes every ``every_n_steps`` along a cubic (Zhu & Gupta, 2017) or linear schedule until the
targets are met; afterwards the structure is fixed and distillation heals it (Minitron, Sheared-LLaMA).

Units are removed physically at each pruning step (no masks): the linears are sliced, the config is
updated, the optimizer is rebuilt with its Adam moments sliced to the surviving rows and columns, and
under DDP the DDP wrapper is rebuilt around the new parameters. Every step is recorded with
``record_structure_change("prune", spec)`` (the kept indices), and the replay registered below rebuilds
the same shapes on a fresh student before a checkpoint's weights load. Widths stay uniform across
layers, so the result is a plain Hugging Face Llama.

The surgery itself is hand-written (see :mod:`distill.compress.prune.surgery` for why).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn

from distill.compress import stages as structure
from distill.compress.prune.importance import METHODS, ImportanceAccumulator
from distill.compress.prune.surgery import apply_spec, decoder_layers, layer_shapes, shapes
from distill.config import config_error

log = logging.getLogger("distill.prune")

SCHEDULES = ("cubic", "linear")
GROUPINGS = ("within_group", "kv_groups")
FIELD = "callbacks.prune"


@structure.register("prune")
def replay_prune(student: nn.Module, spec: dict[str, Any]) -> None:
    """Re-apply one recorded pruning step to a fresh student (before a checkpoint's weights load)."""
    apply_spec(student, spec)


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


class ProgressiveStructuredPruning(pl.Callback):
    """Prune heads, MLP channels and decoder layers of the student progressively while it distils.

    Targets are a fraction to remove (float in [0, 1)) or a count to keep per layer (int); ``null``
    leaves that dimension alone.

    Args:
        heads: query heads per layer. With ``head_grouping=within_group`` query heads are removed
            inside each KV group, so the kept count must be a multiple of the KV heads; with
            ``kv_groups`` whole KV groups go, so it must be a multiple of the group size.
        channels: MLP intermediate channels per layer.
        layers: decoder layers.
        importance: ``activation`` (Minitron), ``taylor`` (|w·∇w|, LLM-Pruner) or ``magnitude``.
            Layers always score by block influence (1 − cos between a layer's input and output).
        head_grouping: ``within_group`` or ``kv_groups`` (see ``heads``).
        calib_batches: training batches right before each pruning step over which scores accumulate.
        start_step: step where the schedule starts (sparsity 0).
        end_step: step of the last pruning step; the targets are met here and the structure stays fixed.
        every_n_steps: steps between pruning steps.
        schedule: ``cubic`` (prune fast early, gently near the end) or ``linear``.
        bias_compensation: FLAP's idea: add the mean contribution of removed channels and heads (mean input
            × their ``down_proj``/``o_proj`` columns, over the calibration batches) to a bias on the output
            projection, so pruning before healing hurts less. The export then has ``mlp_bias`` and
            ``attention_bias`` set (zero biases on the other projections) and is still a plain Llama.
        target: the one-number knob for sweeps (``callbacks.prune.target=0.25,0.5,0.75``): the fraction of
            MLP channels to remove, i.e. ``channels`` under another name; setting both differently is an error.
        uniform: True keeps one width for all layers (a plain Hugging Face Llama export). False ranks units
            across layers, so each layer keeps its own head and channel counts (their totals meet the
            targets); the export then records per-layer shapes and loads with ``load_pruned.py``.

    """

    stage = "prune"

    def __init__(
        self,
        heads: float | int | None = None,
        channels: float | int | None = None,
        layers: float | int | None = None,
        importance: str = "activation",
        head_grouping: str = "within_group",
        calib_batches: int = 4,
        start_step: int = 0,
        end_step: int = 0,
        every_n_steps: int = 10,
        schedule: str = "cubic",
        bias_compensation: bool = False,
        target: float | None = None,
        uniform: bool = True,
    ) -> None:
        super().__init__()
        if target is not None:
            # The sweep knob of conf/experiment/distill_prune.yaml. It drives the MLP width only (the bulk of
            # a decoder layer's weights); heads and layers have their own, grouping-constrained targets.
            if channels is not None and channels != target:
                raise config_error(
                    f"{FIELD}.target",
                    target,
                    f"it sets the MLP channels to remove, but {FIELD}.channels={channels} does too; "
                    f"set {FIELD}.channels=null or drop target",
                )
            channels = target
        for name, value, unit in (
            ("heads", heads, "heads"),
            ("channels", channels, "channels"),
            ("layers", layers, "layers"),
        ):
            _check_target(name, value, unit)
        if heads is None and channels is None and layers is None:
            raise config_error(f"{FIELD}.heads", None, "set at least one of heads, channels, layers to prune")
        if importance not in METHODS:
            raise config_error(f"{FIELD}.importance", importance, f"choose one of {', '.join(METHODS)}")
        if head_grouping not in GROUPINGS:
            raise config_error(f"{FIELD}.head_grouping", head_grouping, f"choose one of {', '.join(GROUPINGS)}")
        if schedule not in SCHEDULES:
            raise config_error(f"{FIELD}.schedule", schedule, f"choose one of {', '.join(SCHEDULES)}")
        if start_step < 0:
            raise config_error(f"{FIELD}.start_step", start_step, "must be 0 or more")
        if end_step < start_step:
            raise config_error(f"{FIELD}.end_step", end_step, f"must be at least start_step={start_step}")
        if every_n_steps < 1:
            raise config_error(f"{FIELD}.every_n_steps", every_n_steps, "must be at least 1")
        if calib_batches < 1:
            raise config_error(f"{FIELD}.calib_batches", calib_batches, "must be at least 1")
        self.targets = {"heads": heads, "channels": channels, "layers": layers}
        self.head_grouping = head_grouping
        self.calib_batches = calib_batches
        self.start_step, self.end_step, self.every_n_steps = start_step, end_step, every_n_steps
        self.schedule = schedule
        self.bias_compensation = bias_compensation
        self.uniform = uniform
        self.scores = ImportanceAccumulator(importance, layers=layers is not None, means=bias_compensation)
        if self.scores.needs_data and end_step < 1:
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
        self.events = self._events()
        self.done: list[int] = []
        self.original: dict[str, int] | None = None
        self.final: dict[str, int] | None = None

    # -- schedule -----------------------------------------------------------------------------
    def _events(self) -> list[int]:
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

    def sizes_at(self, step: int) -> dict[str, int]:
        """Layers, query heads, KV heads and channels the student has after the pruning step at ``step``."""
        o, f, phi = self.original, self.final, self.fraction(step)
        assert o is not None and f is not None

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
        return out

    # -- set-up and checks ----------------------------------------------------------------------
    def _final_sizes(self, o: dict[str, int]) -> dict[str, int]:
        t = self.targets
        final = {
            "layers": _kept("layers", t["layers"], o["layers"], "layers") if t["layers"] is not None else o["layers"],
            "channels": (
                _kept("channels", t["channels"], o["channels"], "MLP channels per layer")
                if t["channels"] is not None
                else o["channels"]
            ),
            "heads": o["heads"],
            "kv_heads": o["kv_heads"],
        }
        if t["heads"] is not None:
            final["heads"], final["kv_heads"] = self._head_target(
                t["heads"], o["heads"], o["kv_heads"], o.get("hidden")
            )
        return final

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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the targets against the student and the strategy; remember the original widths."""
        if stage != "fit":
            return
        student = pl_module.student
        if not _is_llama_like(student):
            raise config_error(
                "callbacks",
                "prune",
                f"{type(student).__name__} is not a Llama-style decoder (model.layers with "
                "self_attn.q_proj/k_proj/v_proj/o_proj and mlp.gate_proj/up_proj/down_proj); drop callbacks=prune",
            )
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or "DeepSpeed" in type(strategy).__name__:
            raise config_error(
                "trainer.strategy",
                type(strategy).__name__,
                "pruning mid-run is supported on one device or under DDP only (FSDP/DeepSpeed shard the weights "
                "it slices); use trainer=cpu, gpu, ddp or ddp_sim",
            )
        if self.targets["layers"] is not None and pl_module.objective.needs_hidden_states:
            raise config_error(
                f"{FIELD}.layers",
                self.targets["layers"],
                "layer pruning changes the student's depth, which breaks the hidden-state loss's layer map; "
                "set distill.objective.hidden.weight=0 or prune heads and channels only",
            )
        if not self.uniform and any(getattr(cb, "stage", None) == "share" for cb in trainer.callbacks):
            raise config_error(
                f"{FIELD}.uniform",
                False,
                "cross-layer sharing ties layers of one shape, which per-layer widths break; "
                f"set {FIELD}.uniform=true or drop callbacks=share",
            )
        if trainer.max_steps > 0 and self.end_step >= trainer.max_steps:
            raise config_error(
                f"{FIELD}.end_step",
                self.end_step,
                f"the schedule must finish before trainer.max_steps={trainer.max_steps}; lower end_step",
            )
        if self.original is None:
            self.original = shapes(student)
        self.final = self._final_sizes(self.original)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the scoring hooks; here, after a resumed run has rebuilt the pruned structure."""
        self.scores.attach(pl_module.student)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the scoring hooks."""
        self.scores.detach()

    # -- the training loop ----------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Prune at scheduled steps; collect scores on the batches just before one."""
        step = trainer.global_step
        if step in self.events and step not in self.done:
            self._prune(trainer, pl_module, step)
        upcoming = [e for e in self.events if e > step and e not in self.done]
        self.scores.collecting = self.scores.needs_data and bool(upcoming) and upcoming[0] - step <= self.calib_batches

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Taylor scores read the gradients of the calibration batches."""
        self.scores.accumulate_grads(pl_module.student)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Stop collecting outside the training step (validation forwards must not count)."""
        self.scores.collecting = False

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        student = pl_module.student
        now, target = shapes(student), self.sizes_at(step)
        self.done.append(step)
        # Totals over layers: equal to layers × per-layer width for uniform models, the budget otherwise.
        wanted = {f"total_{k}": target[k] * target["layers"] for k in ("heads", "kv_heads", "channels")}
        if now["layers"] == target["layers"] and all(now[k] == v for k, v in wanted.items()):
            return
        if self.scores.needs_data:
            # Every rank must remove the same units: sum the statistics over ranks first.
            device = pl_module.device
            self.scores.reduce(lambda t: trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu())
        spec = self.select(student, target) if self.uniform else self.select_per_layer(student, target)
        compensation = self.compensation(student, spec) if self.bias_compensation else []
        if compensation:
            spec["biases"] = sorted({kind for _, kind, _ in compensation})
        carry = apply_spec(student, spec)
        add_compensation(student, compensation)
        pl_module.record_structure_change("prune", spec)
        _rewrap_ddp(trainer)
        pl_module.rebuild_optimizers(carry)
        self.scores.reset()
        self.scores.attach(student)
        after = shapes(student)
        if trainer.is_global_zero:
            log.info("pruned at step %d: %s", step, after)
        logged = {f"prune/{k}": float(v) for k, v in after.items()}
        if not self.uniform:  # per-layer widths: chart each layer's shape too
            for i, layer in enumerate(layer_shapes(student)):
                logged.update({f"prune/layer{i}/{k}": float(v) for k, v in layer.items()})
        pl_module.log_dict(logged, on_step=True, on_epoch=False)

    @torch.no_grad()
    def select(self, student: nn.Module, target: dict[str, int]) -> dict[str, Any]:
        """Pick the units to keep for ``target`` sizes from the accumulated scores: the pruning spec."""
        now = shapes(student)
        spec: dict[str, Any] = {"layers": None, "q_heads": None, "kv_heads": None, "channels": None}
        layer_idx = list(range(now["layers"]))
        if target["layers"] < now["layers"]:
            layer_idx = _top(self.scores.layer_scores(student), target["layers"])
            spec["layers"] = layer_idx
        if target["heads"] < now["heads"]:
            head_scores = self.scores.head_scores(student)
            group = now["heads"] // now["kv_heads"]
            q_keep, kv_keep = [], []
            for i in layer_idx:
                per_group = head_scores[i].view(now["kv_heads"], group)
                if target["kv_heads"] < now["kv_heads"]:  # whole KV groups go
                    kv = _top(per_group.sum(1), target["kv_heads"])
                    q = [k * group + j for k in kv for j in range(group)]
                else:  # query heads go inside each group
                    per = target["heads"] // now["kv_heads"]
                    kv = list(range(now["kv_heads"]))
                    q = [k * group + j for k in kv for j in _top(per_group[k], per)]
                q_keep.append(sorted(q))
                kv_keep.append(kv)
            spec["q_heads"], spec["kv_heads"] = q_keep, kv_keep
        if target["channels"] < now["channels"]:
            channel_scores = self.scores.channel_scores(student)
            spec["channels"] = [_top(channel_scores[i], target["channels"]) for i in layer_idx]
        return spec

    @torch.no_grad()
    def select_per_layer(self, student: nn.Module, target: dict[str, int]) -> dict[str, Any]:
        """Like :meth:`select`, but units compete across layers, so each layer keeps its own counts.

        Scores are standardised per layer (z-scores, as FLAP does) before the global ranking, because raw
        activation or gradient magnitudes differ in scale from layer to layer. Totals meet ``target`` ×
        layers; every layer keeps at least one query head per KV group (or one KV group) and one channel.
        Layers are chosen exactly as in :meth:`select`.
        """
        spec: dict[str, Any] = {"uniform": False, "layers": None, "q_heads": None, "kv_heads": None, "channels": None}
        n = len(decoder_layers(student))
        layer_idx = list(range(n))
        if target["layers"] < n:
            layer_idx = _top(self.scores.layer_scores(student), target["layers"])
            spec["layers"] = layer_idx
        now = layer_shapes(student)
        now = [now[i] for i in layer_idx]
        if target["heads"] * len(layer_idx) < sum(s["heads"] for s in now):
            spec["q_heads"], spec["kv_heads"] = self._heads_per_layer(student, layer_idx, now, target)
        if target["channels"] * len(layer_idx) < sum(s["channels"] for s in now):
            scores = self.scores.channel_scores(student)
            units = []
            for j, i in enumerate(layer_idx):
                z = _standardised(scores[i])
                strongest = int(z.argmax())
                units += [(float(z[c]), j, c) for c in range(len(z)) if c != strongest]
            drop = sum(s["channels"] for s in now) - target["channels"] * len(layer_idx)
            gone = _weakest(units, drop)
            spec["channels"] = [
                [c for c in range(now[j]["channels"]) if (j, c) not in gone] for j in range(len(layer_idx))
            ]
        return spec

    def _heads_per_layer(
        self, student: nn.Module, layer_idx: list[int], now: list[dict[str, int]], target: dict[str, int]
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Kept query and KV heads per layer when heads compete across layers (see select_per_layer)."""
        scores = self.scores.head_scores(student)
        units, orders = [], []
        for j, i in enumerate(layer_idx):
            kv, group = now[j]["kv_heads"], now[j]["heads"] // now[j]["kv_heads"]
            per_group = _standardised(scores[i]).view(kv, group)
            if self.head_grouping == "within_group":
                # Unit r of a layer: the r-th weakest query head of every group (GQA needs equal groups).
                values, order = per_group.sort(dim=1)
                units += [(float(values[:, r].mean()), j, r) for r in range(group - 1)]
            else:  # unit r: the r-th weakest whole KV group
                values, order = per_group.sum(1).sort()
                units += [(float(values[r]), j, r) for r in range(kv - 1)]
            orders.append(order)
        total = sum(s["heads"] for s in now)
        within = self.head_grouping == "within_group"
        unit_heads = now[0]["kv_heads"] if within else now[0]["heads"] // now[0]["kv_heads"]
        gone = _weakest(units, (total - target["heads"] * len(layer_idx)) // unit_heads)
        q_keep, kv_keep = [], []
        for j in range(len(layer_idx)):
            kv, group = now[j]["kv_heads"], now[j]["heads"] // now[j]["kv_heads"]
            removed = sum(1 for (jj, _) in gone if jj == j)  # the weakest `removed` units of this layer
            if self.head_grouping == "within_group":
                keep_pos = orders[j][:, removed:]
                q = sorted(k * group + int(p) for k in range(kv) for p in keep_pos[k])
                kvs = list(range(kv))
            else:
                kvs = sorted(int(k) for k in orders[j][removed:])
                q = [k * group + h for k in kvs for h in range(group)]
            q_keep.append(q)
            kv_keep.append(kvs)
        return q_keep, kv_keep

    @torch.no_grad()
    def compensation(self, student: nn.Module, spec: dict[str, Any]) -> list[tuple[int, str, Tensor]]:
        """Bias terms that stand in for the removed channels and heads: (new layer index, kind, vector).

        For removed MLP channels C: ``down_proj.weight[:, C] @ mean(x_C)``; for removed query heads: their
        ``o_proj`` columns times the mean of their slice of the ``o_proj`` input. Computed from the weights
        before slicing. Removed layers are not compensated.
        """
        layers = decoder_layers(student)
        kept_layers = spec["layers"] if spec["layers"] is not None else list(range(len(layers)))
        out = []
        for j, i in enumerate(kept_layers):
            layer = layers[i]
            if spec["channels"] is not None:
                down = layer.mlp.down_proj.weight
                gone = sorted(set(range(down.shape[1])) - set(spec["channels"][j]))
                mean = self.scores.input_mean("mlp", i).to(down)
                out.append((j, "mlp", down[:, gone] @ mean[gone]))
            if spec["q_heads"] is not None:
                o_proj, d = layer.self_attn.o_proj, layer.self_attn.head_dim
                gone = sorted(set(range(o_proj.in_features // d)) - set(spec["q_heads"][j]))
                cols = [c for h in gone for c in range(h * d, (h + 1) * d)]
                mean = self.scores.input_mean("attn", i).to(o_proj.weight)
                out.append((j, "attention", o_proj.weight[:, cols] @ mean[cols]))
        return out

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Schedule progress, the original widths and the partial scores."""
        return {"done": list(self.done), "original": self.original, "scores": self.scores.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the schedule where the checkpoint left it."""
        self.done = list(state_dict["done"])
        self.original = state_dict["original"]
        if self.original is not None:
            self.final = self._final_sizes(self.original)
        self.scores.load_state_dict(state_dict["scores"])


@torch.no_grad()
def add_compensation(student: nn.Module, terms: list[tuple[int, str, Tensor]]) -> None:
    """Add bias-compensation terms to ``down_proj`` (``mlp``) or ``o_proj`` (``attention``) biases."""
    layers = decoder_layers(student)
    for j, kind, vec in terms:
        lin = layers[j].mlp.down_proj if kind == "mlp" else layers[j].self_attn.o_proj
        lin.bias.add_(vec.to(lin.bias))


def _standardised(scores: Tensor) -> Tensor:
    """Per-layer z-scores, so units of different layers can be ranked together (FLAP)."""
    scores = scores.double()
    return (scores - scores.mean()) / (scores.std(unbiased=False) + 1e-12)


def _weakest(units: list[tuple[float, int, int]], k: int) -> set[tuple[int, int]]:
    """(layer, unit) of the ``k`` lowest-scored units; ties go to the lower layer and unit so every rank agrees."""
    return {(j, u) for _, j, u in sorted(units)[: max(k, 0)]}


def _top(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ascending; ties go to the lower index so every rank agrees."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def _is_llama_like(model: nn.Module) -> bool:
    try:
        layer = decoder_layers(model)[0]
        attn, mlp = layer.self_attn, layer.mlp
        return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "num_key_value_groups")) and all(
            hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")
        )
    except (AttributeError, IndexError, TypeError):
        return False


def _rewrap_ddp(trainer: pl.Trainer) -> None:
    """Wrap the LightningModule in a fresh DistributedDataParallel after its parameters changed.

    DDP's reducer holds the old parameters and their gradient buckets, so it cannot sync the sliced ones.
    Lightning 2.6's ``DDPStrategy.configure_ddp`` wraps ``strategy.model``; point that back at the bare
    module and call it again (it broadcasts rank 0's weights, identical here since all ranks pruned alike).
    """
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
