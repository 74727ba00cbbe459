"""Peak host memory per rank under ``trainer=fsdp_sim``: who reads the teacher, and QAD under FSDP against DDP.

Two studies on 2 CPU ranks with a random teacher big enough to stand out from the interpreter's own footprint;
each rank logs its peak resident set size (``VmHWM``) after training.

* ``teacher_read``: ``trainer_extras.teacher_on_rank_zero=true`` (the default: ranks > 0 build the models empty
  and are filled unit by unit, distill/runtime/rank_zero_load.py) against ``false`` (every rank builds the whole
  teacher before FSDP shards it).
* ``qad``: quantization-aware distillation of the teacher into its full-depth copy (every matrix and the
  embedding fake-quantized to llama.cpp's Q4_0, AdamW), under ``trainer=ddp_sim``, ``trainer=fsdp_sim``, and
  ``fsdp_sim`` with activation checkpointing.

It prints the peaks and :func:`qad_gpu_table` (the per-GPU memory of QAD of an 8B and a 70B student on 8 GPUs,
computed from parameter counts) and writes both to ``bench/results/fsdp_memory.json``.

    python -m bench.fsdp_memory [hidden=1024 layers=8 intermediate=4096 steps=2 studies=[teacher_read,qad]]

What it cannot show on a laptop: the GPU side (each rank's device memory holds its shards either way) and
the time the broadcast takes over a real interconnect.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bench import ROOT
from distill.config import exit_on_config_error


def teacher_params(hidden: int, layers: int, intermediate: int, vocab: int, heads: int = 4, kv_heads: int = 2) -> int:
    """Parameters of the random llama teacher (untied head, no biases), as transformers builds it."""
    kv = hidden * kv_heads // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


# QAD as the recipe runs it (conf/experiment/qad_q4_0.yaml: the teacher's full-depth copy, every matrix and the
# embedding on llama.cpp's Q4_0 grid from the first step, AdamW), on the random teacher.
QAD = ["experiment=qad_q4_0", "data.block_size=64", "data.batch_size=4", "trainer.max_time=null"]
QAD_SETTINGS = {
    "ddp_sim": ["trainer=ddp_sim"],
    "fsdp_sim": ["trainer=fsdp_sim"],
    "fsdp_sim_checkpointing": ["trainer=fsdp_sim", "trainer_extras.activation_checkpointing=true"],
}


def peaks(name: str, overrides: list[str], cfg: DictConfig, work: Path) -> dict[int, float]:
    """One 2-rank run of the random teacher with ``overrides``; returns rank → peak host memory in MiB."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        "teacher=tiny_random",
        f"teacher.hidden_size={cfg.hidden}",
        f"teacher.num_layers={cfg.layers}",
        f"teacher.intermediate_size={cfg.intermediate}",
        f"trainer.max_steps={cfg.steps}",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "eval.enabled=false",
        "export.enabled=false",
        "callbacks.model_checkpoint=null",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={work / name}",
        f"paths.cache_dir={work / 'cache'}",
        f"data.cache_dir={work / 'cache' / 'data'}",
    ]
    proc = subprocess.run(cmd, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, capture_output=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({name}):\n{text[-3000:]}")
    return {int(r): float(m) for r, m in re.findall(r"rank (\d) peak host memory (\d+) MiB", text)}


# Llama-3.1-8B and -70B: parameters, width, layers, MLP width, parameters of one decoder layer, of the
# embeddings and output layer together (untied), and the vocabulary (from their configs).
LLAMAS = {
    "8B": {"p": 8.03e9, "d": 4096, "layers": 32, "ffn": 14336, "layer": 218e6, "ends": 1.05e9, "vocab": 128256},
    "70B": {"p": 70.6e9, "d": 8192, "layers": 80, "ffn": 28672, "layer": 856e6, "ends": 2.10e9, "vocab": 128256},
}


def qad_gpu_table(gpus: int = 8, batch: int = 1, seq: int = 4096, chunk: int = 128) -> dict[str, dict[str, float]]:
    """Per-GPU bytes of QAD of an 8B and a 70B student on ``gpus`` GPUs, FSDP against DDP (docs/scale_out.md).

    QAD distils the teacher into its own full-depth copy, so both have P parameters. ``bf16-mixed``, AdamW,
    activation checkpointing on, the chunked loss (on by default at this vocabulary). Per GPU:

    * student states: fp32 weights, gradients and two moments, 16·P (FSDP: /N);
    * teacher: bf16, 2·P (FSDP: /N);
    * gathered (FSDP only): the root unit (student embeddings and head) whole in bf16 for the step, 2·E; the
      teacher's own unit, gathered for the chunked loss, 2·E; two decoder layers (current and prefetched), 2·2·L;
    * grid copies: the fake-quantized weights a linear saves for its backward (bf16), one layer's (2·L) with
      checkpointing; without it, every matrix's (2·P), under FSDP as under DDP;
    * activations: each layer's input kept by checkpointing, b·s·d·2 per layer; one layer recomputed,
      about b·s·(6·d + 4·f)·2; the chunked loss, about 10·chunk·V fp32 values.
    """
    table = {}
    for name, m in LLAMAS.items():
        p, layer, ends = m["p"], m["layer"], m["ends"]
        parts = {
            "student_states": 16 * p,
            "teacher": 2 * p,
            "gathered": 2 * ends + 2 * ends + 2 * 2 * layer,
            "grid_copies": 2 * layer,
            "activations": batch * seq * 2 * (m["d"] * m["layers"] + 6 * m["d"] + 4 * m["ffn"])
            + 10 * chunk * m["vocab"] * 4,
        }
        fsdp = {**parts, "student_states": parts["student_states"] / gpus, "teacher": parts["teacher"] / gpus}
        ddp = {**parts, "gathered": 0.0}
        table[name] = {
            **{f"fsdp_{k}_gb": v / 1e9 for k, v in fsdp.items()},
            "fsdp_total_gb": sum(fsdp.values()) / 1e9,
            "grid_copies_without_checkpointing_gb": 2 * p / 1e9,  # FSDP or DDP: every matrix saved for its backward
            **{f"ddp_{k}_gb": v / 1e9 for k, v in ddp.items()},
            "ddp_total_gb": sum(ddp.values()) / 1e9,
            # The smallest count of 80 GB GPUs whose FSDP shards fit beside the unsharded terms (no CUDA context).
            "fsdp_gpus_for_80gb": next(
                n
                for n in range(1, 1025)
                if (18 * p) / n + sum(fsdp.values()) - fsdp["student_states"] - fsdp["teacher"] <= 80e9
            ),
        }
    return table


def run(cfg: DictConfig) -> None:
    """Run the studies asked for; print and save the peaks with the computed GPU table."""
    params = teacher_params(cfg.hidden, cfg.layers, cfg.intermediate, vocab=512)
    out = ROOT / "bench" / "results" / "fsdp_memory.json"
    # A study not run keeps its numbers from the last run (of the same teacher: otherwise they are dropped).
    result: dict = json.loads(out.read_text()) if out.is_file() else {}
    if result.get("teacher_params") != params:
        result = {}
    result |= {"teacher_params": params, "teacher_fp32_mib": round(params * 4 / 2**20)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "teacher_read" in cfg.studies:
            for flag, key in ((True, "peak_mib_teacher_on_rank_zero"), (False, "peak_mib_every_rank_reads")):
                overrides = [
                    "experiment=smoke",
                    "trainer=fsdp_sim",
                    f"trainer_extras.teacher_on_rank_zero={flag}".lower(),
                ]
                result[key] = peaks(f"rank_zero_{flag}", overrides, cfg, work)
        if "qad" in cfg.studies:
            result["qad_student_params"] = params  # the teacher's full-depth copy
            result["qad_peak_mib"] = {
                name: peaks(name, [*QAD, *settings], cfg, work) for name, settings in QAD_SETTINGS.items()
            }
    result["qad_per_gpu_computed"] = {"gpus": 8, "batch": 1, "seq": 4096, "chunk": 128, "models": qad_gpu_table()}
    print(json.dumps(result, indent=2))
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(json.loads(json.dumps(result))))  # rank keys as the JSON has them


_QAD_ROWS = {
    "ddp_sim": "`trainer=ddp_sim`",
    "fsdp_sim": "`trainer=fsdp_sim`",
    "fsdp_sim_checkpointing": "`trainer=fsdp_sim trainer_extras.activation_checkpointing=true`",
}
_PARTS = ("student_states", "teacher", "gathered", "grid_copies", "activations")


def markdown(result: dict) -> str:
    """``bench/results/fsdp_memory.md``: the measured peaks and the computed per-GPU table, from the JSON."""
    mib = result["teacher_fp32_mib"]
    lines = ["# Peak host memory per rank (`python -m bench.fsdp_memory`)", ""]
    lines += [
        f"2 CPU ranks, a random Llama teacher of {result['teacher_params'] / 1e6:.1f}M parameters ({mib} MiB in "
        "fp32); each rank's `VmHWM` at the end of training.",
        "",
    ]
    if "peak_mib_teacher_on_rank_zero" in result:
        lines += ["| who reads the teacher (`trainer=fsdp_sim`) | rank 0 | rank 1 |", "| --- | ---: | ---: |"]
        for key, label in (
            ("peak_mib_every_rank_reads", "every rank (`trainer_extras.teacher_on_rank_zero=false`)"),
            ("peak_mib_teacher_on_rank_zero", "rank 0, the others filled unit by unit (default)"),
        ):
            row = result[key]
            lines.append(f"| {label} | {row['0']:,.0f} MiB | {row['1']:,.0f} MiB |")
        lines.append("")
    if "qad_peak_mib" in result:
        lines += [
            "QAD (`experiment=qad_q4_0`: the teacher's full-depth copy on llama.cpp's Q4_0 grid, AdamW, fp32):",
            "",
            "| setting | rank 0 | rank 1 |",
            "| --- | ---: | ---: |",
        ]
        for key, row in result["qad_peak_mib"].items():
            lines.append(f"| {_QAD_ROWS.get(key, key)} | {row['0']:,.0f} MiB | {row['1']:,.0f} MiB |")
        lines.append("")
    comp = result.get("qad_per_gpu_computed")
    if comp:
        models = comp["models"]
        lines += [
            f"Computed per GPU for QAD of Llama-3.1 students on {comp['gpus']} GPUs (bf16-mixed, AdamW, activation "
            f"checkpointing, batch {comp['batch']} × {comp['seq']} tokens, chunk {comp['chunk']}; GB = 1e9 bytes):",
            "",
            "| per GPU | " + " | ".join(f"{m}, {s}" for m in models for s in ("DDP", "FSDP")) + " |",
            "| --- |" + " ---: |" * (2 * len(models)),
        ]
        for part in _PARTS:
            cells = [f"{models[m][f'{s}_{part}_gb']:,.1f} GB" for m in models for s in ("ddp", "fsdp")]
            lines.append(f"| {part.replace('_', ' ')} | " + " | ".join(cells) + " |")
        totals = [f"**{models[m][f'{s}_total_gb']:,.1f} GB**" for m in models for s in ("ddp", "fsdp")]
        lines.append("| **total** | " + " | ".join(totals) + " |")
        need = ", ".join(f"{models[m]['fsdp_gpus_for_80gb']} GPUs of 80 GB for {m}" for m in models)
        lines += ["", f"FSDP needs {need}."]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/fsdp_memory")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))  # Hydra's record goes to the repository's logs/
    main()
