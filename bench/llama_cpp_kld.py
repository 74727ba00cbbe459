"""llama.cpp's own score of GGUF files: ``llama-perplexity --kl-divergence`` against the fp32 teacher, beside ours.

llama.cpp's published quantization tables (mean KLD, 99th-percentile KLD, "Same top p") come from
``llama-perplexity``: it runs the base model over a text in chunks of ``ctx`` tokens, stores the base
log-probabilities of the second half of every chunk, then runs each quantized file over the same tokens and
compares. "Same top p" is top-1 agreement. This script puts this project's files on that scale:

1. writes the fp32 teacher as an F32 GGUF file with this project's exporter (the base: the same weights the
   report's teacher has);
2. for each held-out set (the run's test split and the shipped English set), writes its documents as one text
   and runs ``llama-perplexity --kl-divergence-base`` with the base file, then ``--kl-divergence`` with every
   file in ``files``;
3. reads the tokens llama.cpp scored back from its base file and scores the same windows in torch: the fp32
   teacher against each file as transformers' GGUF loader reads it (dequantised). The difference between the
   two same-top figures is what llama.cpp's own arithmetic does to the file (its matmuls round activations to
   8 bits for the quantized types), since the tokens, windows and weights are the same.

The torch side has a 95 % bootstrap interval over chunks; llama.cpp prints a binomial one over tokens.

    python bench/llama_cpp_kld.py llama_cpp_bin=/path/to/llama.cpp/build/bin \\
        'files={default: logs/train/runs/<run>/student_gguf/student-q4_0.gguf}'

``llama-perplexity`` is not part of any Python package: build it from llama.cpp's sources (docs/deploy.md,
"llama.cpp's own score"). Writes ``bench/results/llama_cpp_kld.{json,md}``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from distill.config import config_error, exit_on_config_error  # noqa: E402

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


def tool(bin_dir: str | None, name: str) -> Path:
    """The llama.cpp program ``name`` in ``bin_dir``, or a clear refusal naming ``llama_cpp_bin``."""
    if not bin_dir:
        raise config_error("llama_cpp_bin", bin_dir, "give the folder of llama.cpp's built tools (docs/deploy.md)")
    path = Path(bin_dir) / name
    if not path.is_file():
        fix = f"holds no {name}; build it: cmake --build <build> --target {name}"
        raise config_error("llama_cpp_bin", bin_dir, fix)
    return path


def _perplexity(exe: Path, model: Path, args: list[str], threads: int) -> str:
    cmd = [str(exe), "-m", str(model), "-t", str(threads), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


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
            raw, _ = dm._raw()
            docs = [raw[i][dm.text_field] for i in dm.heldout_docs["test"]]
        else:
            spec = _spec(name, value)
            docs = [t for t in load_raw(**spec)[0][spec["text_field"]] if t and t.strip()]
        texts[name] = "\n\n".join(docs)
    return texts


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


def _gguf_bos(path: Path) -> int | None:
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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Score every file with llama.cpp and with torch on every set; print and write the table."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import build
    from distill.export.gguf import teacher_pre, write_gguf

    exe = tool(cfg.llama_cpp_bin, "llama-perplexity")
    if not cfg.files:
        raise config_error("files", cfg.files, "give at least one GGUF file: 'files={label: path/to/file.gguf}'")
    files = {str(k): Path(v) for k, v in cfg.files.items()}
    for label, path in files.items():
        if not path.is_file() or path.suffix != ".gguf":
            raise config_error(f"files.{label}", str(path), "not a GGUF file")
    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    teacher = build(cfg.teacher)
    base = write_gguf(teacher.model, teacher.tokenizer, work / "base", "f32", pre=teacher_pre(cfg.teacher))
    bos = _gguf_bos(base)
    texts = set_texts(cfg, teacher.tokenizer)
    result: dict[str, Any] = {"ctx": cfg.ctx, "threads": cfg.threads, "base": "the fp32 teacher as F32", "sets": {}}
    students = {
        label: AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
        for label, p in files.items()
    }
    for name, text in texts.items():
        text_file = work / f"{name}.txt"
        text_file.write_text(text)
        base_logits = work / f"{name}.kld"
        common = ["-f", str(text_file), "-c", str(cfg.ctx), "-b", str(cfg.ctx)]
        _perplexity(exe, base, [*common, "--kl-divergence-base", str(base_logits)], cfg.threads)
        n_ctx, _, tokens = read_base_tokens(base_logits)
        ours = torch_scores(teacher.model, students, tokens, bos)
        rows = {}
        for label, path in files.items():
            args = [*common, "--kl-divergence-base", str(base_logits), "--kl-divergence"]
            scored = parse_kld(_perplexity(exe, path, args, cfg.threads))
            rows[label] = {"file": str(path), "bytes": path.stat().st_size, "llama_cpp": scored, "torch": ours[label]}
            _print_row(name, label, rows[label])
        result["sets"][name] = {"chunks": int(tokens.shape[0]), "n_ctx": n_ctx, "rows": rows}
        _write(cfg, result)  # after each set: a long run stopped later keeps the sets it finished
    return result


def _print_row(name: str, label: str, row: dict[str, Any]) -> None:
    lc, th = row["llama_cpp"], row["torch"]
    print(
        f"{name:8s} {label:28s} llama.cpp same-top {lc['same_top']:.3f} ± {lc['same_top_err']:.3f} "
        f"KLD {lc['mean_kld']:.4f} (p99 {lc['p99_kld']:.3f}) | torch same-top {th['same_top']:.3f} "
        f"[{th['same_top_interval'][0]:.3f}, {th['same_top_interval'][1]:.3f}] KLD {th['mean_kld']:.4f} "
        f"(p99 {th['p99_kld']:.3f})",
        flush=True,
    )


def table(result: dict[str, Any]) -> str:
    """The Markdown table of a result (also what bench/README.md quotes)."""
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


def _write(cfg: DictConfig, result: dict[str, Any]) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llama_cpp_kld.json").write_text(json.dumps(result, indent=1))
    sets = ", ".join(f"{k} ({v['chunks']} chunks of {v['n_ctx']})" for k, v in result["sets"].items())
    md = [
        "# llama.cpp's own score of GGUF files",
        "",
        f"`python bench/llama_cpp_kld.py`: `llama-perplexity --kl-divergence` against the fp32 teacher written as F32, "
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
