"""What must hold after a fault: every published artifact loads whole, and no temporary file outlives its writer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

TEMPORARY = re.compile(r"^\..+\.(tmp|old)$")


def temporaries(root: Path) -> list[str]:
    """Temporary files and folders (``.<name>.<host>-<pid>-<random>.tmp|old``) anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if TEMPORARY.match(p.name))


def assert_published_whole(run_dir: Path) -> None:
    """Every checkpoint, export, GGUF file, report and generation shard under ``run_dir`` loads."""
    for ckpt in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        if ckpt.exists():  # last.ckpt may link to a checkpoint that a newer one replaced
            state = torch.load(ckpt, weights_only=True, map_location="cpu")
            assert state["state_dict"] and "global_step" in state, ckpt
    student = run_dir / "student"
    if student.exists():
        from transformers import AutoModelForCausalLM

        assert (student / "tokenizer.json").is_file() and (student / "distill.json").is_file()
        AutoModelForCausalLM.from_pretrained(student)
    for file in sorted((run_dir / "student_gguf").glob("*.gguf")):
        import gguf

        reader = gguf.GGUFReader(file)
        assert reader.tensors and all(t.data.size for t in reader.tensors), file
    if (run_dir / "report.json").exists():
        report = json.loads((run_dir / "report.json").read_text())
        assert report["comparison"] and "run" in report
        assert (run_dir / "report.md").read_text().rstrip().endswith(report_tail(run_dir))
    for shard in sorted(run_dir.glob("seqkd/*/shard-*")):
        import datasets

        assert len(datasets.load_from_disk(str(shard))) > 0, shard


def report_tail(run_dir: Path) -> str:
    """The last line ``to_markdown`` writes for this run's report.json: report.md belongs to the same report."""
    from distill.eval.report import to_markdown

    return to_markdown(json.loads((run_dir / "report.json").read_text())).rstrip().splitlines()[-1]


def export_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported student's tensors."""
    return load_file(run_dir / "student" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two exports hold the same student (as a resumed run must, to float32 round-off)."""
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
