"""The bench scripts: each is a Hydra entry point with a root config in conf/bench, and starts."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from distill.config import ConfigError
from tests.conftest import CONF, ROOT

SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_"))


def bench_cfg(name: str, overrides: list[str]) -> DictConfig:
    """``conf/bench/<name>.yaml`` composed as ``python bench/<name>.py <overrides>`` would compose it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=f"bench/{name}", overrides=overrides, return_hydra_config=True)


def test_bench_scripts_are_the_expected_ones():
    assert SCRIPTS == [
        "baselines",
        "chunked_loss",
        "cliff",
        "deploy_speed",
        "fsdp_memory",
        "generation",
        "gguf_probe",
        "grid_budget",
        "headline",
        "kd_vs_ce",
        "llama_cpp_fixtures",
        "llama_cpp_kld",
        "make_heldout_sets",
        "paired_runs",
        "prune_heal",
        "qad_init",
        "qat_vs_ptq",
        "share_lowrank",
        "sparsity",
        "step_time",
        "table_bits",
        "teacher_cache",
    ]


# Data preparation, not measurement: they read downloaded packages (llama.cpp's sources, text corpora) given on
# the command line, so they take argparse arguments rather than a Hydra config.
PREPARATION = {"llama_cpp_fixtures", "make_heldout_sets"}


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s not in PREPARATION])
def test_bench_script_imports_and_composes_its_root_config(name):
    module = importlib.import_module(f"bench.{name}")  # every import resolves against the package layout
    assert "argparse" not in (ROOT / "bench" / f"{name}.py").read_text()
    assert "sys.path" not in (ROOT / "bench" / f"{name}.py").read_text()  # run as a module: python -m bench.<name>
    assert f'config_name="bench/{name}"' in (ROOT / "bench" / f"{name}.py").read_text()
    assert callable(module.run)
    cfg = bench_cfg(name, [])
    # Hydra's record goes under logs/bench/<name>/runs, and the job stays in the launch directory.
    assert cfg.hydra.run.dir.endswith(f"/logs/bench/{name}/runs/{cfg.run_name}")
    assert cfg.hydra.job.chdir is False
    assert f"python -m bench.{name}" in (CONF / "bench" / f"{name}.yaml").read_text()


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("prune_heal", [], r"^base=None: required: python -m bench.prune_heal base="),
        ("deploy_speed", ["students=[/no/such.gguf]"], r"^students='/no/such.gguf': not a GGUF file"),
        ("llama_cpp_kld", ["llama_cpp_bin=null"], r"^llama_cpp_bin=None: give the folder of llama.cpp's built tools"),
        ("llama_cpp_kld", ["llama_cpp_bin=/no/such"], r"^llama_cpp_bin='/no/such': holds no llama-perplexity; build"),
        ("prune_heal", ["base=/no/such/run"], r"^base='/no/such/run': no config.json there"),
        ("share_lowrank", ["configs=[student,nope]"], r"^configs=\['nope'\]: choose from student, share_k2,"),
        ("qat_vs_ptq", ["scheme=int3"], r"^scheme='int3': unknown quantization scheme; choose one of"),
        ("qat_vs_ptq", ["scheme=int8_weight_only", "group_size=32"], r"^group_size=32: int8_weight_only"),
        (
            "paired_runs",
            ["~comparisons", "+comparisons={x: {what: x, reference: /no/such, variant: /no/such}}"],
            r"^comparisons.x.reference='/no/such': no report.json there",
        ),
    ],
)
def test_bad_bench_settings_fail_before_any_model_loads(name, overrides, message, tmp_path):
    run = importlib.import_module(f"bench.{name}").run
    with pytest.raises(ConfigError, match=message):
        run(bench_cfg(name, [*overrides, f"out={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()


def _bench(args: list[str], root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.chunked_loss", *args],
        cwd=root,  # outside the repository: the package is found through PYTHONPATH, as a user's job would
        env={**os.environ, "DISTILL_ROOT": str(root), "PYTHONPATH": str(ROOT)},
        text=True,
        capture_output=True,
        timeout=600,
    )


@pytest.mark.slow  # three Python processes (about 35 s); the configs of every script are composed in the default suite
def test_chunked_loss_measures_both_variants_in_subprocesses(tmp_path):
    proc = _bench(["vocab=4096", "hidden=64", "tokens=256", "chunk=64"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["naive", "chunked"]
    assert "V=4096 d=64 B·T=256 chunk=64 loss=forward_kl" in lines
    diff = float(re.search(r"loss relative difference = (\S+)", proc.stdout).group(1))
    assert diff < 1e-5  # the same loss, computed two ways
    assert float(re.search(r"ratio peak_memory chunked/naive = (\S+)", proc.stdout).group(1)) > 0
    # One Hydra record per call, each variant's inside it (the override that picked it included).
    (record,) = (tmp_path / "logs" / "bench" / "chunked_loss" / "runs").iterdir()
    for variant in ("naive", "chunked"):
        assert f"- variant={variant}" in (record / variant / ".hydra" / "overrides.yaml").read_text()

    proc = _bench(["loss=kl"], tmp_path)  # refused before any subprocess starts
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: loss='kl': unknown loss; choose one of forward_kl, reverse_kl, jsd, skew_kl, skew_rkl, tvd"
    )


def _side_report(folder: Path, agree: list[float], teacher_nll: list[float], acc: float) -> None:
    """A report.json with the per-sequence held-out sums bench/kd_vs_ce.py pairs (10 tokens per sequence)."""
    n = len(agree)
    rows = {
        "teacher": {"nll": teacher_nll, "kl": [0.0] * n, "agree": [10.0] * n, "tokens": [10.0] * n},
        "student": {
            "nll": [20.0 - a for a in agree],
            "kl": [10.0 - a for a in agree],
            "agree": agree,
            "tokens": [10.0] * n,
        },
    }
    student = {"task/distill_cloze/acc": acc, "task/distill_cloze/acc_ci_low": acc - 0.04}
    student["task/distill_cloze/acc_ci_high"] = acc + 0.04
    report = {"metrics": {"teacher": {}, "student": student}, "heldout_rows": {"test": rows}, "run": {"steps": 40}}
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))


def test_kd_vs_ce_pairs_the_held_out_sequences_and_names_a_winner_only_when_the_interval_excludes_zero(tmp_path):
    run = importlib.import_module("bench.kd_vs_ce").run
    rng = np.random.default_rng(0)
    teacher_nll = rng.uniform(20, 40, 64).tolist()
    ce = rng.integers(3, 8, 64).astype(float)
    _side_report(tmp_path / "qad_int4_kd", (ce + 1).tolist(), teacher_nll, 0.60)  # KD agrees on 1 more in 10
    _side_report(tmp_path / "qad_int4_ce", ce.tolist(), teacher_nll, 0.59)
    args = [f"reports={tmp_path}", f"results_dir={tmp_path}", "only=[qad_int4]"]
    (result,) = run(bench_cfg("kd_vs_ce", args))
    top1 = result["heldout"]["top1_agreement"]
    assert top1["difference"] == pytest.approx(0.1) and top1["ci"] == pytest.approx([0.1, 0.1])  # paired: no noise
    assert top1["winner"] == "kd" and result["heldout"]["kl_to_teacher"]["winner"] == "kd"
    assert result["heldout"]["ppl"]["winner"] == "kd"  # nll fell with agreement in this made-up pair
    assert result["tasks"]["task/distill_cloze/acc"]["winner"] == "neither"  # the intervals overlap
    text = (tmp_path / "kd_vs_ce.md").read_text()
    assert "| held-out top1_agreement | 0.6" in text and "+0.1 [0.1, 0.1] | kd |" in text
    assert json.loads((tmp_path / "kd_vs_ce.json").read_text())[0]["pair"] == "qad_int4"

    # Sides scored on different held-out data cannot be paired.
    shutil.rmtree(tmp_path / "qad_int4_ce")
    _side_report(tmp_path / "qad_int4_ce", ce.tolist(), (np.array(teacher_nll) + 1).tolist(), 0.59)
    with pytest.raises(ConfigError, match="different held-out data"):
        run(bench_cfg("kd_vs_ce", args))
    with pytest.raises(ConfigError, match=r"^only=\['nope'\]: choose among \['qad_int4', 'pruned'\]"):
        run(bench_cfg("kd_vs_ce", [*args[:2], "only=[nope]"]))
    with pytest.raises(ConfigError, match=r"^pairs='pruned': no report at .*pruned_kd/report.json"):
        run(bench_cfg("kd_vs_ce", [*args[:2], "only=[pruned]"]))


def test_cliff_keeps_ptq_rows_off_the_curve_and_labels_longer_runs_by_folder(tmp_path):
    """Only the curve's own widths are folded into its rows; GGUF and g192 PTQ rows and longer runs stay."""
    from bench.cliff import run as cliff_run

    old = ROOT / "tests" / "fixtures" / "old_eval"  # a curve, its reports and two longer runs, kept as a fixture
    fixture = [
        f"curve_file={old / 'cliff.json'}",
        f"reports={old / 'headline_runs'}",
        f"longer_runs=['{old / 'longer_runs' / 'qad_q4_mix_1h_fast'}','{old / 'longer_runs' / 'qad_int3_1h'}']",
    ]
    cfg = bench_cfg("cliff", ["measure=false", f"results_dir={tmp_path}", *fixture])
    md = cliff_run(cfg)
    labels = [line.split(" | ")[0].removeprefix("| ") for line in md.splitlines()[2:]]
    assert "baseline: ptq_gguf_q4_mix" in labels and "baseline: ptq_int3_g192" in labels
    assert "baseline: ptq_int4" not in labels and "PTQ int4" in labels  # the curve's int4 is one row
    assert {"recipe: qad_q4_mix_1h_fast", "recipe: qad_int3_1h"} <= set(labels)
    assert (tmp_path / "cliff.png").stat().st_size > 10_000
    with pytest.raises(ConfigError, match=r"longer_runs=\['.*nowhere'\]: each folder needs the report.json"):
        cliff_run(
            bench_cfg(
                "cliff",
                ["measure=false", f"results_dir={tmp_path}", *fixture[:2], f"longer_runs=['{tmp_path}/nowhere']"],
            )
        )


# The end of a real `llama-perplexity --kl-divergence` run (llama.cpp b0.3.36's format), trimmed.
_KLD_OUTPUT = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  38.209460 ±   0.735215
Mean PPL(base)                :  31.902771 ±   0.607158
Cor(ln(PPL(Q)), ln(PPL(base))):  96.41%

====== KL divergence statistics ======
Mean    KLD:   0.187421 ±   0.002178
Maximum KLD:  11.103422
99.9%   KLD:   4.010221
99.0%   KLD:   1.511987
Median  KLD:   0.098650

====== Token probability statistics ======
RMS Δp    : 11.472 ± 0.127 %
Same top p: 78.912 ±  0.264 %
"""


def test_llama_cpp_kld_reads_llama_perplexity_and_its_base_file(tmp_path):
    from distill.eval.llama_cpp import parse_kld, read_base_tokens

    got = parse_kld(_KLD_OUTPUT)
    assert got == {
        "ppl_q": 38.20946,
        "ppl_base": 31.902771,
        "mean_kld": 0.187421,
        "mean_kld_err": 0.002178,
        "p99_kld": 1.511987,
        "same_top": pytest.approx(0.78912),
        "same_top_err": pytest.approx(0.00264),
    }
    with pytest.raises(ValueError, match="printed no 'same_top' line"):
        parse_kld(_KLD_OUTPUT.split("Same top")[0])
    # The header llama-perplexity writes before the log-probabilities: magic, n_ctx, n_vocab, n_chunk, tokens.
    tokens = np.arange(2 * 8, dtype=np.int32).reshape(2, 8)
    path = tmp_path / "base.kld"
    path.write_bytes(b"_logits_" + np.array([8, 100, 2], np.int32).tobytes() + tokens.tobytes() + b"\x00" * 64)
    n_ctx, n_vocab, read = read_base_tokens(path)
    assert (n_ctx, n_vocab) == (8, 100) and np.array_equal(read, tokens)
    path.write_bytes(b"_other__" + b"\x00" * 12)
    with pytest.raises(ValueError, match="not a llama-perplexity log-probability file"):
        read_base_tokens(path)


def _paired_report(folder: Path, agree: list[float], kl: list[float], steps: int) -> str:
    tokens = [100.0] * len(agree)
    rows = {"doc": [f"d{i}" for i in range(len(agree))], "agree": agree, "kl": kl, "tokens": tokens}
    metrics = {}
    for prefix in ("heldout", "heldout_english"):
        metrics[f"{prefix}/top1_agreement"] = sum(agree) / sum(tokens)
        metrics[f"{prefix}/kl_to_teacher"] = sum(kl) / sum(tokens)
    report = {
        "run": {"steps": steps},
        "metrics": {"student": metrics},
        "heldout_rows": {held: {"student": rows} for held in ("test", "english")},
    }
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    return str(folder)


def test_paired_runs_gives_the_variant_minus_the_reference_over_the_same_documents(tmp_path):
    from bench.paired_runs import run

    docs = 40
    reference = _paired_report(tmp_path / "ref", [80.0 + i % 7 for i in range(docs)], [10.0] * docs, 73)
    variant = _paired_report(
        tmp_path / "var", [82.0 + i % 7 for i in range(docs)], [9.0 + i % 3 for i in range(docs)], 73
    )
    pair = f"{{what: mine, reference: {reference}, variant: {variant}}}"
    result = run(
        bench_cfg("paired_runs", ["~comparisons", f"+comparisons={{mine: {pair}}}", f"out={tmp_path / 'out'}"])
    )
    top1 = result["mine"]["test/top1"]
    assert top1["difference"][0] == pytest.approx(0.02) and top1["difference"][1] > 0  # +2 of 100 on every document
    assert top1["documents"] == docs
    kl = result["mine"]["english/kl"]["difference"]
    assert kl[1] < kl[0] < kl[2] and kl[0] == pytest.approx(sum(9.0 + i % 3 - 10.0 for i in range(docs)) / (100 * docs))
    assert (
        "| mine (`ref`) | 73 | test (40 docs) | 0.829 → 0.849 | +0.020 [+0.020, +0.020]"
        in (tmp_path / "out" / "paired_runs.md").read_text()
    )
    unequal = _paired_report(tmp_path / "short", [80.0] * docs, [10.0] * docs, 40)
    pair = f"{{what: mine, reference: {unequal}, variant: {variant}}}"
    with pytest.raises(ConfigError, match=r"^comparisons.mine='mine': its runs trained 40 and 73 steps"):
        run(bench_cfg("paired_runs", ["~comparisons", f"+comparisons={{mine: {pair}}}", f"out={tmp_path / 'out2'}"]))
    assert not (tmp_path / "out2").exists()


def test_table_bits_rounds_only_the_part_each_variant_names_at_the_bits_it_reports():
    import torch

    from bench.table_bits import VARIANTS, stored_bits, variant_spec
    from distill.compress.quant import schemes
    from tests.helpers import tiny_llama

    for label, (layers, table) in VARIANTS.items():
        model = tiny_llama(vocab_size=128, hidden_size=192, intermediate_size=384, head_dim=48).eval()
        schemes.ptq(model, variant_spec(layers, table))
        head, down = model.lm_head.weight, model.model.layers[0].mlp.down_proj.weight
        assert schemes.is_quantized(head) == (table is not None), label
        assert schemes.is_quantized(down) == (layers is not None), label
        assert model.model.embed_tokens.weight is head  # still one tied tensor
        if table is not None:
            bits = {"int3_weight_only": 3, "int4_weight_only": 4, "int5_weight_only": 5}[table[0]]
            assert head.target_dtype == getattr(torch, f"int{bits}")
            # codes at their width, plus an fp32 scale and an int8 zero point per group
            assert stored_bits(head) == pytest.approx(bits + 40 / table[1]), label


def test_grid_budget_rows_name_each_maps_grids_and_the_export_bytes_they_cost(tmp_path):
    from bench.grid_budget import exported_bytes, grids_of, markdown
    from distill.compress.quant import schemes
    from distill.cost import disk_bytes
    from distill.export.quantized import save_quantized
    from tests.helpers import tiny_llama

    model = tiny_llama(vocab_size=128).eval()
    table = {"model.embed_tokens": {"scheme": "int4_weight_only", "group_size": 32}, "lm_head": "int4_weight_only"}
    spec = schemes.make_spec("int3_weight_only", 64, ["*norm*"], "", ["linear", "embedding"], None, table)
    names = schemes.targets(model, spec.skip, spec.modules)
    assert grids_of(spec, names) == "14 int3_weight_only/g64, 2 int4_weight_only/g32"  # 7 matrices a layer, 2 layers
    schemes.ptq(model, spec)
    assert exported_bytes(model, None, spec) == disk_bytes(save_quantized(model, None, tmp_path / "q", spec))
    score = {"top1_agreement": 0.5, "top1_agreement_ci_low": 0.4, "top1_agreement_ci_high": 0.6, "kl_to_teacher": 1.0}
    row = {"layers": 2, "map": "hand", "bytes": 1234, "table": "2 int4_weight_only/g32", "grids": "x", "documents": 3}
    text = markdown({"batches": 1, "rows": {"2layers_hand": {**row, **score, "tokens": 10}}})
    assert "| 2 | `hand` | 1,234 | 2 int4_weight_only/g32 | x | 0.500 [0.400, 0.600] | 1.000 |" in text


def test_gguf_probe_rows_give_each_maps_table_types_and_score():
    from bench.gguf_probe import markdown

    score = {"top1_agreement": 0.7, "top1_agreement_ci_low": 0.6, "top1_agreement_ci_high": 0.8, "kl_to_teacher": 0.2}
    row = {
        "type_set": "all",
        "map": "kl_probe",
        "rounding": "rtn",
        "file_bytes": 76_000_000,
        "budget": 76_865_718,
        "table": "q5_0",
    }
    rows = {"kl_probe_rtn": {**row, **score, "types": "3 Q4_1", "documents": 3, "tokens": 10}}
    text = markdown({"qat_config": "gguf_q4_mix", "batches": 1, "rows": rows})
    assert "budget (76,865,718 bytes)" in text
    assert "| all | `kl_probe` | rtn | 76,000,000 | Q5_0 | 3 Q4_1 | 0.700 [0.600, 0.800] | 0.200 |" in text
