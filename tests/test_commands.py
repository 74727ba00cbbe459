"""Every command the docs advertise runs, and every student x teacher choice trains (tiny stand-ins, 2 steps).

The commands are read from the README, docs/recipes.md and the header comments of ``conf/train.yaml``, ``conf/teacher``,
``conf/student`` and ``conf/experiment``, so an example added to a doc comment is run without editing this file.
Each runs through ``train(cfg)`` in-process on the stand-ins of :mod:`tests.standins` (hub models replaced by
tiny random ones of their architecture, accelerators and multi-process trainers by the one-process CPU trainer).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from tests.conftest import CONF, ROOT
from tests.standins import StandIns, parse_command, shrink, sweep_points
from train import train

DOCS = [
    ROOT / "README.md",
    ROOT / "docs" / "recipes.md",
    CONF / "train.yaml",
    *(sorted((CONF / g).glob("*.yaml")) for g in ("teacher", "student", "experiment")),
]
_COMMAND = re.compile(r"((?:srun )?python (?:train\.py|-m slurm\.submit)\b[^`\n]*)")
# Syntax summaries, not examples: `python train.py [overrides]`, `model=<export>`, `…`.
_PLACEHOLDER = re.compile(r"\[(?:[a-z ]*overrides|dry_run=true|log_dir=[^\]]*)\]|<[^>]*>|…|\.\.\.")


def _doc_files() -> list[Path]:
    files: list[Path] = []
    for entry in DOCS:
        files += entry if isinstance(entry, list) else [entry]
    return files


def _header(path: Path) -> list[str]:
    """A yaml file's leading comment lines; every line of a markdown file."""
    lines = path.read_text().splitlines()
    if path.suffix == ".md":
        return lines
    head = []
    for line in lines:
        if not line.startswith("#"):
            break
        head.append(line.lstrip("#"))
    return head


def advertised_commands() -> dict[str, str]:
    """Each distinct documented command, keyed by a readable id (file and line of its first appearance)."""
    found: dict[str, str] = {}
    for path in _doc_files():
        for n, line in enumerate(_header(path), 1):
            for match in _COMMAND.finditer(line):
                command = match.group(1).split("  #")[0].strip().rstrip("`")
                if _PLACEHOLDER.search(command):
                    continue
                normal = " ".join(command.split())
                if normal not in found.values():
                    found[f"{path.relative_to(ROOT)}:{n}"] = normal
    return found


COMMANDS = advertised_commands()
# The default suite runs the commands a newcomer meets first (the README's two set-up paths and quickstart, and
# train.yaml's header); `pytest -m slow` runs every other documented command (about 10 s each on tiny stand-ins).
FIRST_MET = {"README.md", "conf/train.yaml"}


def _param(key: str, command: str) -> pytest.param:
    marks = () if key.split(":")[0] in FIRST_MET and "experiment=" not in command else (pytest.mark.slow,)
    return pytest.param(command, id=key, marks=marks)


def test_the_docs_advertise_commands_and_the_extraction_finds_them():
    values = set(COMMANDS.values())
    assert len(values) >= 40  # the README's quickstart, the recipes and every config header
    for expected in (
        "python train.py",
        "python train.py student=tiny teacher=llama trainer=gpu",
        "python train.py experiment=qad_q4_mix",
        "python train.py teacher=tiny_random student=tiny student.hidden_size=32 student.num_layers=1",
    ):
        assert expected in values
    assert not any("<" in c or "[overrides]" in c for c in values)


def compose_exact(overrides: list[str], out: Path, cache_dir: Path) -> DictConfig:
    """``conf/train.yaml`` composed exactly as ``python train.py <overrides>`` would (default experiment kept)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.log_dir = str(out)
        cfg.paths.output_dir = str(out)
        cfg.paths.cache_dir = str(cache_dir)
        cfg.data.cache_dir = str(cache_dir / "data")
        cfg.eval.baselines = None
    return cfg


@pytest.fixture(scope="session")
def standins(tmp_path_factory, cache_dir) -> StandIns:
    return StandIns(tmp_path_factory.mktemp("standins"), cache_dir)


def _resume_path(overrides: list[str]) -> str | None:
    value = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    return value if value not in (None, "auto", "null") and not Path(value).exists() else None


def run_train(overrides: list[str], out: Path, cache_dir: Path, standins: StandIns) -> dict:
    """One command's run: composed, pointed at stand-ins, 2 steps; a checkpoint path it names is made first."""
    missing = _resume_path(overrides)
    if missing is not None:  # `resume=/path/to/step000400.ckpt`: a checkpoint of the same run, 2 steps in
        first = [o for o in overrides if not o.startswith("resume=")]
        train(shrink(compose_exact([*first, "resume=null"], out / "first", cache_dir), standins))
        ckpt = sorted((out / "first" / "checkpoints").glob("step*.ckpt"))[-1]
        overrides = [f"resume={ckpt}" if o.startswith("resume=") else o for o in overrides]
        cfg = shrink(compose_exact(overrides, out, cache_dir), standins, steps=3)
    else:
        cfg = shrink(compose_exact(overrides, out, cache_dir), standins)
    _, objects = train(cfg)
    assert objects["trainer"].global_step == cfg.trainer.max_steps or cfg.trainer.get("fast_dev_run")
    return objects


@pytest.mark.parametrize("command", [_param(k, c) for k, c in COMMANDS.items()])
def test_advertised_command_runs(command, tmp_path, cache_dir, standins):
    entry, overrides, multirun = parse_command(command)
    if entry == "slurm.submit":
        from slurm.submit import compose_config, render

        overrides = [o for o in overrides if not o.startswith(("dry_run=", "log_dir="))]
        script = render(compose_config(overrides), overrides, tmp_path)
        assert "srun" in script and "train.py" in script
        # What the batch script runs (srun python train.py <overrides>), on the stand-ins.
    for i, point in enumerate(sweep_points(overrides) if multirun else [overrides]):
        objects = run_train(point, tmp_path / f"run{i}", cache_dir, standins)
        if not objects["trainer"].fast_dev_run:
            assert (tmp_path / f"run{i}" / "student" / "config.json").is_file()


STUDENTS = sorted(p.stem for p in (CONF / "student").glob("*.yaml"))
TEACHERS = sorted(p.stem for p in (CONF / "teacher").glob("*.yaml"))


# In the default suite, every student and every teacher trains at least once under each recipe; the whole product
# runs with -m slow.
# A full-depth or importance-chosen copy of the 30-layer stand-ins is the slowest pairing, so those students meet the
# 2-layer random teacher here and the stand-ins meet the cheaper students.
COVERING = {
    ("full_depth", "tiny_random", "default"),
    ("tiny", "cached", "default"),
    ("from_teacher", "smollm2", "default"),
    ("importance_depth", "tiny_random", "default"),
    ("pretrained", "llama", "default"),
    ("tiny", "cached", "bare"),
    ("from_teacher", "llama", "bare"),
    ("pretrained", "smollm2", "bare"),
    ("full_depth", "tiny_random", "bare"),
    ("importance_depth", "llama", "bare"),
}
PRODUCT = [
    pytest.param(s, t, r, marks=() if (s, t, r) in COVERING else (pytest.mark.slow,), id=f"{s}-{t}-{r}")
    for s in STUDENTS
    for t in TEACHERS
    for r in ("default", "bare")
]


@pytest.mark.parametrize(("student", "teacher", "recipe"), PRODUCT)
def test_every_student_and_teacher_choice_trains(student, teacher, recipe, tmp_path, cache_dir, standins):
    overrides = [f"student={student}", f"teacher={teacher}", *(["~experiment"] if recipe == "bare" else [])]
    objects = run_train(overrides, tmp_path, cache_dir, standins)
    assert (tmp_path / "student" / "config.json").is_file()
    assert objects["trainer"].global_step == 2
