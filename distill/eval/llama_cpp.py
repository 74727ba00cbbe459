"""llama.cpp's own score of a GGUF file: ``llama-perplexity --kl-divergence`` against the fp32 teacher, beside torch's.

llama.cpp's published quantization tables (mean KLD, 99th-percentile KLD, "Same top p") come from
``llama-perplexity``: it runs the base model over a text in chunks of ``ctx`` tokens, stores the base
log-probabilities of the second half of every chunk, then runs each quantized file over the same tokens and
compares. "Same top p" is top-1 agreement. :func:`score` puts files on that scale:

1. the base is the fp32 teacher written as an F32 GGUF file by this project's exporter (the weights the report's
   teacher has);
2. for each text, ``llama-perplexity --kl-divergence-base`` with the base file, then ``--kl-divergence`` with every
   file;
3. the tokens llama.cpp scored are read back from its base file, and torch scores the same windows: the fp32
   teacher against each file as transformers' GGUF loader reads it (dequantised). The difference between the two
   same-top figures is what llama.cpp's own arithmetic does to the file (its matmuls round activations to 8 bits
   for the quantized types), since the tokens, windows and weights are the same.

The torch side has a 95 % bootstrap interval over chunks; llama.cpp prints a binomial one over tokens.
``llama-perplexity`` is in no Python package: it is built from llama.cpp's sources (docs/deploy.md). Used by
``bench/llama_cpp_kld.py`` and, with ``eval.llama_cpp_bin``, by a run's report.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import config_error

# What llama-perplexity prints at the end of a --kl-divergence run (tools/perplexity/perplexity.cpp).
_PATTERNS = {
    "mean_kld": r"Mean\s+KLD:\s+([-\d.]+)\s+±\s+([-\d.]+)",
    "p99_kld": r"99\.0%\s+KLD:\s+([-\d.]+)",
    "same_top": r"Same top p:\s+([-\d.]+)\s+±\s+([-\d.]+)\s+%",
    "ppl_q": r"Mean PPL\(Q\)\s+:\s+([-\d.]+)",
    "ppl_base": r"Mean PPL\(base\)\s+:\s+([-\d.]+)",
}


def parse_kld(output: str) -> dict[str, float]:
    """The summary of a ``llama-perplexity --kl-divergence`` run; same-top as a fraction, with llama.cpp's ±."""
    found: dict[str, float] = {}
    for key, pattern in _PATTERNS.items():
        m = re.search(pattern, output)
        if m is None:
            raise ValueError(f"llama-perplexity printed no {key!r} line; its output ends:\n{output[-2000:]}")
        found[key] = float(m.group(1))
        if key == "mean_kld":
            found["mean_kld_err"] = float(m.group(2))
        if key == "same_top":
            found["same_top"] /= 100
            found["same_top_err"] = float(m.group(2)) / 100
    return found


def read_base_tokens(path: Path) -> tuple[int, int, np.ndarray]:
    """``(n_ctx, n_vocab, tokens (n_chunk, n_ctx))`` from a ``--kl-divergence-base`` file (its header, as written)."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{path} is not a llama-perplexity log-probability file")
        n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(f.read(12), dtype=np.int32))
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32).reshape(n_chunk, n_ctx)
    return n_ctx, n_vocab, tokens


def tool(bin_dir: str | None, name: str, field: str = "llama_cpp_bin") -> Path:
    """The llama.cpp program ``name`` in ``bin_dir``, or a clear refusal naming the setting ``field``."""
    if not bin_dir:
        raise config_error(field, bin_dir, "give the folder of llama.cpp's built tools (docs/deploy.md)")
    path = Path(bin_dir) / name
    if not path.is_file():
        fix = f"holds no {name}; build it: cmake --build <build> --target {name}"
        raise config_error(field, bin_dir, fix)
    return path


def perplexity(exe: Path, model: Path, args: list[str], threads: int) -> str:
    """Run ``llama-perplexity`` on ``model`` with ``args``; its printed output, or RuntimeError with its stderr."""
    cmd = [str(exe), "-m", str(model), "-t", str(threads), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def torch_scores(teacher: Any, students: dict[str, Any], tokens: np.ndarray, bos: int | None) -> dict[str, dict]:
    """Per student: top-1 agreement and KL(teacher ‖ student) on llama.cpp's windows (each chunk's second half).

    The teacher runs once per chunk for every student.
    """
    import torch
    import torch.nn.functional as F

    from distill.eval.intervals import ratio_interval

    n_ctx = tokens.shape[1]
    first = n_ctx // 2
    agree: dict[str, list[float]] = {k: [] for k in students}
    klds: dict[str, list[np.ndarray]] = {k: [] for k in students}
    counts: list[float] = []
    with torch.inference_mode():
        for chunk in tokens:
            ids = torch.from_numpy(chunk.astype(np.int64)).unsqueeze(0)
            if bos is not None:
                ids[0, 0] = bos
            t = F.log_softmax(teacher(input_ids=ids).logits[0, first : n_ctx - 1].float(), -1)
            counts.append(float(len(t)))
            for label, student in students.items():
                s = F.log_softmax(student(input_ids=ids).logits[0, first : n_ctx - 1].float(), -1)
                agree[label].append(float((t.argmax(-1) == s.argmax(-1)).sum()))
                klds[label].append((t.exp() * (t - s)).sum(-1).double().numpy())
    out = {}
    for label in students:
        kld = np.concatenate(klds[label])
        out[label] = {
            "same_top": sum(agree[label]) / sum(counts),
            "same_top_interval": list(ratio_interval(agree[label], counts)),
            "mean_kld": float(kld.mean()),
            "p99_kld": float(np.percentile(kld, 99)),
            "tokens": int(sum(counts)),
            "chunks": len(counts),
        }
    return out


def gguf_bos(path: Path) -> int | None:
    """The BOS id llama.cpp puts at each chunk's start, or None when the file says not to add one."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key: str) -> Any:
        field = fields.get(key)
        return None if field is None else field.parts[field.data[0]][0]

    add = value("tokenizer.ggml.add_bos_token")
    bos = value("tokenizer.ggml.bos_token_id")
    # llama.cpp's default for a BPE vocabulary without the key is to add BOS (llama-vocab.cpp).
    return int(bos) if bos is not None and (add is None or bool(add)) else None


def score(
    teacher: Any,
    tokenizer: Any,
    pre: str,
    files: dict[str, Path],
    texts: dict[str, str],
    work: Path,
    exe: Path,
    ctx: int = 512,
    threads: int = 2,
    after_set: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Score every GGUF file of ``files`` with llama.cpp and with torch on every text of ``texts``.

    Args:
        teacher: the fp32 teacher (a transformers model); written to ``work`` as the F32 base file.
        tokenizer: its tokenizer.
        pre: its llama.cpp pre-tokenizer name (``distill.export.gguf.teacher_pre``).
        files: label → GGUF file.
        texts: set name → the set's documents as one text.
        work: a folder for the base file, the texts and the base log-probabilities.
        exe: ``llama-perplexity`` (:func:`tool`).
        ctx: llama.cpp's chunk (``-c``); it scores each chunk's second half.
        threads: for llama.cpp and torch.
        after_set: called with the result so far after each set (a long call stopped later keeps what it finished).

    Returns:
        ``{"ctx", "threads", "base", "sets": {name: {"chunks", "n_ctx", "rows": {label: {"file", "bytes",
        "llama_cpp": parse_kld(...), "torch": torch_scores(...)}}}}}``.

    """
    import torch
    from transformers import AutoModelForCausalLM

    from distill.export.gguf import write_gguf

    work.mkdir(parents=True, exist_ok=True)
    base = write_gguf(teacher, tokenizer, work / "base", "f32", pre=pre)
    bos = gguf_bos(base)
    result: dict[str, Any] = {"ctx": ctx, "threads": threads, "base": "the fp32 teacher as F32", "sets": {}}
    load = AutoModelForCausalLM.from_pretrained
    students = {k: load(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval() for k, p in files.items()}
    for name, text in texts.items():
        text_file = work / f"{name}.txt"
        text_file.write_text(text)
        base_logits = work / f"{name}.kld"
        common = ["-f", str(text_file), "-c", str(ctx), "-b", str(ctx)]
        perplexity(exe, base, [*common, "--kl-divergence-base", str(base_logits)], threads)
        n_ctx, _, tokens = read_base_tokens(base_logits)
        ours = torch_scores(teacher, students, tokens, bos)
        rows = {}
        for label, path in files.items():
            args = [*common, "--kl-divergence-base", str(base_logits), "--kl-divergence"]
            scored = parse_kld(perplexity(exe, path, args, threads))
            rows[label] = {"file": str(path), "bytes": path.stat().st_size, "llama_cpp": scored, "torch": ours[label]}
        result["sets"][name] = {"chunks": int(tokens.shape[0]), "n_ctx": n_ctx, "rows": rows}
        if after_set is not None:
            after_set(result)
    return result


def table(result: dict[str, Any]) -> str:
    """The Markdown table of a :func:`score` result: llama.cpp's figures beside torch's on the same windows."""
    lines = [
        "| set | file | bytes | llama.cpp same-top | llama.cpp mean KLD | llama.cpp p99 KLD | torch same-top "
        "[95 %] | torch mean KLD | torch p99 KLD |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in result["sets"].items():
        for label, r in s["rows"].items():
            lc, th = r["llama_cpp"], r["torch"]
            lo, hi = th["same_top_interval"]
            lines.append(
                f"| {name} | {label} | {r['bytes']:,} | {lc['same_top']:.3f} ± {lc['same_top_err']:.3f} | "
                f"{lc['mean_kld']:.4f} | {lc['p99_kld']:.3f} | {th['same_top']:.3f} [{lo:.3f}, {hi:.3f}] | "
                f"{th['mean_kld']:.4f} | {th['p99_kld']:.3f} |"
            )
    return "\n".join(lines)
