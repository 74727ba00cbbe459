"""bench/baselines.py on a tiny random teacher: each baseline writes the recipes' report from its own artifact."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from bench.studies import baselines
from distill.config import ConfigError
from distill.cost import disk_bytes
from distill.export.quantized import load_quantized
from tests.conftest import CONF, ROOT

TINY_EVAL = [
    "eval.tasks=[]",
    "eval.max_batches=2",
    "eval.fidelity_prompts=2",
    "eval.new_tokens=4",
    "eval.speed_runs=1",
]
# distill_prune's student and targets, shrunk to the tiny teacher (2 layers, 4 query heads in 2 KV groups).
TINY_PRUNE = 'recipe_overrides=["student.num_layers=2","callbacks.prune.heads=2"]'


def bench_cfg(tmp_path: Path, cache_dir: Path, *overrides: str) -> DictConfig:
    """``python -m bench.baselines <overrides>`` composed, on the tiny teacher, with every path under tmp."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="bench/baselines",
            overrides=["teacher=tiny_random", *TINY_EVAL, TINY_PRUNE, *overrides],
        )
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.log_dir = cfg.paths.output_dir = str(tmp_path)
        cfg.paths.cache_dir = str(cache_dir)
        cfg.data.cache_dir = str(cache_dir / "data")
        cfg.out = str(tmp_path / "kept")
        cfg.runs_root = str(tmp_path / "runs")
    return cfg


def test_baselines_use_the_recipes_teacher_data_seed_and_evaluation():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        bench = compose(config_name="bench/baselines")
        train = compose(config_name="train", overrides=["experiment=distill_only"])
    assert bench.seed == train.seed  # the held-out split follows it
    for node in ("teacher", "data", "eval"):  # as written, interpolations included
        assert OmegaConf.to_container(bench[node]) == OmegaConf.to_container(train[node]), node
    assert list(bench.baselines) == list(baselines.LABELS)  # all of them by default


def test_each_baseline_writes_a_report_measured_from_its_artifact(tmp_path, cache_dir, capsys):
    labels = ["teacher_fp32", "teacher_bf16", "ptq_int4", "ptq_int8", "prune_noheal", "teacher_gguf"]
    cfg = bench_cfg(tmp_path, cache_dir, f"baselines=[{','.join(labels)}]")
    reports = baselines.run(cfg)
    assert list(reports) == labels  # teacher_fp32 first: the others reuse it

    kept = {}
    for label in labels:
        report = json.loads((tmp_path / "kept" / f"baseline_{label}" / "report.json").read_text())
        assert (tmp_path / "kept" / f"baseline_{label}" / "report.md").is_file()
        assert {"models", "metrics", "comparison", "modifications", "degradation", "run", "notes"} <= set(report)
        assert report["run"]["recipe"] == label and report["run"]["baseline"] is True
        assert report["models"]["compressed"] == label
        kept[label] = report

    # The tiny teacher is not a GGUF: the row says so instead of measuring, with the teacher side kept.
    gguf = kept.pop("teacher_gguf")
    assert gguf["run"]["unavailable"] == "the teacher is not loaded from a GGUF file"
    assert gguf["metrics"]["teacher"]["heldout/ppl"] == pytest.approx(
        kept["teacher_fp32"]["metrics"]["teacher"]["heldout/ppl"]
    )

    s = {label: r["metrics"]["student"] for label, r in kept.items()}
    for label, m in s.items():
        # The same evaluation as a recipe's: the teacher's side is identical in every report.
        assert (
            kept[label]["metrics"]["teacher"]["heldout/ppl"]
            == kept["teacher_fp32"]["metrics"]["teacher"]["heldout/ppl"]
        )
        assert m["cost/bytes_disk"] == disk_bytes(tmp_path / "runs" / f"baseline_{label}" / "artifact"), label
    assert s["teacher_fp32"]["heldout/top1_agreement"] == 1.0
    assert s["ptq_int4"]["tail/rare/tokens"] + s["ptq_int4"]["tail/common/tokens"] > 0  # the long tail, as in train.py
    assert s["teacher_fp32"]["heldout/kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    fp32 = s["teacher_fp32"]
    assert 0.49 < s["teacher_bf16"]["cost/bytes_memory"] / fp32["cost/bytes_memory"] < 0.51  # + fp32 rotary buffers
    assert s["teacher_bf16"]["heldout/top1_agreement"] > 0.9
    # int8 per row is closer to the teacher than int4 in groups, and both are far smaller than fp32.
    assert s["ptq_int8"]["heldout/kl_to_teacher"] < s["ptq_int4"]["heldout/kl_to_teacher"]
    assert s["ptq_int4"]["cost/bytes_disk"] < s["ptq_int8"]["cost/bytes_disk"] < 0.5 * fp32["cost/bytes_disk"]
    ptq = kept["ptq_int4"]
    assert ptq["modifications"] == [
        {
            "kind": "ptq",
            "config": {"scheme": "int4_weight_only", "group_size": 32, "skip": [], "modules": ["linear", "embedding"]},
        }
    ]
    assert ptq["run"]["quantized_bits_per_weight_disk"] == pytest.approx(5.25)  # 4 + (32 + 8) / 32
    pruned = kept["prune_noheal"]["run"]
    assert pruned["steps"] == 0 and pruned["calib_batches"] == 4
    assert pruned["shapes_after"]["heads"] == 2 and pruned["shapes_after"]["channels"] == 64  # 4 → 2, 128 → 64
    assert s["prune_noheal"]["cost/params"] < fp32["cost/params"]
    assert [m["kind"] for m in kept["prune_noheal"]["modifications"]] == ["student", "prune"]

    # Kept reports are not rebuilt unless forced: nothing loads.
    assert baselines.run(cfg) == {}
    assert "ptq_int4: report exists" in capsys.readouterr().out


def test_gguf_row_reuses_the_fp32_report_with_the_file_size(tmp_path):
    teacher = {"heldout/ppl": 10.0, "cost/params": 100.0, "cost/bytes_fp32": 400.0, "cost/bytes_shipped": 80.0}
    student = {
        "heldout/ppl": 10.0,
        "heldout/top1_agreement": 1.0,
        "cost/params": 100.0,
        "cost/bytes_disk": 420.0,
        "cost/bytes_memory": 400.0,
        "cost/bits_per_weight_disk": 32.0,
        "cost/ratio_vs_fp32_teacher": 400 / 420,
    }
    fp32 = {
        "models": {"baseline": "t", "compressed": "teacher_fp32"},
        "metrics": {"teacher": teacher, "student": student},
        "degradation": {"settings": {"max_compression_ratio": 8.0}},
        "config_hash": "abc",
    }
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"\0" * 80)
    report = baselines.reuse_for_file(fp32, gguf, tmp_path / "run", "teacher_gguf")
    m = report["metrics"]["student"]
    assert m["cost/bytes_disk"] == 80 and m["cost/bits_per_weight_disk"] == pytest.approx(6.4)
    assert m["cost/ratio_vs_fp32_teacher"] == 5.0 and m["cost/ratio_vs_shipped_teacher"] == 1.0
    assert m["heldout/top1_agreement"] == 1.0 and m["cost/bytes_memory"] == 400.0  # the dequantized model's
    assert report["run"]["reused_from"] == "teacher_fp32" and "dequantizes model.gguf" in report["notes"][0]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["run"]["gguf_bytes"] == 80


def test_gguf_ptq_rows_measure_the_file_as_it_reloads(tmp_path, cache_dir):
    cfg = bench_cfg(tmp_path, cache_dir, "baselines=[ptq_gguf_q8_0,ptq_gguf_q4_0]")
    reports = baselines.run(cfg)
    s = {label: r["metrics"]["student"] for label, r in reports.items()}
    for label, kind in (("ptq_gguf_q8_0", "q8_0"), ("ptq_gguf_q4_0", "q4_0")):
        file = tmp_path / "runs" / f"baseline_{label}" / "artifact" / f"student-{kind}.gguf"
        assert s[label]["cost/bytes_disk"] == file.stat().st_size  # the file is the whole artifact
        assert reports[label]["run"]["gguf_type"] == kind
    # Q8_0 keeps more of the teacher than Q4_0, in a larger file.
    assert s["ptq_gguf_q8_0"]["heldout/kl_to_teacher"] < s["ptq_gguf_q4_0"]["heldout/kl_to_teacher"]
    assert s["ptq_gguf_q8_0"]["cost/bytes_disk"] > s["ptq_gguf_q4_0"]["cost/bytes_disk"]
    assert s["ptq_gguf_q4_0"]["heldout/kl_to_teacher"] > 0


def test_imatrix_rows_round_by_the_teachers_importance_at_the_same_bytes(tmp_path, cache_dir):
    import numpy as np
    from gguf.quants import dequantize

    labels = ["ptq_gguf_q4_0", "ptq_imatrix_q4_0", "ptq_imatrix_iq4_nl"]
    reports = baselines.run(bench_cfg(tmp_path, cache_dir, f"baselines=[{','.join(labels)}]", "imatrix_batches=2"))
    files = {
        label: tmp_path / "runs" / f"baseline_{label}" / "artifact" / f"student-{kind}.gguf"
        for label, kind in zip(labels, ("q4_0", "q4_0", "iq4_nl"), strict=True)
    }
    sizes = {label: f.stat().st_size for label, f in files.items()}
    assert len(set(sizes.values())) == 1  # Q4_0 and IQ4_NL both store 18 bytes per 32 weights
    assert reports["ptq_imatrix_q4_0"]["run"]["imatrix"] is True
    assert reports["ptq_gguf_q4_0"]["run"]["imatrix"] is False
    assert "llama-quantize --imatrix" in reports["ptq_imatrix_q4_0"]["notes"][0]

    def tensors(file: Path) -> dict[str, np.ndarray]:
        return {t.name: dequantize(t.data, t.tensor_type).reshape(-1) for t in gguf.GGUFReader(file).tensors}

    plain, weighted = tensors(files["ptq_gguf_q4_0"]), tensors(files["ptq_imatrix_q4_0"])
    names = [n for n in plain if n.startswith("blk.") and n.endswith("ffn_up.weight")]
    assert names and all(not np.array_equal(plain[n], weighted[n]) for n in names)  # the weighting moved codes
    for label in labels:
        assert reports[label]["metrics"]["student"]["cost/bytes_disk"] == sizes[label]
        assert reports[label]["metrics"]["student"]["heldout/kl_to_teacher"] > 0


def test_a_mixed_gguf_ptq_row_writes_each_tensor_in_its_recipes_type(tmp_path, cache_dir, monkeypatch):
    # The real mix names SmolLM2's layers; the tiny teacher gets a mix of the same shape under the same name.
    conf = tmp_path / "qat"
    conf.mkdir()
    real = OmegaConf.load(baselines.QAT_CONF / "gguf_q4_mix.yaml")
    real.target_ratio = real.budget_probe = None  # a hand-made map instead of the recipe's byte budget
    real.gguf_types = {"*.mlp.down_proj": "q8_0", "*.layers.1.mlp.down_proj": "q4_1"}
    OmegaConf.save(real, conf / "gguf_q4_mix.yaml")
    monkeypatch.setattr(baselines, "QAT_CONF", conf)
    report = baselines.run(bench_cfg(tmp_path, cache_dir, "baselines=[ptq_gguf_q4_mix]"))["ptq_gguf_q4_mix"]
    file = tmp_path / "runs" / "baseline_ptq_gguf_q4_mix" / "artifact" / "student-q4_0.gguf"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(file).tensors}
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q8_0", "Q4_1")
    assert types["blk.1.ffn_up.weight"] == types["token_embd.weight"] == "Q4_0"
    assert report["run"]["gguf_types"] == {"q4_0": sum(t == "Q4_0" for t in types.values()), "q4_1": 1, "q8_0": 1}
    assert "gguf_q4_mix.yaml's mix of types" in report["notes"][0]
    assert report["metrics"]["student"]["cost/bytes_disk"] == file.stat().st_size


def test_unknown_baseline_is_refused_before_loading(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"baselines=\['ptq_int1'\]: choose from teacher_fp32"):
        baselines.run(bench_cfg(tmp_path, cache_dir, "baselines=[ptq_int1]"))


def test_bitsandbytes_failure_is_recorded_with_its_reason(tmp_path, cache_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device\nsecond line")

    monkeypatch.setattr(baselines, "bnb", broken)
    baselines.run(bench_cfg(tmp_path, cache_dir, "baselines=[bnb_nf4]"))
    report = json.loads((tmp_path / "kept" / "baseline_bnb_nf4" / "report.json").read_text())
    reason = report["run"]["unavailable"]
    assert reason == "does not run on this machine (cpu): RuntimeError: no kernel for this device"
    assert "bitsandbytes_version" in report["run"] and report["notes"] == [reason]
    assert report["metrics"]["student"] == {} and report["metrics"]["teacher"]["heldout/ppl"] > 1


def test_bitsandbytes_int8_and_nf4_run_and_are_measured(tmp_path, cache_dir):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install -e '.[bnb]')")
    cfg = bench_cfg(tmp_path, cache_dir, "baselines=[bnb_int8,bnb_nf4]")
    reports = baselines.run(cfg)
    for label in ("bnb_int8", "bnb_nf4"):
        run, m = reports[label]["run"], reports[label]["metrics"]["student"]
        assert "unavailable" not in run, run.get("unavailable")
        assert run["bitsandbytes_version"] == bnb.__version__
        # The scales live outside parameters and buffers: the report adds them to what distill.cost counts.
        assert m["cost/bytes_memory"] > run["uncorrected"]["cost/bytes_memory"]
        assert m["cost/params"] == reports[label]["metrics"]["teacher"]["cost/params"]  # every weight, once
        assert m["heldout/top1_agreement"] > 0.5
    # nf4 holds two weights per uint8 element, which a plain count would take for one.
    assert (
        reports["bnb_nf4"]["run"]["uncorrected"]["cost/params"]
        < reports["bnb_nf4"]["metrics"]["student"]["cost/params"]
    )
    # nf4 (4-bit) stores less than int8.
    int8, nf4 = (reports[x]["metrics"]["student"]["cost/bytes_disk"] for x in ("bnb_int8", "bnb_nf4"))
    assert nf4 < int8


def test_ptq_curve_sizes_fall_and_error_grows_with_fewer_bits(tmp_path, cache_dir):
    cfg = bench_cfg(tmp_path, cache_dir)
    bench = baselines.prepare(cfg)
    rows = baselines.ptq_curve(bench, ["bf16", "int8", "int4", "int2"], work_dir=tmp_path / "curve")
    assert [r["width"] for r in rows] == ["fp32", "bf16", "int8", "int4", "int2"]
    by = {r["width"]: r for r in rows}
    assert by["fp32"]["top1_agreement"] == 1.0 and by["fp32"]["ratio_vs_fp32_disk"] == 1.0
    bits = [r["bits_per_weight_disk"] for r in rows]
    assert bits == sorted(bits, reverse=True) and bits[0] == pytest.approx(32, rel=0.01)
    assert by["int4"]["quantized_bits_per_weight_disk"] == pytest.approx(5.25)
    assert by["int2"]["quantized_bits_per_weight_disk"] == pytest.approx(3.25)
    assert by["int8"]["kl_to_teacher"] < by["int4"]["kl_to_teacher"] < by["int2"]["kl_to_teacher"]
    assert by["int2"]["memory_bytes"] < by["bf16"]["memory_bytes"] < by["fp32"]["memory_bytes"]
    with pytest.raises(ConfigError, match="widths"):
        baselines.ptq_curve(bench, ["int1"])


def test_the_depth_reduced_imatrix_row_keeps_the_measured_layers_within_its_byte_budget(
    tmp_path, cache_dir, monkeypatch
):
    # SmolLM2's (26 of 30 layers, 1/8) shrunk to the tiny teacher's 2 layers: keep 1, at 1/5 of its fp32 bytes.
    # 1/5 of the teacher binds (the cheapest map is smaller, the all-Q8_0 one larger) and is more than 1/5 of the
    # one-layer copy's own fp32 bytes: a budget taken from the copy would give a smaller file.
    monkeypatch.setitem(baselines.PTQ_IMATRIX_DEPTH, "ptq_imatrix_depth_eighth", (1, 5.0))
    cfg = bench_cfg(tmp_path, cache_dir, "baselines=[ptq_imatrix_depth_eighth]", "imatrix_batches=2")
    report = baselines.run(cfg)["ptq_imatrix_depth_eighth"]
    run, student, teacher = report["run"], report["metrics"]["student"], report["metrics"]["teacher"]
    file = tmp_path / "runs" / "baseline_ptq_imatrix_depth_eighth" / "artifact" / "student-q4_0.gguf"
    reader = gguf.GGUFReader(file)
    blocks = {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")}
    (selection,) = [m for m in report["modifications"] if m["kind"] == "layer_selection"]
    assert selection["kind"] == "layer_selection" and selection["config"]["select"] == "block_influence"
    scores = selection["config"]["scores"]
    assert run["kept_layers"] == [max(range(len(scores)), key=lambda i: (scores[i], -i))] and blocks == {"0"}
    assert run["imatrix"] is True and "llama-quantize --imatrix" in report["notes"][0]
    assert run["budget_bytes"] == int(teacher["cost/bytes_fp32"] / 5)
    assert student["cost/bytes_disk"] == file.stat().st_size <= run["budget_bytes"]
    copy_fp32 = teacher["cost/bytes_fp32"] - 4 * sum(
        t.n_elements for t in reader.tensors if t.name.startswith("blk.0.")
    )  # the teacher less one layer (both layers have the same shapes)
    assert student["cost/bytes_disk"] > copy_fp32 / 5
    assert len(run["gguf_types"]) > 1  # the budget mixed the types
    assert student["heldout/kl_to_teacher"] > 0


@pytest.mark.slow  # a baseline run (about 30 s); its parts are the default suite's: tests/compress/quant
def test_the_mixed_torchao_row_keeps_the_measured_layers_and_stores_the_table_on_its_own_grid(
    tmp_path, cache_dir, monkeypatch
):
    # qad_int3_emb4's control (24 of 30 layers, int3 g192, table int4 g96) shrunk to the tiny teacher: 1 of its 2
    # layers, groups of 32 (its widths take no 96 or 192).
    grids = (("int3_weight_only", 32), ("int4_weight_only", 32))
    monkeypatch.setitem(baselines.PTQ_DEPTH, "ptq_int3_emb4_24layers", (1, *grids))
    cfg = bench_cfg(tmp_path, cache_dir, "baselines=[ptq_int3_emb4_24layers]")
    report = baselines.run(cfg)["ptq_int3_emb4_24layers"]
    run, student = report["run"], report["metrics"]["student"]
    assert [m["kind"] for m in report["modifications"]] == ["layer_selection", "ptq"]
    assert len(run["kept_layers"]) == 1 and run["scheme"] == "int3_weight_only"
    assert run["module_schemes"] == [
        ["model.embed_tokens", "int4_weight_only", 32],
        ["lm_head", "int4_weight_only", 32],
    ]
    artifact = tmp_path / "runs" / "baseline_ptq_int3_emb4_24layers" / "artifact"
    reloaded = load_quantized(artifact)
    assert reloaded.config.num_hidden_layers == 1
    # the tiny teacher's head is its own matrix: both take the table's grid
    assert reloaded.lm_head.weight.target_dtype == reloaded.model.embed_tokens.weight.target_dtype == torch.int4
    assert reloaded.model.layers[0].mlp.down_proj.weight.target_dtype == torch.int3
    assert student["heldout/kl_to_teacher"] > 0
