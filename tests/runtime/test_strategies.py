"""Strategies on a CPU-only machine: configs compose and build, bad combinations fail early, FSDP shards the
teacher (2 gloo ranks), DDP matches one process, and the student switches work."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import hydra
import pytest
import torch
from safetensors.torch import load_file

from distill.config import ConfigError
from distill.recipe.strategies import apply_student_switches, check_trainer_config, shard_policy, strategy_name
from tests.conftest import compose_cfg
from tests.helpers import SGD, run_train_cli
from train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("option", "stage", "offload"),
    [
        ("deepspeed_stage_2", 2, "trainer.strategy.offload_optimizer=true"),
        ("deepspeed_stage_3", 3, "trainer.strategy.offload_parameters=true"),
    ],
)
def test_deepspeed_configs_build_the_strategy(option, stage, offload, tmp_path, cache_dir):
    pytest.importorskip("deepspeed")  # Lightning then raises "you must have DeepSpeed installed"
    cfg = compose_cfg([f"trainer={option}", offload], tmp_path, cache_dir)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    key = "offload_optimizer" if stage == 2 else "offload_param"
    assert zero[key]["device"] == "cpu"
    assert strategy_name(cfg.trainer.strategy) == "deepspeed"


def test_deepspeed_sim_config_builds_zero3_on_cpu_with_every_parameter_partitioned(tmp_path, cache_dir):
    pytest.importorskip("deepspeed")
    from distill.recipe.strategies import is_gpu_only, is_zero3

    cfg = compose_cfg(["trainer=deepspeed_sim"], tmp_path, cache_dir)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 2
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert strategy_name(cfg.trainer.strategy) == "deepspeed_sim" and is_zero3(cfg.trainer.strategy)
    assert not is_gpu_only(cfg.trainer.strategy)
    check_trainer_config(cfg.trainer, environ={}, objective={"chunked": "auto"})
    with pytest.raises(ConfigError, match=r"distill.objective.chunked=True: .*ZeRO-3"):
        check_trainer_config(cfg.trainer, environ={}, objective={"chunked": True})


def test_fsdp_config_builds_the_strategy_with_the_teacher_policy(tmp_path, cache_dir):
    cfg = compose_cfg(["trainer=fsdp", "trainer.strategy.sharding_strategy=SHARD_GRAD_OP"], tmp_path, cache_dir)
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert strategy.kwargs["use_orig_params"] is True and strategy.kwargs["auto_wrap_policy"] is shard_policy
    assert strategy._state_dict_type == "full"


@pytest.mark.parametrize("option", ["fsdp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_gpu_strategies_on_cpu_fail_before_any_work(option, tiny_cfg, monkeypatch):
    import distill.models.teacher

    def no_load(*args, **kwargs):
        raise AssertionError("the teacher was built before the config was checked")

    monkeypatch.setattr(distill.models.teacher, "random_teacher", no_load)
    with pytest.raises(ConfigError, match=r"trainer.accelerator='cpu': the (fsdp|deepspeed) strategy runs on GPUs"):
        train(tiny_cfg(f"trainer={option}", "trainer.accelerator=cpu"))


def test_zero3_refuses_the_chunked_loss_and_fsdp_takes_it():
    zero3 = {"strategy": "deepspeed_stage_3", "accelerator": "gpu", "devices": 2}
    with pytest.raises(ConfigError, match=r"distill.objective.chunked=True: .*ZeRO-3.*chunked=false"):
        check_trainer_config(zero3, environ={}, objective={"chunked": True})
    check_trainer_config(zero3, environ={}, objective={"chunked": "auto"})  # train.py turns auto off under ZeRO-3
    fsdp = {"strategy": {"_target_": "distill.recipe.strategies.fsdp_strategy"}, "accelerator": "gpu", "devices": 2}
    check_trainer_config(fsdp, environ={}, objective={"chunked": True})  # gathered per step (test_fsdp_sim.py)
    check_trainer_config({**zero3, "strategy": "deepspeed_stage_2"}, environ={}, objective={"chunked": True})
    with pytest.raises(ConfigError, match=r"trainer.strategy='fsdp_cpu_offload': use trainer=fsdp"):
        check_trainer_config({**fsdp, "strategy": "fsdp_cpu_offload"}, environ={}, objective={"chunked": False})


def _build_module(cfg):
    teacher = hydra.utils.instantiate(cfg.teacher)
    torch.manual_seed(0)
    student = hydra.utils.instantiate(cfg.student, teacher=teacher)
    objective = hydra.utils.instantiate(cfg.distill.objective)
    objective.attach(student.config, teacher.config)
    from distill.module import DistillModule

    return DistillModule(teacher, student, objective, optimizer=hydra.utils.instantiate(cfg.distill.optimizer))


class _Step(torch.nn.Module):
    """What Lightning's FSDP wrapper does: route the training step through the root unit's forward."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        return self.module._step(batch)["loss"]


def _batch() -> dict:
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _fsdp_rank(rank: int, out_dir: str, cache_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    cfg = compose_cfg(["experiment=smoke", "distill.objective.chunked=false"], Path(out_dir), Path(cache_dir))
    wrapped = FSDP(
        _Step(_build_module(cfg)), auto_wrap_policy=shard_policy, use_orig_params=True, device_id=torch.device("cpu")
    )
    loss = wrapped(_batch())
    loss.backward()
    units = {name: m for name, m in wrapped.named_modules() if isinstance(m, FSDP)}
    teacher_units = {n: m for n, m in units.items() if ".teacher" in n}
    shards = {
        n: [m._handle.flat_param.numel(), m._handle.flat_param._unpadded_unsharded_size.numel()]
        for n, m in teacher_units.items()
        if m._handle is not None
    }
    teacher_grads = [n for n, p in wrapped.named_parameters() if ".teacher." in n and p.grad is not None]
    student_grads = [n for n, p in wrapped.named_parameters() if ".student." in n and p.grad is not None]
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        keys = list(wrapped.state_dict())
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "loss": loss.item(),
                "units": list(units),
                "shards": shards,
                "teacher_grads": teacher_grads,
                "student_grads": len(student_grads),
                "keys": keys,
            }
        )
    )
    dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow  # about 27 s on 2 loaded cores (two spawned interpreters); keeps this file near 45 s
def test_fsdp_policy_shards_the_teacher_across_two_ranks(tmp_path, cache_dir, tiny_teacher):
    # Lightning's FSDPStrategy needs CUDA; torch's FSDP itself runs on CPU with gloo, so the wrap policy
    # and the teacher's state-dict handling are checked here with 2 real ranks.
    torch.multiprocessing.spawn(_fsdp_rank, args=(str(tmp_path), str(cache_dir)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    cfg = compose_cfg(["experiment=smoke", "distill.objective.chunked=false"], tmp_path, cache_dir)
    module = _build_module(cfg)
    expected = module._step(_batch())["loss"].item()
    teacher_params = sum(p.numel() for p in module.teacher.parameters())
    for rank in ranks:
        assert rank["loss"] == pytest.approx(expected, rel=1e-5)  # sharding changes nothing in the maths
        assert any(u.endswith("m.teacher") or u.endswith("module.teacher") for u in rank["units"])
        assert sum(u.endswith(("layers.0", "layers.1")) and ".teacher" in u for u in rank["units"]) == 2
        # Every teacher unit holds half of its parameters on each rank (up to padding).
        assert sum(full for _, full in rank["shards"].values()) == teacher_params
        for local, full in rank["shards"].values():
            assert local == -(-full // 2), (local, full)
        assert rank["teacher_grads"] == [] and rank["student_grads"] > 0
        assert rank["keys"] and not any(".teacher." in k for k in rank["keys"])
        assert any(".student." in k for k in rank["keys"])


def test_activation_checkpointing_switch_keeps_the_maths(tiny_cfg, tmp_path):
    common = ("trainer.max_steps=2", "trainer.limit_val_batches=0", "eval.enabled=false", "export.enabled=false")
    _, plain = train(tiny_cfg(*common, output_dir=tmp_path / "plain"))
    _, ckpt = train(tiny_cfg(*common, "trainer_extras.activation_checkpointing=true", output_dir=tmp_path / "ac"))
    assert ckpt["student"].is_gradient_checkpointing and not plain["student"].is_gradient_checkpointing
    a, b = plain["student"].state_dict(), ckpt["student"].state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a[k], v) for k, v in _fresh_student(tiny_cfg).items())  # it did train


def _fresh_student(tiny_cfg) -> dict:
    import lightning.pytorch as pl

    cfg = tiny_cfg()
    pl.seed_everything(cfg.seed, workers=True)
    teacher = hydra.utils.instantiate(cfg.teacher)
    return hydra.utils.instantiate(cfg.student, teacher=teacher).state_dict()


def test_compile_switch_and_unknown_switch(tiny_teacher):
    from students.scratch import build

    student = build(tiny_teacher, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    assert apply_student_switches(student, {"compile": True, "activation_checkpointing": False}) == ["compile"]
    assert student._compiled_call_impl is not None  # forward now goes through torch.compile
    with pytest.raises(ConfigError, match=r"trainer_extras=\['checkpointing'\]: known switches are"):
        apply_student_switches(student, {"checkpointing": True})


def test_gradient_accumulation_matches_the_larger_batch(tiny_cfg, tmp_path):
    common = (*SGD, "trainer.max_steps=1", "trainer.limit_val_batches=0", "eval.enabled=false", "export.enabled=false")
    _, big = train(tiny_cfg(*common, "data.batch_size=4", output_dir=tmp_path / "big"))
    _, acc = train(
        tiny_cfg(*common, "data.batch_size=2", "trainer.accumulate_grad_batches=2", output_dir=tmp_path / "acc")
    )
    a, b = big["student"].state_dict(), acc["student"].state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.ddp
def test_ddp_two_ranks_batch_b_match_one_process_batch_2b(tiny_cfg, tmp_path, cache_dir):
    # One SGD step from the same initial weights: equal weights after it mean equal gradients, since
    # w1 = w0 - lr·g; val/loss (averaged over ranks) after the step compares the loss.
    common = [
        *SGD,
        "distill.scheduler.num_warmup_steps=0",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "trainer.limit_val_batches=3",  # rank 0 validates batches 0 and 2, rank 1 batch 1 and a padding batch
        "trainer.num_sanity_val_steps=0",
        "eval.enabled=false",
        "export.verify=false",
    ]
    run = tmp_path / "ddp"
    proc = run_train_cli(
        [
            "experiment=smoke",
            "trainer=ddp_sim",
            "data.batch_size=2",
            *common,
            f"hydra.run.dir={run}",
            "callbacks.progress_bar=null",
        ],
        tmp_path,
        cache_dir,
    )
    assert "distributed_backend=gloo" in proc.stdout + proc.stderr

    metrics, single = train(tiny_cfg(*common, "data.batch_size=4", output_dir=tmp_path / "single"))
    ddp_weights = load_file(run / "student" / "model.safetensors")
    own = single["student"].state_dict()
    assert set(ddp_weights) <= set(own) and len(ddp_weights) > 5
    for k, v in ddp_weights.items():
        torch.testing.assert_close(v, own[k], rtol=1e-5, atol=1e-6)
    from tests.helpers import read_metrics, series

    # Validation split across the ranks (EvalBatchSampler) and reduced by token: one process's numbers.
    rows = read_metrics(run)
    for key in ("val/loss", "val/ce_loss", "val/kd_loss", "val/ppl"):
        ddp_val = dict(series(rows, key))
        assert ddp_val and ddp_val[0] == pytest.approx(metrics[key], rel=1e-5), key
    assert len(single["datamodule"].heldout_dataloader()) >= 3  # the limit, not the set, chose the batches


def test_zero3_given_through_a_deepspeed_config_is_recognised(tmp_path, cache_dir):
    from distill.recipe.strategies import is_zero3

    target = "lightning.pytorch.strategies.DeepSpeedStrategy"
    zero3 = {"zero_optimization": {"stage": 3}}
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    (tmp_path / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    # A DeepSpeed config sets the stage and Lightning then ignores `stage`; before, only `stage` was read.
    assert is_zero3({"_target_": target, "stage": 2, "config": zero3}, environ={})
    assert is_zero3({"_target_": target, "config": str(tmp_path / "zero3.json")}, environ={})
    assert not is_zero3({"_target_": target, "stage": 3, "config": str(tmp_path / "zero2.json")}, environ={})
    assert not is_zero3({"_target_": target, "config": {"train_batch_size": 8}}, environ={})  # DeepSpeed's stage 0
    env = {"PL_DEEPSPEED_CONFIG_PATH": str(tmp_path / "zero3.json")}  # read when no config is given
    assert is_zero3("deepspeed", environ=env) and is_zero3({"_target_": target}, environ=env)
    assert not is_zero3("deepspeed", environ={}) and is_zero3("deepspeed_stage_3_offload", environ={})
    assert not is_zero3({"_target_": "lightning.pytorch.strategies.DDPStrategy"}, environ=env)
    with pytest.raises(ConfigError, match=r"^trainer.strategy.config='.*missing.json': give a DeepSpeed JSON config"):
        is_zero3({"_target_": target, "config": str(tmp_path / "missing.json")}, environ={})
    # The composed override a user would type: the chunked loss is refused as under trainer=deepspeed_stage_3.
    cfg = compose_cfg(
        ["trainer=deepspeed_stage_2", "+trainer.strategy.config.zero_optimization.stage=3"], tmp_path, cache_dir
    )
    assert is_zero3(cfg.trainer.strategy, environ={})
    with pytest.raises(ConfigError, match=r"distill.objective.chunked=True: .*ZeRO-3"):
        check_trainer_config(cfg.trainer, environ={}, objective={"chunked": True})
    if importlib.util.find_spec("deepspeed") is not None:  # the strategy Lightning builds from it agrees
        # (Lightning asserts a plain dict: a Hydra node passes one only with _convert_=all.)
        strategy = hydra.utils.instantiate(cfg.trainer.strategy, _convert_="all")
        assert strategy.config["zero_optimization"]["stage"] == 3 and is_zero3(strategy, environ={})


@pytest.mark.parametrize("option", ["deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_sim"])
def test_a_deepspeed_config_given_by_override_reaches_lightning_as_a_dict(option, tmp_path, cache_dir):
    # Before, Hydra passed the node as a DictConfig and Lightning's DeepSpeedStrategy failed on
    # `assert isinstance(config, dict)` while the trainer was built.
    pytest.importorskip("deepspeed")
    overrides = [
        f"trainer={option}",
        "+trainer.strategy.config.zero_optimization.stage=3",
        "+trainer.strategy.config.train_micro_batch_size_per_gpu=4",
    ]
    cfg = compose_cfg(overrides, tmp_path, cache_dir)
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert type(strategy.config) is dict and type(strategy.config["zero_optimization"]) is dict
    assert strategy.config["zero_optimization"]["stage"] == 3 and strategy.config["train_micro_batch_size_per_gpu"] == 4
    if option == "deepspeed_sim":  # the one Lightning lets a CPU machine build a Trainer with: the nested node too
        from distill.config import build

        trainer = build(cfg.trainer, field="trainer", logger=False, enable_checkpointing=False)
        assert type(trainer.strategy.config) is dict and trainer.strategy.config["zero_optimization"]["stage"] == 3


def test_bf16_autocast_on_a_cpu_without_bf16_matmuls_is_warned_about(caplog):
    from distill.recipe.strategies import warn_slow_cpu_precision

    cpu_bf16 = {"precision": "bf16-mixed", "accelerator": "cpu"}
    with caplog.at_level("WARNING", logger="distill"):
        assert warn_slow_cpu_precision(cpu_bf16, bf16_matmul=False)
    assert "trainer.precision=bf16-mixed on a CPU without bf16 matmul instructions" in caplog.text
    assert "use trainer.precision=32 on this CPU" in caplog.text
    assert not warn_slow_cpu_precision(cpu_bf16, bf16_matmul=True)  # AVX-512 BF16 / AMX: bf16 is the fast path
    assert not warn_slow_cpu_precision({"precision": "32", "accelerator": "cpu"}, bf16_matmul=False)
    assert not warn_slow_cpu_precision({"precision": "bf16-mixed", "accelerator": "gpu"}, bf16_matmul=False)
