"""End-to-end runs of ``train(cfg)`` on a tiny teacher and student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import read_metrics, series
from train import train

ROOT = Path(__file__).resolve().parents[1]


def test_train_end_to_end_loss_drops_and_export_reloads(tiny_cfg, tmp_path):
    # No lm-eval tasks (tests/eval runs them): each indexes lm-eval's whole task tree, seconds per run.
    cfg = tiny_cfg(
        "trainer.max_steps=60", "trainer.val_check_interval=20", "trainer.log_every_n_steps=1", "eval.tasks=[]"
    )
    metrics, objects = train(cfg)

    losses = [v for _, v in series(read_metrics(tmp_path), "train/loss")]
    assert len(losses) >= 55
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # Measured 3.06 -> 2.93 on the embedded corpus with the stdlib docstrings (more varied text than the pydoc
    # topics alone, on which it fell by more than 0.2).
    assert last < first - 0.1, (first, last)
    assert "val/loss" in metrics and "heldout/student/ppl" in metrics
    assert metrics["heldout/teacher/kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["heldout/teacher/top1_agreement"] == 1.0

    # The teacher never trained: no grads, requires_grad off, weights unchanged from a fresh build.
    teacher = objects["teacher"]
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    from distill.models.teacher import random_teacher

    fresh = random_teacher(cache_dir=cfg.paths.cache_dir)
    for (name, p), q in zip(teacher.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name

    # The export loads in a process where this package cannot be imported, and its logits match.
    export = Path(objects["export_dir"])
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    probe = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    student = objects["student"].eval()
    with torch.no_grad():
        expected = student(input_ids=probe).logits
    torch.save({"probe": probe}, tmp_path / "probe.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["distill"] = None  # any import of this package now fails
        sys.modules["students"] = None
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(export)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(export)!r})
        assert len(tok) == 512, len(tok)
        probe = torch.load({str(tmp_path / "probe.pt")!r})["probe"]
        with torch.no_grad():
            torch.save(m(input_ids=probe).logits, {str(tmp_path / "reloaded.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "reloaded.pt"), expected, rtol=0, atol=1e-5)
    meta = json.loads((export / "distill.json").read_text())
    assert meta["teacher"]["name"].startswith("tiny_random")


def test_checkpoint_holds_student_and_optimizer_only(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "trainer.max_steps=4",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "eval.enabled=false",
        "export.enabled=false",
    )
    _, objects = train(cfg)
    # weights_only=True: the restricted unpickler would refuse a pickled module (a teacher) anywhere in it.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and not any(k.startswith("teacher.") for k in keys)
    student_keys = {f"student.{k}" for k in objects["student"].state_dict()}
    assert student_keys <= set(keys)
    assert ckpt["optimizer_states"] and ckpt["optimizer_states"][0]["state"]
    n_params = sum(1 for p in objects["module"].trainable_parameters())
    assert len(ckpt["optimizer_states"][0]["state"]) == n_params  # no teacher parameter in the optimizer
    # The hyper-parameters are a flat record of plain values; the teacher appears by name, never as weights.
    hparams = ckpt["hyper_parameters"]
    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in hparams.values())
    assert hparams["teacher"].startswith("tiny_random") and len(json.dumps(hparams)) < 1000
    assert ckpt["student_structure"] == []
    assert ckpt["student_config"]["hidden_size"] == 32
    assert ckpt["student_config_initial"] == ckpt["student_config"]  # nothing restructured the student


def test_evaluate_refuses_checkpoints_it_cannot_rebuild_or_trust(tmp_path):
    from distill.config import ConfigError
    from evaluate import load_model

    config = {"model_type": "llama", "hidden_size": 32}
    old = tmp_path / "old.ckpt"  # written before student_config_initial, by a run that pruned
    torch.save({"student_config": config, "student_structure": [{"kind": "prune", "spec": {}}]}, old)
    with pytest.raises(ConfigError, match=r"^model='.*old.ckpt': this checkpoint predates .* \(prune\); evaluate"):
        load_model(str(old), None)
    odd = tmp_path / "odd.ckpt"  # an object the restricted unpickler does not know: refused, never run
    torch.save({"student_config": config, "extra": Path("/x")}, odd)
    with pytest.raises(ConfigError, match=r"^model='.*odd.ckpt': the checkpoint holds objects beyond tensors"):
        load_model(str(odd), None)


def test_resume_path_that_does_not_exist_is_refused(tiny_cfg, tmp_path):
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match=r"resume='.*nope.ckpt'.*no such checkpoint"):
        train(tiny_cfg(f"resume={tmp_path}/nope.ckpt"))


def _run_cli(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


def _cli_paths(tmp_path: Path, cache_dir: Path) -> list[str]:
    return [
        f"hydra.run.dir={tmp_path}/run",
        f"paths.cache_dir={cache_dir}",
        f"data.cache_dir={cache_dir}/data",
        "callbacks.progress_bar=null",
    ]


@pytest.mark.slow  # a fresh interpreter per bad value; in-process refusals are in tests/test_bad_input.py
def test_cli_bad_value_gives_one_line_error(tmp_path, cache_dir):
    proc = _run_cli(["experiment=smoke", "distill.objective.alpha=2", *_cli_paths(tmp_path, cache_dir)], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: distill.objective.alpha=2: alpha must lie in [0, 1]")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # not even Hydra's records of a run that never started
    # A run folder with work in it (a run being resumed) is never removed by a refused setting.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"work")
    proc = _run_cli(["experiment=smoke", "distill.optimizer.lr=-1", *_cli_paths(tmp_path, cache_dir)], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: distill.optimizer: ")
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes() == b"work"


@pytest.mark.slow  # a fresh interpreter; debug=fdr also runs in-process in tests/test_commands.py
def test_fast_dev_run_cli(tmp_path, cache_dir):
    proc = _run_cli(["experiment=smoke", "debug=fdr", *_cli_paths(tmp_path, cache_dir)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fast_dev_run" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "student").exists()  # a debug step exports nothing


@pytest.mark.slow  # two gloo ranks (about 30 s); tests/runtime/test_strategies.py's DDP equality test stays default
@pytest.mark.ddp
def test_ddp_sim_two_processes_train_and_log_once(tmp_path, cache_dir):
    args = [
        "experiment=smoke",
        "trainer=ddp_sim",
        "eval.tasks=[]",
        *_cli_paths(tmp_path, cache_dir),
    ]  # tasks: tests/eval
    proc = _run_cli(args, tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "distributed_backend=gloo" in out and "All distributed processes registered" in out
    # Once per held-out set (the test split, the English set), from rank 0 only.
    assert out.count("Held-out evaluation, test:") == 1 and out.count("Held-out evaluation, english:") == 1
    # Both ranks scored their share of the held-out batches; rank 0 printed the merged table.
    assert "rank 0 scores its share" in out and "rank 1 scores its share" in out
    run = tmp_path / "run"
    versions = list(run.glob("csv/version_*"))
    assert len(versions) == 1
    rows = read_metrics(run)
    steps = [s for s, _ in series(rows, "train/loss")]
    assert steps and len(steps) == len(set(steps))  # each step logged once, not once per rank
    assert (run / "student" / "model.safetensors").is_file()


def test_evaluate_scores_a_model_on_the_split_it_was_trained_with(tiny_cfg, tmp_path, cache_dir):
    """A run trained with seed=42: evaluate.py (configured with seed 1234) rebuilds the run's split, or refuses."""
    from hydra import compose, initialize_config_dir

    from distill.config import ConfigError, ConfigOrigin
    from evaluate import evaluate
    from tests.conftest import CONF, ROOT
    from train import train

    run = tmp_path / "run"
    _, objects = train(tiny_cfg("seed=42", "trainer.max_steps=2", "eval.enabled=false", output_dir=run))
    trained = objects["datamodule"].split_facts()
    assert trained["seed"] == 42

    def cfg(*extra: str):
        overrides = [f"model={run / 'student'}", "teacher=tiny_random", "data.block_size=32", *extra]
        overrides += ["eval.tasks=[]", "eval.max_batches=2", "eval.fidelity_prompts=1", "eval.speed_runs=0"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            c = compose(config_name="evaluate", overrides=overrides)
        c.paths.root_dir, c.paths.output_dir, c.paths.cache_dir = str(ROOT), str(tmp_path / "eval"), str(cache_dir)
        c.data.cache_dir = str(cache_dir / "data")
        return c

    report = evaluate(cfg())  # evaluate.yaml says seed 1234: the model's recorded 42 is used instead
    assert report["heldout_sets"]["test"]["split"]["data_key"] == trained["data_key"]
    assert report["heldout_sets"]["test"]["split"]["seed"] == 42
    typed = cfg("seed=7")
    with pytest.raises(ConfigError, match=r"^seed=7: model=.* was trained with seed=42"):
        evaluate(typed, ConfigOrigin(("seed=7",)))


def test_a_time_budgeted_run_shows_its_budget_not_a_step_count_it_never_reaches(tiny_cfg, tmp_path):
    from omegaconf import open_dict

    from tests.helpers import BudgetBarSpy
    from train import train

    cfg = tiny_cfg("trainer.max_steps=1000", "+trainer.max_time=00:00:00:06", "eval.enabled=false")
    with open_dict(cfg):
        cfg.export.enabled = False
        cfg.callbacks.progress_bar = {"_target_": "tests.helpers.BudgetBarSpy"}
    _, objects = train(cfg)
    seen = BudgetBarSpy.seen
    assert seen and all(total == 6 for _, total, _ in seen)  # the budget in seconds, not max_steps=1000
    assert objects["trainer"].global_step < 1000 and seen[-1][2] == objects["trainer"].global_step
    assert seen[-1][0] >= 5  # it ran out of time, and the bar says so
