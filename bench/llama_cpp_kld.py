"""llama.cpp's own score of GGUF files: ``llama-perplexity --kl-divergence`` against the fp32 teacher, beside ours.

For each held-out set (the run's test split and the shipped English set) this runs
:func:`distill.eval.llama_cpp.score` on every file of ``files``: llama.cpp's mean KLD, 99th-percentile KLD and
"Same top p" (top-1 agreement) against the fp32 teacher written as F32, and torch's score of the same tokens and
windows. A run scores its own GGUF file the same way with ``eval.llama_cpp_bin`` (docs/deploy.md).

    python -m bench.llama_cpp_kld llama_cpp_bin=/path/to/llama.cpp/build/bin \\
        'files={default: logs/train/runs/<run>/student_gguf/student-q4_0.gguf}'

``llama-perplexity`` is not part of any Python package: build it from llama.cpp's sources (docs/deploy.md,
"llama.cpp's own score"). Writes ``bench/results/llama_cpp_kld.{json,md}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from distill.config import config_error, exit_on_config_error
from distill.eval.llama_cpp import score, table, tool


def set_texts(cfg: DictConfig, tokenizer: Any) -> dict[str, str]:
    """Each held-out set's documents as one text, in corpus order (the run's test split, then named sets)."""
    from distill.config import build
    from distill.data.corpus import load_raw
    from distill.data.named_sets import _spec

    texts: dict[str, str] = {}
    for name, value in cfg.sets.items():
        if value == "split":
            dm = build(cfg.data, tokenizer=tokenizer)
            dm.setup("fit")
            texts[name] = dm.split_text("test")
        else:
            spec = _spec(name, value)
            texts[name] = "\n\n".join(t for t in load_raw(**spec)[0][spec["text_field"]] if t and t.strip())
    return texts


def run(cfg: DictConfig) -> dict[str, Any]:
    """Score every file with llama.cpp and with torch on every set; print and write the table."""
    import torch

    from distill.config import build
    from distill.export.gguf import teacher_pre

    exe = tool(cfg.llama_cpp_bin, "llama-perplexity")
    if not cfg.files:
        raise config_error("files", cfg.files, "give at least one GGUF file: 'files={label: path/to/file.gguf}'")
    files = {str(k): Path(v) for k, v in cfg.files.items()}
    for label, path in files.items():
        if not path.is_file() or path.suffix != ".gguf":
            raise config_error(f"files.{label}", str(path), "not a GGUF file")
    torch.set_num_threads(cfg.threads)
    teacher = build(cfg.teacher)
    texts = set_texts(cfg, teacher.tokenizer)

    def after_set(result: dict[str, Any]) -> None:
        name = next(reversed(result["sets"]))
        for label, row in result["sets"][name]["rows"].items():
            _print_row(name, label, row)
        _write(cfg, result)  # after each set: a long run stopped later keeps the sets it finished

    return score(
        teacher.model,
        teacher.tokenizer,
        teacher_pre(cfg.teacher),
        files,
        texts,
        Path(cfg.work_dir),
        exe,
        ctx=cfg.ctx,
        threads=cfg.threads,
        after_set=after_set,
    )


def _print_row(name: str, label: str, row: dict[str, Any]) -> None:
    lc, th = row["llama_cpp"], row["torch"]
    print(
        f"{name:8s} {label:28s} llama.cpp same-top {lc['same_top']:.3f} ± {lc['same_top_err']:.3f} "
        f"KLD {lc['mean_kld']:.4f} (p99 {lc['p99_kld']:.3f}) | torch same-top {th['same_top']:.3f} "
        f"[{th['same_top_interval'][0]:.3f}, {th['same_top_interval'][1]:.3f}] KLD {th['mean_kld']:.4f} "
        f"(p99 {th['p99_kld']:.3f})",
        flush=True,
    )


def _write(cfg: DictConfig, result: dict[str, Any]) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llama_cpp_kld.json").write_text(json.dumps(result, indent=1))
    sets = ", ".join(f"{k} ({v['chunks']} chunks of {v['n_ctx']})" for k, v in result["sets"].items())
    md = [
        "# llama.cpp's own score of GGUF files",
        "",
        f"`python -m bench.llama_cpp_kld`: `llama-perplexity --kl-divergence` against the fp32 teacher written as F32, "
        f"on {sets}, {result['threads']} threads; the torch columns score the same tokens and windows with the fp32 "
        "teacher and the file as transformers dequantises it.",
        "",
        table(result),
        "",
    ]
    (out / "llama_cpp_kld.md").write_text("\n".join(md))
    print("\n".join(md))


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/llama_cpp_kld")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    main()
