"""Render a SLURM batch script from the Hydra config and submit it: ``python -m slurm.submit [dry_run=true] ...``.

The overrides are the ones ``python train.py`` takes; they are composed here (``conf/submit.yaml``, which is
``conf/train.yaml`` plus this command's own ``dry_run`` and ``log_dir``) exactly as the job will compose
them, so the script's ``--ntasks-per-node`` is derived from ``trainer.devices`` and the two cannot
disagree. Cluster settings live in ``conf/slurm/<name>.yaml`` (``slurm=default`` unless an override picks
another). Everything is checked before a file is written or ``sbatch`` runs.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from string import Template
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from distill.config import config_error, exit_on_config_error
from distill.recipe.strategies import check_trainer_config

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = Path(__file__).with_name("template.sbatch")
SUBMIT_KEYS = ("dry_run", "log_dir")  # this command's own settings (conf/submit.yaml), not passed to the job


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The config key or group each override sets, as Hydra parses it: ``+slurm@pkg=x`` and ``~slurm`` give ``slurm``.

    Raises:
        hydra.errors.OverrideParseException: an override Hydra itself would refuse.

    """
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]


def with_slurm_group(overrides: Sequence[str]) -> list[str]:
    """The overrides plus ``slurm=default`` unless they already pick a ``slurm`` option."""
    picked = "slurm" in override_keys(overrides)
    return list(overrides) if picked else [*overrides, "slurm=default"]


def train_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides meant for ``train.py``: all but this command's own ``dry_run`` and ``log_dir``."""
    keys = override_keys(overrides)
    return [o for o, key in zip(overrides, keys, strict=True) if key not in SUBMIT_KEYS]


def compose_config(
    overrides: Sequence[str], config_dir: Path = ROOT / "conf", config_name: str = "train"
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` (and the slurm group), as the job will.

    ``config_name="submit"`` gives what ``python -m slurm.submit <overrides>`` composes.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=config_name, overrides=with_slurm_group(overrides))


def _positive_int(field: str, value: Any, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise config_error(field, value, fix)
    return value


def job_settings(cfg: DictConfig) -> dict[str, Any]:
    """Check the composed config and derive the batch directives from it.

    Raises:
        ConfigError: a strategy the accelerator cannot run, ``trainer.devices`` not a positive number,
            or ``slurm.ntasks_per_node`` disagreeing with it.

    """
    # environ={}: the submitting shell's SLURM variables (if any) are not the job's.
    check_trainer_config(cfg.trainer, environ={}, objective=cfg.distill.objective)
    slurm = OmegaConf.to_container(cfg.slurm, resolve=True)
    devices = _positive_int(
        "trainer.devices",
        cfg.trainer.get("devices"),
        "give the number of devices per node (e.g. trainer.devices=4); --ntasks-per-node is derived from it",
    )
    nodes = _positive_int("slurm.nodes", slurm.get("nodes"), "give the number of nodes, e.g. slurm.nodes=2")
    ntasks = slurm.get("ntasks_per_node")
    if ntasks is not None and ntasks != devices:
        raise config_error(
            "slurm.ntasks_per_node",
            ntasks,
            f"Lightning runs one task per device, so it must equal trainer.devices={devices}; "
            "leave it null to derive it",
        )
    accelerator = str(cfg.trainer.get("accelerator", "auto")).lower()
    gpus = slurm.get("gpus_per_node")
    if gpus == "auto":
        gpus = None if accelerator == "cpu" else devices
    if gpus is not None:
        _positive_int("slurm.gpus_per_node", gpus, "give a number, 'auto' (= trainer.devices) or null")
        if accelerator != "cpu" and gpus < devices:
            raise config_error(
                "slurm.gpus_per_node", gpus, f"fewer GPUs than trainer.devices={devices}; use 'auto' or raise it"
            )
    return {**slurm, "nodes": nodes, "ntasks_per_node": devices, "gpus_per_node": gpus}


def render(cfg: DictConfig, overrides: Sequence[str], log_dir: Path, workdir: Path = ROOT) -> str:
    """The batch script for ``cfg``; ``overrides`` are passed verbatim to ``srun python train.py``."""
    job = job_settings(cfg)
    optional = [f"--gpus-per-node={job['gpus_per_node']}" if job["gpus_per_node"] else None]
    optional += [f"--{key}={job[key]}" if job.get(key) else None for key in ("partition", "account", "qos", "mem")]
    optional += [str(d) for d in job.get("extra_directives") or []]
    return Template(TEMPLATE.read_text()).substitute(
        job_name=job["job_name"],
        nodes=job["nodes"],
        ntasks_per_node=job["ntasks_per_node"],
        cpus_per_task=job["cpus_per_task"],
        time=job["time"],
        signal_delay_s=job["signal_delay_s"],
        log_dir=shlex.quote(str(log_dir)),
        optional_directives="\n".join(f"#SBATCH {d}" for d in optional if d),
        workdir=shlex.quote(str(workdir)),
        setup="\n".join(job.get("setup") or []),
        overrides=" ".join(shlex.quote(o) for o in with_slurm_group(overrides)),
    )


def submit(script: str, log_dir: Path, job_name: str) -> str:
    """Write ``script`` under ``log_dir`` and hand it to ``sbatch``; returns the job id.

    Raises:
        ConfigError: ``sbatch`` is not on the PATH (checked before anything is written).

    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise config_error(
            "sbatch", "not on PATH", "run on a SLURM login node, or pass dry_run=true to print the script"
        )
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{job_name}-{time.strftime('%Y-%m-%d_%H-%M-%S')}.sbatch"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(script)
    tmp.replace(path)  # never a half-written script under the final name
    out = subprocess.run([sbatch, "--parsable", str(path)], check=True, text=True, capture_output=True)
    return out.stdout.strip().split(";")[0]


def run(cfg: DictConfig, overrides: Sequence[str]) -> str | None:
    """Render the batch script for ``cfg`` (composed from ``conf/submit.yaml``), then print or submit it.

    Args:
        cfg: the composed config, with ``dry_run`` and ``log_dir``.
        overrides: the command line's overrides; all but ``dry_run`` and ``log_dir`` go to ``train.py``.

    Returns:
        The job id, or None for a dry run (the script was printed).

    Raises:
        ConfigError: anything :func:`job_settings` or :func:`submit` refuses; nothing is written then.

    """
    log_dir = Path(cfg.log_dir).resolve() if cfg.log_dir else ROOT / "logs" / "slurm"
    script = render(cfg, train_overrides(overrides), log_dir)
    if cfg.dry_run:
        print(script, end="")
        return None
    job_id = submit(script, log_dir, cfg.slurm.job_name)
    print(f"submitted job {job_id}: its run directory is logs/<task_name>/runs/{job_id}, its log in {log_dir}/")
    return job_id


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="submit")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    # No export_root() here: sbatch hands this environment to the job, whose paths.root_dir must be the
    # directory the batch script changes into, not the one this command ran in.
    main()
