"""The LightningModule: a frozen teacher, a trainable student, and the distillation objective."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from distill.compress.replay import replay
from distill.compress.stages import check_stage_order
from distill.cost import parameter_count
from distill.data.generation import Generation
from distill.models.teacher import Teacher
from distill.objective.divergences import IGNORE_INDEX
from distill.objective.objective import DistillationObjective
from distill.runtime.gather import is_fsdp_wrapped, own_params_gathered
from distill.runtime.rank_zero_load import peak_host_mib

TEACHER_PREFIX = "teacher."
Carry = Callable[[Tensor], Tensor]

# Lightning warns about submodules left in eval mode when fit starts; the frozen teacher is exactly that.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


log = logging.getLogger("distill")

# The loss terms validation reports (``val/loss``, ``val/ce_loss``...), each a token-weighted mean over the epoch.
VAL_TERMS = ("loss", "ce", "kd", "hidden")


class DistillModule(pl.LightningModule):
    """Trains ``student`` to match ``teacher`` under ``objective``.

    The teacher is a real submodule, so device moves and strategy wrapping (FSDP, DeepSpeed) treat
    it like the student, but it is frozen, never in the optimizer, and stripped from every
    ``state_dict`` and therefore from checkpoints. Loading a checkpoint tolerates its absence.

    Structural changes to the student are recorded in ``self.structure`` (see :mod:`distill.compress.stages`)
    and saved with the checkpoint, so resuming rebuilds them before the weights load.

    Args:
        teacher: the teacher, live or cached (any Teacher).
        student: the model to train.
        objective: the loss (it may hold trainable parameters, such as a hidden-state projection).
        optimizer: a partial optimizer factory taking the parameters.
        scheduler: a partial LR scheduler factory taking the optimizer, stepped every optimizer step.
        vocab_size: vocabulary compared between the models (the shared prefix when sizes differ).
        generation: replaces a share of each training batch with student- or teacher-generated sequences
            (:mod:`distill.data.generation`); None = the corpus only.
        student_tokenizer: the student's tokenizer when it differs from the teacher's
            (``distill.objective.cross_tokenizer``); None = the teacher's.

    """

    def __init__(
        self,
        teacher: Teacher,
        student: PreTrainedModel,
        objective: DistillationObjective,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        vocab_size: int | None = None,
        generation: Generation | None = None,
        student_tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.initial_student_config = student.config.to_dict()  # before any callback changes its structure
        # Token-weighted means of the validation terms, reduced across ranks by torchmetrics: the epoch's numbers
        # then do not depend on how the batches were split across ranks (EvalBatchSampler).
        self.val_terms = nn.ModuleDict({k: MeanMetric() for k in VAL_TERMS})
        self.student = student
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = student_tokenizer if student_tokenizer is not None else teacher.tokenizer
        student_rows = student.get_output_embeddings().weight.shape[0]
        # Across tokenizers the student's logits are compared with nothing position by position: all of them count.
        self.vocab_size = vocab_size or (student_rows if objective.cross else min(teacher.vocab_size, student_rows))
        self.structure: list[dict[str, Any]] = []
        self.generation = generation if generation is not None and generation.enabled else None
        # Decided once: chunking changes how the loss is computed, never its value.
        self.chunked = objective.use_chunked(self.vocab_size, student)
        self._last_step_end: float | None = None
        self.save_hyperparameters(
            {
                "vocab_size": self.vocab_size,
                "loss": objective.loss_name,
                "alpha": objective.alpha,
                "temperature": objective.temperature,
                "teacher": teacher.name,
            }
        )
        self.register_state_dict_post_hook(_drop_teacher_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_teacher_keys)

    # -- structure ----------------------------------------------------------------------------
    def record_structure_change(self, kind: str, spec: dict[str, Any]) -> None:
        """Log a change a callback made to the student, so checkpoints can rebuild it.

        Refuses a change of an earlier compression stage after a later one
        (see :func:`distill.compress.stages.stage_names`).
        """
        check_stage_order([c["kind"] for c in self.structure], kind)
        self.structure.append({"kind": kind, "spec": copy.deepcopy(spec)})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the structure log and the student's configs (as built, and as now) next to the weights.

        The config as built is what the structure log replays onto (``evaluate.py`` rebuilds a student from
        a checkpoint that way); the current one says what the student has become.
        """
        if self.generation is not None:  # the teacher continuations so far, so a resumed run reads what this one had
            self.generation.flush(self.global_step)
        checkpoint["student_structure"] = copy.deepcopy(self.structure)
        checkpoint["student_config"] = self.student.config.to_dict()
        checkpoint["student_config_initial"] = copy.deepcopy(self.initial_student_config)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the saved structure on the fresh student; Lightning loads the weights right after."""
        saved = checkpoint.get("student_structure", [])
        done = len(self.structure)
        if saved[:done] != self.structure:
            raise RuntimeError("the student already went through structure changes that differ from the checkpoint's")
        replay(self.student, saved[done:])
        self.structure = copy.deepcopy(saved)

    # -- forward ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillModule:
        """Switch the student (and objective) mode; the teacher stays in eval."""
        super().train(mode)
        self.teacher.train(False)
        return self

    def _cross_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The step across tokenizers: the teacher reads each row's text in its own tokens (cross_batch.py)."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        pairs = self.objective.cross.align(ids, batch.get("kd_labels", batch["labels"]))
        t_logits = self.teacher(pairs.teacher_ids, attention_mask=pairs.teacher_mask).logits
        s_logits = self.student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        s_rows = s_logits.reshape(-1, s_logits.shape[-1])[pairs.student_rows]
        t_rows = t_logits.reshape(-1, t_logits.shape[-1])[pairs.teacher_rows]
        return self.objective.forward_cross(s_logits, batch["labels"], s_rows, t_rows)

    def _step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.objective.cross is not None:
            return self._cross_step(batch)
        hidden = self.objective.needs_hidden_states
        ids, mask, v = batch["input_ids"], batch.get("attention_mask"), self.vocab_size
        # A cached teacher serves its top-k and tail buckets at the KD temperature (teacher_cache.py).
        cached = self.teacher.cached
        if self.chunked:
            extra = {"temperature": self.objective.temperature} if cached else {}
            # Under FSDP the teacher unit's own weights are gathered for the whole loss (gather.py); the
            # student's output layer sits in the root unit, which is whole during the step.
            with own_params_gathered(self.teacher):
                teacher_rows, t_hidden = self.teacher.rows(ids, mask, output_hidden_states=hidden, vocab=v, **extra)
                s_out = self.student.base_model(
                    input_ids=ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False
                )
                return self.objective.forward_chunked(
                    s_out.last_hidden_state,
                    self.student.get_output_embeddings(),
                    teacher_rows,
                    batch["labels"],
                    v,
                    student_hidden=s_out.hidden_states if hidden else None,
                    teacher_hidden=t_hidden if hidden else None,
                    attention_mask=mask,
                    kd_labels=batch.get("kd_labels"),
                )
        if cached:
            if hidden:
                self.teacher(ids, output_hidden_states=True)  # a cache holds no hidden states: explains and raises
            t_logits, t_states = self.teacher.targets(ids, self.objective.temperature, vocab=v), None
        else:
            t_out = self.teacher(ids, attention_mask=mask, output_hidden_states=hidden)
            t_logits, t_states = t_out.logits[..., :v], t_out.hidden_states if hidden else None
        s_out = self.student(input_ids=ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False)
        return self.objective(
            s_out.logits[..., :v],
            t_logits,
            batch["labels"],
            student_hidden=s_out.hidden_states if hidden else None,
            teacher_hidden=t_states,
            attention_mask=mask,
            kd_labels=batch.get("kd_labels"),
        )

    def on_fit_start(self) -> None:
        """With ``distill.generation.teacher_cache``: read the teacher continuations earlier runs (or this one) kept."""
        gen = self.generation
        if gen is not None and gen.teacher_cache and gen.teacher_fraction > 0:
            folder = gen.cache_folder(self.teacher, self.trainer.datamodule.data_key())
            gen.load_cache(folder)
            log.info("teacher continuations: %d kept in %s", len(gen.cached or {}), folder)

    def on_train_end(self) -> None:
        """Publish the last teacher continuations; log this rank's peak host memory (``bench/fsdp_memory.py``)."""
        if self.generation is not None:
            self.generation.flush(self.global_step)
        log.info("rank %d peak host memory %.0f MiB", self.global_rank, peak_host_mib())

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _generate(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Replace a share of the batch with generated sequences; log their token share and the time it took."""
        started = time.perf_counter()
        micro = batch_idx % self.trainer.accumulate_grad_batches
        step, rank = self.global_step, self.global_rank
        batch, generated = self.generation.apply(batch, self.student, self.teacher, step, micro, rank, self._pad_id())
        real = float(batch["kd_labels"].ne(IGNORE_INDEX).sum()) if "kd_labels" in batch else batch["input_ids"].numel()
        self.log("train/generated_share", generated / max(real, 1.0))
        self.log("train/generation_s", time.perf_counter() - started)
        return batch

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One distillation step (on partly generated rows with ``distill.generation``); logs the loss terms."""
        if self.generation is not None:
            batch = self._generate(batch, batch_idx)
        out = self._step(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_dict({f"train/{k}_loss": out[k] for k in ("ce", "kd", "hidden") if k in out})
        return out["loss"]

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Log tokens/s over the whole step."""
        # Throughput over the whole step (data, teacher, student, optimizer), across all ranks.
        now = time.perf_counter()
        if self._last_step_end is not None:
            tokens = batch["input_ids"].numel() * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / (now - self._last_step_end), prog_bar=True)
        self._last_step_end = now

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Validation losses, kept per term weighted by the batch's real tokens (padding batches weigh 0)."""
        out = self._step(batch)
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()
        for key, metric in self.val_terms.items():
            if key in out:
                # A batch with no real token (a rank's padding batch) may give NaN; it weighs 0 either way.
                value = out[key].detach().float() if tokens > 0 else torch.zeros((), device=tokens.device)
                metric.update(value, weight=tokens)

    def on_validation_epoch_end(self) -> None:
        """Log the epoch's token-weighted losses, the perplexity, and the student's size (quality vs size).

        Every rank ran the same number of batches, so every rank calls ``compute()`` (a collective). ``val/ppl``
        is exp(mean CE over every validation token), not the mean of the batches' exp(CE): by Jensen's
        inequality that mean overstates the perplexity, the more so the more the batches differ.
        """
        for key, metric in self.val_terms.items():
            if metric.update_called:
                value = metric.compute()  # reduces across ranks
                # Equal on every rank already; sync_dist only averages equal values (and silences Lightning).
                name = "val/loss" if key == "loss" else f"val/{key}_loss"
                self.log(name, value, prog_bar=key == "loss", sync_dist=True)
                if key == "ce":
                    self.log("val/ppl", torch.exp(value), sync_dist=True)
            metric.reset()
        # Under FSDP each rank holds a shard of every parameter, so the shards' counts add up to the student's;
        # a ZeRO-3 placeholder counts as its whole parameter on every rank (parameter_count).
        sharded = self._trainer is not None and is_fsdp_wrapped(self.trainer.strategy.model)
        count = float(parameter_count(self.student))
        self.log("student/params", count, sync_dist=True, reduce_fx="sum" if sharded else "mean")

    # -- optimisation -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and objective parameters that require grad; never the teacher's."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for p in self.objective.parameters() if p.requires_grad]
        return params

    def rebuild_optimizers(self, carry: Mapping[nn.Parameter, tuple[nn.Parameter, Carry | None]] | None = None) -> None:
        """Re-create the optimizer and scheduler after the student's parameters changed mid-run.

        Optimizer state (Adam moments, step counts) moves to the new optimizer for every parameter that
        survived as the same object, and for each new parameter that ``carry`` maps to an old one, through
        an optional function that slices or reshapes the old state tensors. The scheduler continues from
        the same step, and each group starts at the *scheduled* rate: the scheduler's last rate, or the
        configured one when nothing schedules it. The old groups' rates are not copied: during a step they may
        hold a factor meant for that step only (``callbacks/wall_clock_lr.py`` scales them from the batch start
        to the optimizer step), which would then stay for the rest of the run wherever no scheduler recomputes
        the rate from scratch (no scheduler, or one that chains on the current rate such as StepLR).

        Args:
            carry: new parameter → (old parameter, function applied to each non-scalar state tensor).

        """
        trainer = self.trainer
        old_state = {p: st for opt in trainer.optimizers for p, st in opt.state.items()}
        old_scheds = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
        trainer.strategy.setup_optimizers(trainer)
        for config, state in zip(trainer.lr_scheduler_configs, old_scheds, strict=False):
            config.scheduler.load_state_dict(state)
            if isinstance(config.scheduler, LRScheduler | ReduceLROnPlateau):
                rates = config.scheduler.get_last_lr()
                for group, lr in zip(config.scheduler.optimizer.param_groups, rates, strict=False):
                    group["lr"] = lr
        carry = carry or {}
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    src, fn = carry.get(p, (p, None))
                    if src in old_state:
                        opt.state[p] = {
                            k: (fn(v) if fn is not None and torch.is_tensor(v) and v.dim() > 0 else v)
                            for k, v in old_state[src].items()
                        }

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip as configured; under FSDP by the norm over all shards, which Lightning's FSDP precision refuses.

        Lightning raises for ``gradient_clip_algorithm='norm'`` with FSDP (each rank holds only its shard, so a
        local norm would be wrong); FSDP's own ``clip_grad_norm_`` all-reduces the shards' norms.
        """
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self.trainer.model if self._trainer is not None else None
        if isinstance(model, FullyShardedDataParallel) and gradient_clip_val and gradient_clip_algorithm != "value":
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        """The optimizer over :meth:`trainable_parameters`, with the per-step LR schedule."""
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _drop_teacher_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + TEACHER_PREFIX)]:
        del state_dict[key]


def _ignore_missing_teacher_keys(module: nn.Module, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(TEACHER_PREFIX)]
