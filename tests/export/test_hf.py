"""The plain Hugging Face export: the logits check and the protocol-driven stage undo (publishing: tests/runtime)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from callbacks.base import CompressionCallback
from distill.compress.stages import compression_stages
from distill.export.hf import compare_logits, export_compact_forms, export_student, plain_model


def test_compare_logits_passes_a_copy_and_refuses_a_change_or_nan(tiny_teacher):
    model = tiny_teacher.model
    same = copy.deepcopy(model)
    assert compare_logits(model, same, "copy") == 0.0
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.get_output_embeddings().weight.add_(0.5)
    with pytest.raises(RuntimeError, match=r"changed does not reproduce .*\(max \|Δlogit\| = "):
        compare_logits(model, changed, "changed")
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.get_output_embeddings().weight[:] = math.nan
    with pytest.raises(RuntimeError, match="broken does not reproduce"):
        compare_logits(model, broken, "broken")


def test_export_reloads_and_a_failed_verify_keeps_the_good_export(tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "student"
    export_student(tiny_teacher.model, tiny_teacher.tokenizer, out, metadata={"run": 1})
    good = (out / "model.safetensors").read_bytes()

    def reload_differs(*_args, **_kwargs):
        raise RuntimeError("exported model does not reproduce the model it was written from")

    monkeypatch.setattr("distill.export.hf.compare_logits", reload_differs)
    changed = copy.deepcopy(tiny_teacher.model)
    with torch.no_grad():
        changed.get_output_embeddings().weight.add_(1.0)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        export_student(changed, tiny_teacher.tokenizer, out)
    assert (out / "model.safetensors").read_bytes() == good


class _Recorder(CompressionCallback):
    """A stage that records when it is made plain and writes a marker as its compact form."""

    def __init__(self, stage: str, log: list[str]) -> None:
        self.stage = stage
        self.log = log

    def make_plain(self, model):
        self.log.append(self.stage)
        return model

    def export_compact(self, model, tokenizer, run_dir: Path) -> Path | None:
        if self.stage == "prune":  # like pruning: no compact form of its own
            return None
        out = Path(run_dir) / f"{self.stage}_compact"
        out.mkdir()
        return out


def test_stages_are_undone_in_reverse_stage_order_and_write_their_compact_forms(tiny_teacher, tmp_path):
    log: list[str] = []
    callbacks = [_Recorder(s, log) for s in ("qat", "prune", "lowrank", "share")]
    stages = compression_stages([object(), *callbacks])  # non-stage callbacks are ignored
    assert [s.stage for s in stages] == ["prune", "share", "lowrank", "qat"]
    assert plain_model(tiny_teacher.model, stages) is tiny_teacher.model
    assert log == ["qat", "lowrank", "share", "prune"]
    written = export_compact_forms(tiny_teacher.model, tiny_teacher.tokenizer, stages, tmp_path)
    assert written == {s: tmp_path / f"{s}_compact" for s in ("share", "lowrank", "qat")}
