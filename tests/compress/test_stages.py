"""Structure changes recorded by callbacks are rebuilt from a checkpoint before the weights load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from callbacks.base import CompressionCallback
from distill.compress import stages as structure
from distill.config import ConfigError
from distill.module import DistillModule
from distill.objective.objective import DistillationObjective
from students import scratch


def _drop_last_layer(student: nn.Module, spec: dict) -> None:
    keep = spec["keep"]
    student.model.layers = student.model.layers[:keep]
    student.config.num_hidden_layers = keep


def _module(teacher) -> DistillModule:
    torch.manual_seed(0)
    student = scratch.build(teacher, hidden_size=32, num_layers=3, num_heads=2)
    return DistillModule(teacher, student, DistillationObjective(), optimizer=torch.optim.SGD)


def test_checkpoint_replays_structure_before_weights(tiny_teacher, monkeypatch):
    monkeypatch.setitem(
        structure.registry(), "test_drop_last_layer", structure.Stage("test_drop_last_layer", 99, _drop_last_layer)
    )
    a = _module(tiny_teacher)
    _drop_last_layer(a.student, {"keep": 2})
    a.record_structure_change("test_drop_last_layer", {"keep": 2})
    ckpt = {"state_dict": a.state_dict()}
    a.on_save_checkpoint(ckpt)
    assert ckpt["student_structure"] == [{"kind": "test_drop_last_layer", "spec": {"keep": 2}}]
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])

    b = _module(tiny_teacher)  # a fresh 3-layer student, as at the start of a resumed run
    b.on_load_checkpoint(ckpt)  # what Lightning calls before load_state_dict
    b.load_state_dict(ckpt["state_dict"], strict=True)  # teacher keys absent: tolerated
    assert len(b.student.model.layers) == 2 and b.structure == a.structure
    probe = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(b.student(input_ids=probe).logits, a.student(input_ids=probe).logits)


def test_unknown_structure_kind_is_a_clear_error(tiny_teacher):
    b = _module(tiny_teacher)
    with pytest.raises(ConfigError, match=r"kind='no_such_change'.*use the distill version that wrote the checkpoint"):
        b.on_load_checkpoint({"student_structure": [{"kind": "no_such_change", "spec": {}}]})


def test_strict_load_still_catches_missing_student_keys(tiny_teacher):
    a = _module(tiny_teacher)
    sd = a.state_dict()
    sd.pop("student.lm_head.weight")
    with pytest.raises(RuntimeError, match="student.lm_head.weight"):
        a.load_state_dict(sd, strict=True)


class _Stage(CompressionCallback):
    def __init__(self, stage: str, start: int, end: int) -> None:
        self.stage, self.start_step, self.end_step = stage, start, end


def test_schedule_order_is_enforced():
    structure.check_schedule([_Stage("prune", 0, 50), _Stage("qat", 50, 100), object()])
    with pytest.raises(ConfigError, match=r"callbacks.qat.start_step=40: qat must start .* prune finishes"):
        structure.check_schedule([_Stage("qat", 40, 100), _Stage("prune", 0, 50)])
    with pytest.raises(ConfigError, match="two 'share' callbacks"):
        structure.check_schedule([_Stage("share", 0, 0), _Stage("share", 5, 5)])


def test_structure_change_out_of_order_is_refused(tiny_teacher):
    m = _module(tiny_teacher)
    m.record_structure_change("prune", {})
    m.record_structure_change("qat", {})
    with pytest.raises(ConfigError, match=r"callbacks.prune: a 'prune' change came after 'qat'"):
        m.record_structure_change("prune", {})


def test_rebuild_optimizers_carries_state_and_schedule(tiny_cfg):
    from omegaconf import open_dict

    from train import train

    cfg = tiny_cfg(
        "trainer.max_steps=6", "eval.enabled=false", "export.enabled=false", "distill.scheduler.num_warmup_steps=2"
    )
    with open_dict(cfg):
        cfg.callbacks.swap = {"_target_": "tests.helpers.SwapParameterAt", "step": 3}
    _, objects = train(cfg)
    swap = next(cb for cb in objects["trainer"].callbacks if type(cb).__name__ == "SwapParameterAt")
    assert swap.after["has_new"] and not swap.after["has_old"]
    assert swap.after["n_params"] == swap.before["n_params"]
    torch.testing.assert_close(swap.after["exp_avg"], swap.before["exp_avg"] * 2)
    assert swap.after["lr"] == swap.before["lr"] and swap.after["sched_step"] == swap.before["sched_step"]
    assert objects["trainer"].global_step == 6


def test_val_ppl_is_exp_of_the_token_mean_ce_not_the_mean_of_batch_ppl(tiny_teacher, monkeypatch):
    module = _module(tiny_teacher)
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.__setitem__(name, float(value)))
    monkeypatch.setattr(module, "log_dict", lambda values, **_: None)
    ce = iter([torch.tensor(1.0), torch.tensor(3.0)])
    monkeypatch.setattr(module, "_step", lambda batch: {"loss": torch.tensor(0.0), "ce": next(ce)})
    short = torch.full((1, 4), -100)
    short[0, :2] = 1  # 1 scored token (position 0 has no prediction)
    long = torch.ones(1, 4, dtype=torch.long)  # 3 scored tokens
    module.validation_step({"input_ids": short, "labels": short}, 0)
    module.validation_step({"input_ids": long, "labels": long}, 1)
    module.on_validation_epoch_end()
    # (1·1 + 3·3) / 4 tokens = 2.5; the mean of the batches' exp(CE) would be (e + e³)/2 ≈ 11.4.
    assert logged["val/ppl"] == pytest.approx(torch.exp(torch.tensor(2.5)).item(), rel=1e-6)
    logged.clear()
    module.on_validation_epoch_end()  # the next epoch starts from nothing: no stale perplexity
    assert "val/ppl" not in logged
