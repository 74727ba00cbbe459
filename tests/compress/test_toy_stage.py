"""A sixth compression stage, defined in this module alone, runs end to end through the framework.

The toy stage gives each MLP output projection a trainable per-channel gain (``y = (W x) · g``), a structure
change the checkpoint must replay before its weights fit. Nothing outside this file knows about it: it registers
its :class:`~distill.compress.stages.Stage` here (for the test's duration), and its callback is named by
``_target_`` in the config. The test trains with it (schedule and order checks), crashes and resumes from the
checkpoint (replay), rebuilds the checkpoint's student as ``evaluate.py`` does, exports the plain student (the
gains folded into the weights) and writes the report, which lists the change.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from callbacks.base import OneShotCompression
from distill.compress.stages import Stage, register, registry, stage_names
from evaluate import load_model
from tests.helpers import assert_same_losses, crash_at
from train import train

KIND = "toy_gain"


class GainLinear(nn.Module):
    """A Linear whose outputs are scaled by a trainable gain per output channel (starting at 1)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.gain = nn.Parameter(torch.ones(linear.out_features, dtype=linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The Linear's output times the gain."""
        return self.linear(x) * self.gain


def _targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith("mlp.down_proj") and isinstance(m, nn.Linear)]


def add_gains(model: nn.Module, spec: dict[str, Any]) -> None:
    """The stage's change, and its replay: wrap each named projection in a :class:`GainLinear`."""
    for name in spec["modules"]:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, GainLinear(getattr(owner, child)))


@pytest.fixture
def toy_stage() -> Iterator[Stage]:
    """The stage's record, registered for the test. A real stage registers at its module's import; this one
    leaves the registry as it found it, so the other tests in the process see the shipped stages only."""
    stage = register(Stage(KIND, 60, add_gains))  # after every shipped stage
    yield stage
    registry().pop(KIND)


class ToyGain(OneShotCompression):
    """The toy stage's callback: adds the gains at ``start_step``; its plain form folds them into the weights."""

    stage = KIND

    def __init__(self, start_step: int = 2) -> None:
        self.start_step = self.end_step = start_step

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rebuild: bool) -> None:
        """Wrap the projections, record the change, and give the optimizer the new gains mid-run."""
        spec = {"modules": _targets(pl_module.student)}
        add_gains(pl_module.student, spec)
        pl_module.record_structure_change(self.stage, spec)
        if rebuild:
            pl_module.rebuild_optimizers()

    def make_plain(self, model: nn.Module) -> nn.Module:
        """A copy with each gain multiplied into its Linear's rows: a plain transformers model again."""
        plain = copy.deepcopy(model)
        for name, module in list(plain.named_modules()):
            if isinstance(module, GainLinear):
                with torch.no_grad():
                    module.linear.weight.mul_(module.gain[:, None])
                parent, _, child = name.rpartition(".")
                setattr(plain.get_submodule(parent), child, module.linear)
        return plain


COMMON = (
    "+callbacks.toy._target_=tests.compress.test_toy_stage.ToyGain",
    "+callbacks.toy.start_step=2",
    "trainer.max_steps=6",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=100",
    "trainer.limit_val_batches=0",
)


def test_a_stage_defined_in_one_module_trains_resumes_replays_exports_and_reports(toy_stage, tiny_cfg, tmp_path):
    assert stage_names()[-1] == KIND  # registered by this module's import, ordered by its record
    quiet = ("eval.enabled=false", "export.enabled=false")
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    _, full = train(tiny_cfg(*COMMON, *quiet, output_dir=full_dir))
    assert [c["kind"] for c in full["module"].structure] == [KIND]
    assert any(isinstance(m, GainLinear) for m in full["student"].modules())

    crash_at(tiny_cfg(*COMMON, *quiet, output_dir=cut_dir), step=5)
    ckpt = torch.load(cut_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and [c["kind"] for c in ckpt["student_structure"]] == [KIND]
    model, _, changes = load_model(str(cut_dir / "checkpoints" / "last.ckpt"), None)  # evaluate.py's rebuild
    assert changes == ckpt["student_structure"]
    saved = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    assert any(k.endswith(".gain") for k in saved)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())

    # The resumed run replays the gains before the weights load, then ends with the uninterrupted run's weights,
    # and exports and reports this time.
    _, resumed = train(tiny_cfg(*COMMON, "resume=auto", output_dir=cut_dir))
    assert resumed["module"].structure == full["module"].structure
    assert_same_losses(full_dir, cut_dir, steps=6)
    a, b = full["student"].state_dict(), resumed["student"].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)

    exported, _, _ = load_model(str(resumed["export_dir"]), None)  # plain transformers, gains folded in
    assert not any(isinstance(m, GainLinear) for m in exported.modules())
    probe = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(exported(probe).logits, resumed["student"](probe).logits, atol=1e-4, rtol=1e-4)
    report = json.loads((cut_dir / "report.json").read_text())
    assert KIND in [m["kind"] for m in report["modifications"]]
    assert "callback:toy" in [m["kind"] for m in report["modifications"]]
