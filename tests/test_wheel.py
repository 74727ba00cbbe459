"""The built wheel alone runs the library's commands: their configs ship inside it (``pkg://conf``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT

# The commands README's table lists as `python -m <module>`: each composes its root config from the package.
COMMANDS = {
    "distill.export.gguf": "gguf",
    "distill.export.ptq": "ptq",
    "distill.models.cache_builder": "cache_teacher",
    "distill.eval.sweep": "sweep",
    "slurm.submit": "submit",
}
PACKAGES = ("distill", "students", "callbacks", "slurm", "conf")


def test_the_wheel_runs_the_library_commands_outside_the_checkout(tmp_path):
    # Build from a copy of what the wheel is made of, so the build writes nothing into the checkout; without
    # build isolation, so no package index is needed (the suite's venv has setuptools).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("distill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in COMMANDS.values():
        assert f"conf/{config}.yaml" in names
    assert "conf/paths/default.yaml" in names and "conf/hydra/default.yaml" in names
    assert not any(name.startswith(("bench/", "tests/")) for name in names)

    site, work = tmp_path / "site", tmp_path / "work"
    zipfile.ZipFile(wheel).extractall(site)
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the checkout's editable install
    where = subprocess.run(
        [sys.executable, "-c", "import conf, distill; print(distill.__file__); print(conf.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(Path(line).is_relative_to(site) for line in where.stdout.split())
    # Each command as `python -m <module> --cfg job` would run it (print the composed config, write nothing),
    # all in one process: five interpreters would spend a minute importing torch five times.
    driver = (
        "import runpy, sys\n"
        "for module in sys.argv[1:]:\n"
        "    sys.argv = [module, '--cfg', 'job']\n"
        "    print(f'== {module}', flush=True)\n"
        "    try:\n"
        "        runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as stop:\n"
        "        assert not stop.code, f'{module} exited with {stop.code}'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", driver, *COMMANDS], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = dict(part.split("\n", 1) for part in proc.stdout.split("== ")[1:])
    assert set(printed) == set(COMMANDS)
    for module, config in COMMANDS.items():
        assert ("dry_run:" if config == "submit" else "task_name:") in printed[module], printed[module][-500:]
    assert not (work / "logs").exists()  # --cfg job only prints: nothing written where the user stands
