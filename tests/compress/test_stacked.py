"""All compression callbacks in one run, in the documented order: prune → share → lowrank → qat."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM

from train import train


def test_prune_share_lowrank_qat_in_one_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "callbacks=[prune,share,lowrank,qat]",
        "student.num_layers=4",
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "callbacks.prune.channels=0.5",
        "callbacks.prune.calib_batches=1",
        "callbacks.prune.start_step=1",
        "callbacks.prune.end_step=2",
        "callbacks.prune.every_n_steps=1",
        "callbacks.share.start_step=3",
        "callbacks.lowrank.start_step=4",
        "callbacks.qat.start_step=6",
        "callbacks/qat=int8_weight_only",  # per-row: the rank-8 factors are narrower than any int4 group
        "eval.tasks=[]",
    )
    metrics, objects = train(cfg)
    kinds = [c["kind"] for c in objects["module"].structure]
    assert kinds == ["prune", "share", "lowrank", "qat"], kinds
    report = json.loads((tmp_path / "report.json").read_text())
    applied = [m["kind"] for m in report["modifications"] if not m["kind"].startswith("callback:")]
    assert applied == ["distillation", "prune", "share", "lowrank", "qat"]
    student = objects["student"]
    assert student.config.intermediate_size == 32  # half of 64 channels pruned
    plain = AutoModelForCausalLM.from_pretrained(objects["export_dir"])  # the plain export still loads
    assert plain.config.intermediate_size == 32
    assert metrics["heldout/student/ppl"] > 0
