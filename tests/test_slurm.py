"""SLURM without a cluster: the rendered batch script, bad input, the submitit launcher, and requeue on SIGUSR1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from distill.config import ConfigError
from distill.recipe.strategies import check_trainer_config
from distill.runtime.resume import resolve_resume
from slurm.submit import compose_config, override_keys, render, run, train_overrides, with_slurm_group
from tests.helpers import run_train_cli
from train import train

ROOT = Path(__file__).resolve().parents[1]
SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "distill-test",  # not "bash"/"interactive", so Lightning treats this as a batch job
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


class Pace(pl.Callback):
    """Slow each step down and publish the step count, so a test can signal a run mid-training."""

    def __init__(self, path: str, seconds: float = 0.3) -> None:
        self.path, self.seconds = Path(path), seconds

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.path.write_text(str(trainer.global_step))
        time.sleep(self.seconds)


class Probe(pl.Callback):
    """What the trainer holds right after restoring a checkpoint, before the first resumed step."""

    seen: dict | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = trainer.optimizers[0].state_dict()
        self.seen = {
            "global_step": trainer.global_step,
            "optimizer": {i: {k: v.clone() for k, v in st.items()} for i, st in opt["state"].items()},
            "sched_step": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        }


def _directives(script: str) -> dict[str, str]:
    pairs = [
        line.removeprefix("#SBATCH --").split("=", 1) for line in script.splitlines() if line.startswith("#SBATCH")
    ]
    return {p[0]: (p[1] if len(p) > 1 else "") for p in pairs}


def test_rendered_script_derives_tasks_from_devices(tmp_path):
    overrides = [
        "trainer=ddp",
        "trainer.devices=4",
        "slurm.nodes=2",
        "slurm.partition=gpu",
        "distill.optimizer.lr=3e-4",
    ]
    script = render(compose_config(overrides), overrides, tmp_path)
    d = _directives(script)
    assert d["ntasks-per-node"] == "4" and d["gpus-per-node"] == "4" and d["nodes"] == "2"
    assert d["partition"] == "gpu" and "account" not in d and "qos" not in d
    assert d["signal"] == "USR1@120" and "requeue" in d and d["time"] == "04:00:00"
    assert d["output"] == f"{tmp_path}/%x-%j.out"
    assert "source .venv/bin/activate" in script and f"cd {ROOT}" in script
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert srun == [f"srun python train.py {' '.join(overrides)} slurm=default"]

    # On CPU there is no GPU request, and the task count still follows trainer.devices.
    cpu = ["trainer=ddp_sim", "slurm.account=proj1", "slurm.time=00:30:00"]
    d = _directives(render(compose_config(cpu), cpu, tmp_path))
    assert d["ntasks-per-node"] == "2" and "gpus-per-node" not in d
    assert d["account"] == "proj1" and d["time"] == "00:30:00"


def test_override_keys_follow_hydra_grammar():
    overrides = ["+slurm=default", "++dry_run=true", "~log_dir", "trainer.devices=4", "hydra/launcher=slurm"]
    assert override_keys(overrides) == ["slurm", "dry_run", "log_dir", "trainer.devices", "hydra/launcher"]
    assert with_slurm_group(overrides) == overrides  # "+slurm=default" already picks the group
    assert with_slurm_group(["slurm.nodes=2"]) == ["slurm.nodes=2", "slurm=default"]  # a key under it is no pick
    assert train_overrides(overrides) == ["+slurm=default", "trainer.devices=4", "hydra/launcher=slurm"]
    assert train_overrides(["log_dir='/tmp/a=b'", "dry_run=true", "distill.optimizer.lr=1e-3"]) == [
        "distill.optimizer.lr=1e-3"
    ]


def _submit_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slurm.submit", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.slow  # a fresh interpreter; the script is rendered in-process by the other tests here
def test_dry_run_cli_prints_the_script_and_writes_nothing(tmp_path):
    proc = _submit_cli(["dry_run=true", f"log_dir={tmp_path / 'slurm'}", "trainer=ddp"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("#!/bin/bash\n")
    assert _directives(proc.stdout)["ntasks-per-node"] == "2"
    assert _directives(proc.stdout)["output"] == f"{tmp_path / 'slurm'}/%x-%j.out"
    assert proc.stdout.rstrip().endswith("srun python train.py trainer=ddp slurm=default")  # no dry_run, no log_dir
    assert list(tmp_path.iterdir()) == []  # no log dir, no Hydra run dir, no log file
    proc = _submit_cli(["dry_run=true", "trainer=ddp", "slurm.ntasks_per_node=3"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("error: slurm.ntasks_per_node=3: Lightning runs one task")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer=ddp", "slurm.ntasks_per_node=3"], "slurm.ntasks_per_node=3: .*must equal trainer.devices=2"),
        (["trainer=fsdp", "trainer.accelerator=cpu"], "trainer.accelerator='cpu': the fsdp strategy runs on GPUs only"),
        (["trainer=deepspeed_stage_3", "trainer.accelerator=cpu"], "the deepspeed strategy runs on GPUs only"),
        (["trainer=ddp", "trainer.devices=auto"], "trainer.devices='auto': give the number of devices per node"),
        (["trainer=ddp", "slurm.gpus_per_node=1"], "slurm.gpus_per_node=1: fewer GPUs than trainer.devices=2"),
    ],
)
def test_bad_input_is_refused_before_submission(overrides, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message):
        render(compose_config(overrides), overrides, tmp_path)
    cli = ["dry_run=true", f"log_dir={tmp_path / 'slurm'}", *overrides]
    with pytest.raises(ConfigError, match=message):
        run(compose_config(cli, config_name="submit"), cli)
    assert capsys.readouterr().out == ""  # no script printed
    assert not (tmp_path / "slurm").exists()


def test_missing_sbatch_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    cli = [f"log_dir={tmp_path / 'slurm'}", "trainer=ddp"]
    with pytest.raises(ConfigError, match=r"sbatch='not on PATH': run on a SLURM login node, or pass dry_run=true"):
        run(compose_config(cli, config_name="submit"), cli)
    assert not (tmp_path / "slurm").exists()


def test_submit_writes_the_script_and_calls_sbatch(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch.args\necho "777;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cli = [f"log_dir={tmp_path / 'slurm'}", "trainer=ddp", "trainer.devices=3"]
    assert run(compose_config(cli, config_name="submit"), cli) == "777"
    assert "submitted job 777" in capsys.readouterr().out
    scripts = list((tmp_path / "slurm").glob("*.sbatch"))
    assert len(scripts) == 1 and not list((tmp_path / "slurm").glob("*.tmp"))
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(scripts[0])]
    script = scripts[0].read_text()
    assert _directives(script)["ntasks-per-node"] == "3"
    assert script.rstrip().endswith("srun python train.py trainer=ddp trainer.devices=3 slurm=default")


def test_job_config_keys_the_run_on_the_job_id(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = compose_config(["trainer=ddp", "slurm.nodes=2", "logger=wandb"])
    assert cfg.run_name == "4242" and cfg.resume == "auto"
    assert cfg.logger.wandb.id == "4242"  # W&B resumes the same run after a requeue
    assert cfg.trainer.num_nodes == 2
    (plugin,) = cfg.trainer.plugins
    assert plugin._target_.endswith("SLURMEnvironment") and plugin.auto_requeue is True
    # Inside a job, devices must match the tasks SLURM started per node.
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    with pytest.raises(ConfigError, match=r"trainer.devices=2: this SLURM job runs 4 tasks per node"):
        check_trainer_config(cfg.trainer, environ=env)
    check_trainer_config({"strategy": "ddp", "accelerator": "gpu", "devices": 4}, environ=env)


def test_hydra_slurm_launcher_composes_with_tasks_from_devices(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout == 3


@pytest.mark.slow  # two extra interpreter start-ups (the sweep and submitit's job): about 50 s on 2 loaded cores
def test_submitit_local_executor_runs_a_sweep(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    run_train_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={sweep}",
            "experiment=smoke",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=0",
            "eval.enabled=false",
            "export.enabled=false",
            "callbacks.progress_bar=null",
        ],
        tmp_path,
        cache_dir,
        timeout=300,
    )
    job = sweep / "0"
    assert (job / "checkpoints" / "last.ckpt").exists()
    assert list(sweep.glob(".submitit/*/*_result.pkl"))  # the run went through submitit's executor
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2


SIGNAL_RUN = [
    "experiment=smoke",
    "trainer.limit_val_batches=0",
    "callbacks.model_checkpoint.every_n_train_steps=1000",
    "eval.enabled=false",
    "export.enabled=false",
    "callbacks.progress_bar=null",
]


def _start_paced_job(tmp_path: Path, cache_dir: Path, progress: Path) -> subprocess.Popen:
    """``train.py`` as a SLURM job would start it, with ``scontrol`` faked to record its arguments."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.args\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = {**os.environ, **SLURM_ENV, "PYTHONPATH": str(ROOT), "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *SIGNAL_RUN,
            "slurm=default",
            "trainer.max_steps=400",
            f"paths.log_dir={tmp_path}/logs",
            f"paths.cache_dir={cache_dir}",
            f"data.cache_dir={cache_dir}/data",
            "+callbacks.pace._target_=tests.test_slurm.Pace",
            f"+callbacks.pace.path={progress}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _signal_after_step(proc: subprocess.Popen, progress: Path, requeued: Path, step: int = 3) -> str:
    """Send SIGUSR1 once the job has reached ``step``, wait for its requeue, then end it; returns its output."""
    try:
        deadline = time.monotonic() + 240
        while not (progress.exists() and progress.read_text() and int(progress.read_text()) >= step):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, f"training never reached step {step}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # what SLURM sends --signal=USR1@<s> before the time limit
        while not requeued.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the handler never requeued"
            time.sleep(0.2)
    finally:
        proc.kill()  # SLURM ends the job once it is requeued
        out = proc.communicate()[0]
    return out


def _train_with_probe(cfg, monkeypatch) -> tuple[dict | None, dict]:
    """Run ``train(cfg)`` with a :class:`Probe`; returns what it saw at the first resumed step and the run's objects."""
    probe = Probe()
    with open_dict(cfg):
        cfg.callbacks.probe = {"_target_": "tests.test_slurm.Probe"}
    import tests.test_slurm as me

    original = me.Probe.on_train_start

    def record(self, trainer, pl_module):  # keep the instance the trainer built reachable from the test
        original(self, trainer, pl_module)
        probe.seen = self.seen

    monkeypatch.setattr(me.Probe, "on_train_start", record)
    _, objects = train(cfg)
    return probe.seen, objects


def _assert_restored(seen: dict | None, saved: dict) -> None:
    """The trainer resumed at the checkpoint's step with its optimizer and scheduler state, bit for bit."""
    assert seen is not None
    assert seen["global_step"] == saved["global_step"]
    assert seen["sched_step"] == saved["lr_schedulers"][0]["last_epoch"]
    want = saved["optimizer_states"][0]["state"]
    assert want and set(seen["optimizer"]) == set(want)
    for i, state in want.items():
        for k, v in state.items():
            torch.testing.assert_close(seen["optimizer"][i][k], v, rtol=0, atol=0)


def test_sigusr1_saves_a_checkpoint_requeues_and_a_fresh_start_resumes(tmp_path, cache_dir, tiny_cfg, monkeypatch):
    progress = tmp_path / "progress"
    proc = _start_paced_job(tmp_path, cache_dir, progress)
    out = _signal_after_step(proc, progress, tmp_path / "scontrol.args")
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"], out[-2000:]

    run_dir = tmp_path / "logs" / "train" / "runs" / "4242"  # keyed on the job id, not the time
    hpc = run_dir / "checkpoints" / "hpc_ckpt_1.ckpt"
    assert hpc.is_file(), out[-2000:]
    saved = torch.load(hpc, weights_only=False)
    assert saved["global_step"] >= 3
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    assert resolve_resume("auto", run_dir / "checkpoints") == str(hpc)

    # The requeued job: same job id, a fresh process, resume=auto.
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    cfg = tiny_cfg(*SIGNAL_RUN, "slurm=default", f"trainer.max_steps={saved['global_step'] + 2}", output_dir=run_dir)
    assert cfg.run_name == "4242"
    seen, objects = _train_with_probe(cfg, monkeypatch)
    _assert_restored(seen, saved)
    assert objects["trainer"].global_step == saved["global_step"] + 2
