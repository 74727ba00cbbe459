"""``eval.llama_cpp_bin``: the run's report scores its GGUF file with llama.cpp's ``llama-perplexity --kl-divergence``.

The default suite runs it against a stand-in ``llama-perplexity`` (a small script that writes the base file's header
and tokens as llama.cpp lays them out and prints llama.cpp's summary), which checks everything around the program:
the refusals before training, the base file and text handed over, the tokens read back and scored in torch on the
same windows, the report's rows and the table in report.md. With ``LLAMA_CPP_BIN`` pointing at llama.cpp's built
tools, the ``slow`` test runs the real program on the same tiny run.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from distill.config import ConfigError
from tests.test_bench import _KLD_OUTPUT
from train import train

RUN = (
    "callbacks=qat",
    "callbacks.qat.scheme=gguf_q4_0",
    "callbacks.qat.skip=['*norm*']",
    "export.formats=[hf,gguf]",
    "trainer.max_steps=4",
    "eval.tasks=[]",
    "eval.fidelity_prompts=0",
    "eval.speed_runs=0",
    "eval.llama_cpp_ctx=16",
)

# Writes what llama-perplexity writes: with --kl-divergence-base alone, the base file (magic, n_ctx, n_vocab,
# n_chunk, the chunks' tokens, then log-probabilities); with --kl-divergence, llama.cpp's printed summary. The tokens
# are the text's bytes folded into the tiny vocabulary, two chunks of -c tokens.
STANDIN = """#!{python}
import sys
import numpy as np
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
with open({log!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
if "--kl-divergence" in args:
    print({summary!r})
    sys.exit(0)
ctx = int(value("-c"))
data = np.frombuffer(open(value("-f"), "rb").read()[: 2 * ctx], dtype=np.uint8).astype(np.int32) % 500 + 3
with open(value("--kl-divergence-base"), "wb") as f:
    f.write(b"_logits_" + np.array([ctx, 512, 2], np.int32).tobytes() + data.tobytes() + bytes(64))
"""


def _standin(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "llama-perplexity"
    exe.write_text(STANDIN.format(python=sys.executable, log=str(folder / "calls.log"), summary=_KLD_OUTPUT))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_the_report_scores_the_gguf_file_with_llama_perplexity(tiny_cfg, tmp_path):
    exe = _standin(tmp_path / "bin")
    _, objects = train(tiny_cfg(*RUN, f"eval.llama_cpp_bin={exe.parent}", output_dir=tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    result = report["llama_cpp"]["sets"]["test"]
    assert (result["chunks"], result["n_ctx"]) == (2, 16)
    row = result["rows"]["student"]
    assert row["file"] == str(objects["gguf"].file)
    assert row["llama_cpp"]["same_top"] == pytest.approx(0.78912) and row["llama_cpp"]["p99_kld"] == 1.511987
    torch_side = row["torch"]  # the fp32 teacher against the file, on the second half of each chunk
    assert torch_side["tokens"] == 2 * (16 - 1 - 16 // 2) and torch_side["chunks"] == 2
    assert 0 <= torch_side["same_top"] <= 1 and torch_side["mean_kld"] >= 0
    calls = (tmp_path / "bin" / "calls.log").read_text().splitlines()
    assert len(calls) == 2 and "--kl-divergence" not in calls[0].split() and calls[1].endswith("--kl-divergence")
    assert str(objects["gguf"].file) in calls[1]  # the run's file, scored against the base the first call wrote
    assert not list((tmp_path / "run").glob(".llama_cpp_*"))  # the base file (the teacher's size) is gone
    assert "## llama.cpp's own score" in (tmp_path / "run" / "report.md").read_text()


def test_a_llama_cpp_score_that_cannot_run_is_refused_before_training(tiny_cfg, tmp_path):
    exe = _standin(tmp_path / "bin")
    with pytest.raises(ConfigError, match=r"eval.llama_cpp_bin=.*holds no llama-perplexity"):
        train(tiny_cfg(*RUN, f"eval.llama_cpp_bin={tmp_path}"))
    with pytest.raises(ConfigError, match=r"eval.llama_cpp_bin=.*add gguf to export.formats"):
        train(tiny_cfg(*RUN, "export.formats=[hf]", f"eval.llama_cpp_bin={exe.parent}"))
    assert not (tmp_path / "bin" / "calls.log").exists()


@pytest.mark.slow  # llama.cpp's own program on the tiny run; needs LLAMA_CPP_BIN (docs/deploy.md)
@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_BIN"), reason="LLAMA_CPP_BIN names no llama.cpp build")
def test_the_real_llama_perplexity_scores_the_run_as_torch_does(tiny_cfg, tmp_path):
    run = ("eval.llama_cpp_ctx=32", f"eval.llama_cpp_bin={os.environ['LLAMA_CPP_BIN']}")
    train(tiny_cfg(*RUN, *run, output_dir=tmp_path / "run"))
    row = json.loads((tmp_path / "run" / "report.json").read_text())["llama_cpp"]["sets"]["test"]["rows"]["student"]
    lc, th = row["llama_cpp"], row["torch"]
    # The same tokens, windows and weights: only llama.cpp's 8-bit activations in its quantized matmuls differ.
    assert abs(lc["same_top"] - th["same_top"]) <= 0.05 and abs(lc["mean_kld"] - th["mean_kld"]) <= 0.05
