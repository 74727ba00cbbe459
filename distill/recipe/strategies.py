"""Multi-device strategies: checking a trainer config before any work, and sharding the teacher with the student.

Lightning owns the strategies (DDP, FSDP, DeepSpeed); this module only adds what distillation needs:

* :func:`check_trainer_config` refuses combinations that would fail late or obscurely (FSDP/DeepSpeed on a
  CPU accelerator, a bare ``strategy=fsdp``, the chunked loss under ZeRO-3, ``trainer.devices`` disagreeing
  with the SLURM tasks per node), before a teacher loads.
* :func:`check_sharded_callbacks` refuses the compression stages a sharded student cannot take
  (each stage's ``refused_under``, :class:`distill.compress.stages.Stage`), before a teacher loads.
* :func:`fsdp_strategy` builds Lightning's ``FSDPStrategy`` with :func:`shard_policy`, which shards every
  decoder layer of *both* models and the rest of the teacher, so the frozen teacher is not replicated (layers
  that share weights stay in one unit: :func:`keeping_shared_together`).
* :func:`apply_student_switches` turns on activation checkpointing and ``torch.compile`` for the student.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from distill.compress.stages import registry
from distill.config import config_error
from distill.models.teacher import FrozenTeacher
from distill.runtime.gather import full_state_dict_context, is_sharded
from distill.runtime.rank_zero_load import prepare_rank_zero_load

log = logging.getLogger("distill")

# Strategies Lightning only runs on GPUs; on a CPU accelerator they fail inside Trainer() or at fit time.
GPU_ONLY = ("fsdp", "deepspeed")


def strategy_name(strategy: Any) -> str:
    """A lower-case name for a strategy given as a string, a config node with ``_target_``, or an object.

    ``"deepspeed_stage_3_offload"`` → ``"deepspeed_stage_3_offload"``; a node targeting
    ``lightning.pytorch.strategies.FSDPStrategy`` or :func:`fsdp_strategy` → ``"fsdp"``.
    """
    if strategy is None:
        return "auto"
    if isinstance(strategy, str):
        return strategy.lower()
    if isinstance(strategy, Mapping):
        target = str(strategy.get("_target_", "")).rsplit(".", 1)[-1].lower()
    else:
        target = type(strategy).__name__.lower()
    for sim in ("fsdp_sim", "deepspeed_sim"):
        if sim in target:
            return sim
    for name in GPU_ONLY + ("ddp",):
        if name in target:
            return name
    return target or "auto"


def is_gpu_only(strategy: Any) -> bool:
    """Whether Lightning requires a GPU accelerator for ``strategy`` (the ``*_sim`` ones are made to run on CPU)."""
    name = strategy_name(strategy)
    return name.startswith(GPU_ONLY) and name not in ("fsdp_sim", "deepspeed_sim")


def is_fsdp(strategy: Any) -> bool:
    """Whether ``strategy`` shards with FSDP (``trainer=fsdp`` or its CPU simulation ``trainer=fsdp_sim``)."""
    return strategy_name(strategy) in ("fsdp", "fsdp_sim")


def is_zero3(strategy: Any, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``strategy`` is DeepSpeed ZeRO stage 3 (parameters partitioned across ranks).

    The stage is read where Lightning's ``DeepSpeedStrategy`` reads it: a DeepSpeed config (a dict, or the path
    of a JSON file, in ``config``; without one, the file ``PL_DEEPSPEED_CONFIG_PATH`` in ``environ`` names) sets
    it by ``zero_optimization.stage`` (DeepSpeed's default 0) and makes Lightning ignore ``stage``; otherwise
    ``stage`` (Lightning's default 2), or the registry name (``deepspeed_stage_3_offload``) of a string.

    Raises:
        ConfigError: ``config`` names a file that does not exist or is not JSON.

    """
    name = strategy_name(strategy)
    if not name.startswith("deepspeed"):
        return False
    environ = os.environ if environ is None else environ
    field, config = "PL_DEEPSPEED_CONFIG_PATH", environ.get("PL_DEEPSPEED_CONFIG_PATH")
    if isinstance(strategy, str):
        stage = 3 if "stage_3" in name else 2
    elif isinstance(strategy, Mapping):
        stage = strategy.get("stage") or 2
        if strategy.get("config"):
            field, config = "trainer.strategy.config", strategy.get("config")
    else:  # a built DeepSpeedStrategy: its config holds the stage, whichever way it was given
        config, stage = getattr(strategy, "config", None), 2
    if isinstance(config, str | os.PathLike):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError) as err:
            raise config_error(field, str(config), f"give a DeepSpeed JSON config file ({err})") from None
    if isinstance(config, Mapping):
        stage = (config.get("zero_optimization") or {}).get("stage", 0)
    return int(stage) == 3


def _check_counts(trainer: Mapping[str, Any]) -> None:
    """Step and accumulation counts Lightning would take without complaint and then train nothing with."""
    max_steps = trainer.get("max_steps", -1)
    if not isinstance(max_steps, int) or max_steps < -1:
        raise config_error("trainer.max_steps", max_steps, "give a step count, or -1 for no step limit")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if not isinstance(accumulate, int) or accumulate < 1:
        raise config_error(
            "trainer.accumulate_grad_batches", accumulate, "must be a positive integer (1 = no accumulation)"
        )
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (not isinstance(clip, (int, float)) or clip < 0):
        raise config_error("trainer.gradient_clip_val", clip, "must be 0 or more (null or 0 = no clipping)")


def check_trainer_config(
    trainer: Mapping[str, Any], environ: Mapping[str, str] | None = None, objective: Mapping[str, Any] | None = None
) -> None:
    """Refuse a trainer config that cannot run, before any model is built or any job is submitted.

    Args:
        trainer: the ``trainer`` config node (a DictConfig or a plain mapping).
        environ: the environment to read ``SLURM_NTASKS_PER_NODE`` from (default ``os.environ``).
        objective: the ``distill.objective`` node, to refuse the chunked loss under ZeRO-3.

    Raises:
        ConfigError: FSDP/DeepSpeed with ``accelerator=cpu``; the chunked loss under ZeRO-3; ``devices`` not
            matching the SLURM tasks per node.

    """
    environ = os.environ if environ is None else environ
    strategy, accelerator = trainer.get("strategy"), str(trainer.get("accelerator", "auto")).lower()
    if is_gpu_only(strategy) and accelerator == "cpu":
        raise config_error(
            "trainer.accelerator",
            accelerator,
            f"the {strategy_name(strategy)} strategy runs on GPUs only; use trainer.accelerator=gpu, "
            "or trainer=ddp_sim to try multi-process training on CPU",
        )
    if isinstance(strategy, str) and strategy.lower().startswith("fsdp"):
        raise config_error(
            "trainer.strategy",
            strategy,
            "use trainer=fsdp: Lightning's bare FSDP strategy has no wrap policy for the teacher, so its parameters "
            "would sit in the root unit with the student's and checkpointing (which leaves the teacher out) fails",
        )
    if is_zero3(strategy) and objective is not None and objective.get("chunked", False) is True:
        raise config_error(
            "distill.objective.chunked",
            objective.get("chunked"),
            "the chunked loss reads the output layer's weight outside its forward, where ZeRO-3 leaves it "
            "partitioned; set distill.objective.chunked=false (or auto, which is off under ZeRO-3), or train with "
            "trainer=fsdp, where the chunked loss runs",
        )
    _check_counts(trainer)
    warn_slow_cpu_precision(trainer)
    # Under srun every task is one Lightning process; if the two counts differ, Lightning either hangs
    # waiting for ranks that never start or raises deep inside setup, so name the fix here.
    per_node = environ.get("SLURM_NTASKS_PER_NODE")
    if per_node and environ.get("SLURM_JOB_ID"):
        tasks = int(per_node.split("(")[0])  # SLURM may write "4(x2)" for 2 nodes of 4
        devices = trainer.get("devices", "auto")
        if str(devices) != str(tasks):
            raise config_error(
                "trainer.devices",
                devices,
                f"this SLURM job runs {tasks} tasks per node (--ntasks-per-node); set trainer.devices={tasks}, "
                "or submit with `python -m slurm.submit`, which derives --ntasks-per-node from trainer.devices",
            )


def warn_slow_cpu_precision(trainer: Mapping[str, Any], bf16_matmul: bool | None = None) -> bool:
    """Warn when bf16 autocast will run on a CPU without bf16 matmul instructions (AVX-512 BF16 or AMX).

    There oneDNN emulates bf16 matmuls: on the 2-core AMD EPYC (AVX2) this project is built on,
    ``bench/step_time.py`` measured the step's GEMM shapes at about 1/25 of their fp32 speed, so a
    ``bf16-mixed`` step is far slower, not faster. A warning, not a refusal: the run is still correct.
    Returns whether it warned.
    """
    precision = str(trainer.get("precision", "32"))
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if "bf16" not in precision or accelerator not in ("cpu", "auto"):
        return False
    import torch

    if accelerator == "auto" and torch.cuda.is_available():
        return False
    if bf16_matmul is None:
        bf16_matmul = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if bf16_matmul:
        return False
    log.warning(
        "trainer.precision=%s on a CPU without bf16 matmul instructions (%s): bf16 matmuls are emulated here and "
        "run many times slower than fp32 (bench/step_time.py measures both); use trainer.precision=32 on this CPU",
        precision,
        torch.backends.cpu.get_cpu_capability(),
    )
    return True


# Why a compression stage cannot run on a sharded student (docs/scale_out.md's table), under FSDP (each rank
# holds a flat shard of every unit outside the forward) and under ZeRO-3 (an empty placeholder, 1/N of each
# parameter aside). The stages not named run: they change the student before the strategy wraps it, and the
# export gathers it (QAT converts the gathered student).
MID_RUN_REASON = (
    "the change would replace modules or parameters after the strategy wrapped the student, and only pruning "
    "unwraps and wraps it again (FSDP, distill/runtime/rewrap.py); set start_step=0 (the change happens before "
    "wrapping), or train without sharding (trainer=ddp, or one device)"
)


def check_sharded_generation(trainer: Mapping[str, Any], generation: Mapping[str, Any] | None) -> None:
    """Refuse generated rows under FSDP and ZeRO-3, whose sharded student cannot run ``generate`` outside a forward."""
    strategy = trainer.get("strategy")
    if not (is_fsdp(strategy) or is_zero3(strategy)) or not generation:
        return
    for key in ("student_fraction", "teacher_fraction"):
        if generation.get(key):
            raise config_error(
                f"distill.generation.{key}",
                generation[key],
                f"the {strategy_name(strategy)} strategy shards the models, and sampling with them (generate, "
                "token by token outside the wrapped forward) is not supported; use trainer=ddp, or set it to 0",
            )


def check_sharded_callbacks(trainer: Mapping[str, Any], callbacks: Mapping[str, Any] | None) -> None:
    """Refuse compression stages a sharding strategy (FSDP, DeepSpeed ZeRO-3) cannot run, before any model loads.

    Export and evaluation run under both: the student is gathered first (:mod:`distill.runtime.gather`). QAT,
    sharing and low-rank run under both from step 0 (``Stage.before_wrapping``); a stage whose record refuses the
    strategy (``Stage.refused_under``: pruning under DeepSpeed, sparsity under FSDP and ZeRO-3) is refused.

    Args:
        trainer: the ``trainer`` config node.
        callbacks: the ``callbacks`` node.

    Raises:
        ConfigError: naming the first such setting, the strategy, why, and what runs instead.

    """
    strategy = trainer.get("strategy")
    name = strategy_name(strategy)
    family = "fsdp" if is_fsdp(strategy) else "zero3" if is_zero3(strategy) else "deepspeed"
    if family == "deepspeed" and not name.startswith("deepspeed"):
        return
    callbacks = callbacks or {}
    stages = registry().values()
    if family != "deepspeed":  # sharded: the one-shot stages only before the strategy wraps the student
        for stage in (s for s in stages if s.before_wrapping):
            start = (callbacks.get(stage.name) or {}).get("start_step") or 0
            if start > 0:
                raise config_error(f"callbacks.{stage.name}.start_step", start, f"under {name}: {MID_RUN_REASON}")
    for stage in stages:
        if callbacks.get(stage.name) and family in stage.refused_under:
            raise config_error(
                f"callbacks.{stage.name}",
                "set",
                f"not supported under the {name} strategy: {stage.refused_under[family]}; train with trainer=ddp "
                f"(trainer=ddp_sim on CPU), where every rank holds the whole student, or remove callbacks.{stage.name}",
            )


def check_prune_strategy(strategy: Any, end_step: int, max_steps: int) -> None:
    """Refuse strategies and step budgets that pruning mid-run cannot work with (the rest: ``check_stack``)."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    supported = (SingleDeviceStrategy, DDPStrategy, FSDPStrategy)
    if not isinstance(strategy, supported) or "DeepSpeed" in type(strategy).__name__:
        raise config_error(
            "trainer.strategy",
            type(strategy).__name__,
            "pruning mid-run is supported on one device, under DDP and under FSDP only (DeepSpeed's engine "
            "owns the optimizer it rebuilds); use trainer=cpu, gpu, ddp, ddp_sim, fsdp or fsdp_sim",
        )
    if max_steps > 0 and end_step >= max_steps:
        raise config_error(
            "callbacks.prune.end_step",
            end_step,
            f"the schedule must finish before trainer.max_steps={max_steps}; lower end_step",
        )


def is_transformer_block(module: nn.Module) -> bool:
    """Whether ``module`` is one decoder layer of a Hugging Face causal LM (teacher or student)."""
    # HF names every block class ``<Family>DecoderLayer`` (LlamaDecoderLayer, Qwen2DecoderLayer, ...);
    # matching the name keeps the policy independent of which families are installed.
    return type(module).__name__.endswith("DecoderLayer")


def shard_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: one unit per decoder layer (teacher and student), and one for the teacher's rest.

    torch wraps bottom-up, so the teacher's layers become units first and the ``FrozenTeacher`` unit then
    holds only its embeddings, final norm and output layer (tied or not). Keeping every teacher parameter out
    of the root unit matters: the module drops ``teacher.`` keys from its ``state_dict``, and FSDP's
    full-state-dict hook asserts that each parameter of a unit is present when that unit's hook runs; the
    teacher unit's hook runs before the module's, the root's after it.
    """
    if recurse:  # keep descending
        return True
    return is_transformer_block(module) or isinstance(module, FrozenTeacher)


def keeping_shared_together(policy: Callable[..., bool], model: nn.Module) -> Callable[..., bool]:
    """``policy``, except that no module holding a Parameter that a module outside it also holds becomes a unit.

    FSDP flattens a Parameter into the first unit that holds it; another unit using it would then read that
    unit's shard. A student whose decoder layers share weights (``callbacks=share``) therefore keeps those
    layers in the enclosing unit, the root, which is whole for the whole step (as under DDP; its gradients and
    Adam moments stay sharded). Every other decoder layer, the teacher's included, is a unit as before.
    """

    def shares_outside(module: nn.Module) -> bool:
        # Read from the model as it is at the call: the filling from rank 0 and the wrapping replace parameters.
        inside = {id(p) for p in module.parameters()}
        members = {id(m) for m in module.modules()}
        return any(
            id(p) in inside for m in model.modules() if id(m) not in members for p in m.parameters(recurse=False)
        )

    def wrap(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        decision = policy(module=module, recurse=recurse, nonwrapped_numel=nonwrapped_numel)
        return decision if recurse or not decision else not shares_outside(module)

    return wrap


def wrap_kwargs(model: nn.Module, kwargs: Mapping[str, Any], device: Any) -> dict[str, Any]:
    """FSDP's keyword arguments for ``model``: shared Parameters kept in one unit, units filled from rank 0.

    Every rank must call it (see :func:`distill.runtime.rank_zero_load.prepare_rank_zero_load`).
    """
    kwargs = dict(kwargs)
    if kwargs.get("auto_wrap_policy") is not None:
        kwargs["auto_wrap_policy"] = keeping_shared_together(kwargs["auto_wrap_policy"], model)
    return prepare_rank_zero_load(model, kwargs, device)


def fsdp_strategy(strategy_class: type | None = None, **kwargs: Any) -> Any:
    """Lightning's ``FSDPStrategy`` that shards the decoder layers of the student and of the teacher.

    The teacher is a submodule of :class:`distill.module.DistillModule`, so :func:`shard_policy` reaches it
    too: each rank holds 1/N of every teacher unit and gathers one unit at a time in the forward pass.
    ``use_orig_params=True`` lets frozen and trainable tensors be handled per parameter (the optimizer sees
    only the student's). The chunked loss calls the teacher's body outside the teacher unit's forward, so it
    gathers that unit's own parameters itself (:func:`distill.runtime.gather.own_params_gathered`).

    Args:
        strategy_class: ``FSDPStrategy`` or a subclass of it (:func:`fsdp_sim_strategy`'s).
        **kwargs: passed to ``FSDPStrategy`` (``sharding_strategy``, ``cpu_offload``, ``state_dict_type``...).

    """
    strategy_class = strategy_class or rank_zero_fsdp_class()
    kwargs.setdefault("auto_wrap_policy", shard_policy)
    kwargs.setdefault("use_orig_params", True)
    # One full state dict on rank 0: the module's state_dict hook drops the teacher's keys from it, and
    # resume=auto and the export read a plain .ckpt file.
    kwargs.setdefault("state_dict_type", "full")
    return strategy_class(**kwargs)


def rank_zero_fsdp_class() -> type:
    """Lightning's ``FSDPStrategy``, filling the units of a model that ranks > 0 built empty from rank 0.

    See :mod:`distill.runtime.rank_zero_load`: only rank 0 reads the teacher; the others receive each unit's
    weights just before FSDP shards it.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    class RankZeroLoadFSDPStrategy(FSDPStrategy):
        """``FSDPStrategy`` whose wrapping fills empty (meta) units from rank 0 (:func:`prepare_rank_zero_load`)."""

        def _setup_model(self, model: nn.Module) -> nn.Module:
            if is_sharded(model):  # wrapped already (trainer=fsdp_sim wraps it on the CPU itself)
                return super()._setup_model(model)
            original = self.kwargs
            self.kwargs = wrap_kwargs(model, original, self.root_device)
            try:
                return super()._setup_model(model)
            finally:
                self.kwargs = original

        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
            # Lightning loads the weights into the wrapped model; a checkpoint of a pruned student needs its
            # shapes first, which a resumed run has not rebuilt yet (docs/scale_out.md, rewrap.py).
            from distill.runtime.rewrap import restructure_for_checkpoint

            restructure_for_checkpoint(self.lightning_module.trainer, checkpoint_path)
            return super().load_checkpoint(checkpoint_path, weights_only)

    return RankZeroLoadFSDPStrategy


def fsdp_sim_strategy(**kwargs: Any) -> Any:
    """:func:`fsdp_strategy` on CPU processes over gloo: ``trainer=fsdp_sim``, FSDP's code path on a laptop.

    Lightning refuses its ``FSDPStrategy`` on a CPU accelerator, but only by an exact-type check
    (``type(strategy) is FSDPStrategy``) in its accelerator connector; torch's FSDP itself runs on CPU tensors
    over gloo. A subclass passes that check and keeps Lightning's real FSDP path (wrapping, sharded optimizer
    state, full-state-dict checkpoints); it changes only the root unit's device and the state-dict gather.
    """
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDPStrategy(rank_zero_fsdp_class()):
        """Lightning's FSDPStrategy with the root unit placed on the CPU (see :func:`fsdp_sim_strategy`)."""

        def _setup_model(self, model: nn.Module) -> nn.Module:
            # Lightning passes device_id=root_device.index, None on CPU, and torch's FSDP then looks for an
            # accelerator and refuses; device_id=cpu is what it accepts. Wrapped here with Lightning's own
            # arguments, the model is then "already wrapped" for Lightning, which does the rest as on GPUs.
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **wrap_kwargs(model, self.kwargs, torch.device("cpu")),
            )
            # Applied; Lightning would warn that it is ignored, and drop it from the arguments of a later wrap
            # (a pruning step wraps the model again, distill/runtime/rewrap.py).
            policy = self.kwargs.pop("auto_wrap_policy", None)
            try:
                return super()._setup_model(model)
            finally:
                if policy is not None:
                    self.kwargs["auto_wrap_policy"] = policy

        # Lightning's full state dict "offloads" to CPU, which crashes on CPU shards (full_state_dict_context).
        def lightning_module_state_dict(self) -> dict[str, Any]:
            with full_state_dict_context(self.model):
                return self.model.state_dict()

        def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
            from lightning.pytorch.core.optimizer import LightningOptimizer
            from torch.distributed.fsdp import OptimStateKeyType

            if isinstance(optimizer, LightningOptimizer):
                optimizer = optimizer._optimizer
            with full_state_dict_context(self.model):
                state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
                if self.global_rank == 0:  # keyed by parameter id, as Lightning stores it
                    key = OptimStateKeyType.PARAM_ID
                    state = FullyShardedDataParallel.rekey_optim_state_dict(state, key, self.model)
                return state

    kwargs.setdefault("process_group_backend", "gloo")
    return fsdp_strategy(strategy_class=CPUFSDPStrategy, **kwargs)


def without_deepspeed_shm_allreduce() -> None:
    """Keep DeepSpeed on CPU from building its shared-memory all-reduce kernel; gloo's all-reduce sums the same.

    The kernel is a C++ extension compiled on first use (a minute on a fresh machine), and its threads abort
    the process when the process group is destroyed. (``deepspeed.comm`` re-exports torch under the
    submodule's name, hence ``import_module``.)
    """
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def deepspeed_sim_strategy(**kwargs: Any) -> Any:
    """Lightning's ``DeepSpeedStrategy`` on CPU processes over gloo: ``trainer=deepspeed_sim`` (ZeRO on a laptop).

    ``param_persistence_threshold`` (DeepSpeed's ``stage3_param_persistence_threshold``) sets the size under
    which ZeRO-3 keeps a parameter whole on every rank; the other arguments are ``DeepSpeedStrategy``'s.

    Lightning refuses DeepSpeed without CUDA (``setup_environment``) and checks GPU indices against local
    ranks (``setup_distributed``); DeepSpeed itself partitions and trains on CPU tensors (its CPU accelerator).
    The subclass skips those two checks and hands DeepSpeed a device rank, and keeps the rest of Lightning's
    path: ``deepspeed.initialize``, the engine's backward and step, its checkpoint folders.
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    without_deepspeed_shm_allreduce()

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """Lightning's DeepSpeedStrategy without its CUDA-only check (see :func:`deepspeed_sim_strategy`)."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)  # what DeepSpeedStrategy runs after its CUDA check

        def setup_distributed(self) -> None:
            # Lightning's own, less its check that GPU indices match local ranks (CPU devices have none).
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model: nn.Module, optimizer: Any, lr_scheduler: Any = None) -> Any:
            # Lightning's own, with the local rank as device_rank where Lightning passes root_device.index, None
            # on CPU (DeepSpeed's CPU accelerator maps every index to "cpu"; -1 would make it a 1-rank engine).
            from types import SimpleNamespace

            import deepspeed

            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=SimpleNamespace(device_rank=self.local_rank),
                config=self.config,
                model=model,
                model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                dist_init_required=False,
            )
            return engine, ds_optimizer

    persistence = kwargs.pop("param_persistence_threshold", None)
    kwargs.setdefault("process_group_backend", "gloo")
    strategy = CPUDeepSpeedStrategy(**kwargs)
    if persistence is not None:  # not one of Lightning's arguments; its config dict takes DeepSpeed's key
        strategy.config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = persistence
    return strategy


def apply_student_switches(student: nn.Module, switches: Mapping[str, Any] | None) -> list[str]:
    """Turn on activation checkpointing and ``torch.compile`` for the student, as the config asks.

    ``compile`` compiles the student's forward and its body (``base_model``, which the chunked loss calls
    directly, bypassing the forward); ``compile_rounding`` compiles only the llama.cpp grids' fake quantizers,
    as QAT inserts them (:mod:`distill.compress.quant.compile_rounding`). Both keep the grids' fp16 scales
    exact (inductor's ``emulate_precision_casts``), so the GGUF file still holds what the student trained on.

    Args:
        student: the Hugging Face student model.
        switches: the ``trainer_extras`` node: ``activation_checkpointing`` and ``compile`` (booleans),
            ``compile_rounding`` (true, false or ``auto``).

    Returns:
        The names of the switches that were applied.

    """
    switches = switches or {}
    unknown = set(switches) - {"activation_checkpointing", "compile", "compile_rounding", "teacher_on_rank_zero"}
    if unknown:
        raise config_error(
            "trainer_extras",
            sorted(unknown),
            "known switches are activation_checkpointing, compile, compile_rounding and teacher_on_rank_zero",
        )
    applied = []
    if switches.get("activation_checkpointing"):
        if not getattr(student, "supports_gradient_checkpointing", False):
            raise config_error(
                "trainer_extras.activation_checkpointing",
                True,
                f"{type(student).__name__} does not support activation checkpointing; set it to false",
            )
        # Non-reentrant checkpointing works with frozen inputs and under FSDP/DeepSpeed. transformers 5
        # renamed gradient_checkpointing_enable (kept as a deprecated alias) to activation_checkpointing_enable.
        enable = getattr(student, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        applied.append("activation_checkpointing")
    if switches.get("compile"):
        from distill.compress.quant.compile_rounding import INDUCTOR_OPTIONS

        # In place (nn.Module.compile), so the object keeps its HF attributes (config, base_model...). The body
        # too: the chunked loss calls it directly, so compiling the forward alone left the default run eager.
        for module in {id(m): m for m in (student, getattr(student, "base_model", student))}.values():
            module.compile(options=INDUCTOR_OPTIONS)
        applied.append("compile")
    rounding = switches.get("compile_rounding", False)
    if rounding not in (True, False, "auto"):
        raise config_error(
            "trainer_extras.compile_rounding", rounding, "give true, false or auto (compile when the student is large)"
        )
    if rounding:
        from distill.compress.quant.compile_rounding import compile_rounding_on_forward

        compile_rounding_on_forward(student, rounding)
        applied.append("compile_rounding" if rounding is True else "compile_rounding=auto")
    return applied
