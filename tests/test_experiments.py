"""The conf/experiment recipes: each composes and runs a few steps on tiny models with all its callbacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict
from transformers import LlamaConfig, LlamaForCausalLM

from distill.compress.stages import stage_names
from distill.config import build
from distill.recipe.strategies import check_trainer_config
from slurm.submit import compose_config, job_settings, render
from tests.conftest import CONF, compose_cfg
from tests.helpers import TINY_MODELS, run_train_cli, stages
from train import train

RECIPES = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem != "smoke")
CPU_RECIPES = [r for r in RECIPES if r != "llama3_8b_to_1b_slurm"]
TINY_STEPS = 10

# The recipes run on TINY_MODELS, shrunk to TINY_STEPS with every evaluation kept small.
TINY_RUN = [
    *TINY_MODELS,
    f"trainer.max_steps={TINY_STEPS}",
    "trainer.val_check_interval=5",
    "trainer.limit_val_batches=2",
    "callbacks.model_checkpoint.every_n_train_steps=5",
    "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false",
    "distill.optimizer.lr=0.01",
    "distill.scheduler.num_warmup_steps=0",
    "eval.max_batches=2",
    "eval.task_examples=10",
    "eval.fidelity_prompts=2",
    "eval.new_tokens=4",
    "eval.speed_runs=1",
    "eval.tasks=[]",  # each task run indexes lm-eval's whole task tree (seconds); tests/eval and the sweep run tasks
]
STEP_KEYS = ("start_step", "end_step", "every_n_steps")


def recipe_cfg(recipe: str, out: Path, cache_dir: Path, *extra: str) -> DictConfig:
    """The recipe composed on tiny models, with its callbacks' steps scaled to a 10-step run."""
    cfg = compose_cfg([f"experiment={recipe}", *TINY_RUN, *extra], out, cache_dir)
    full = compose_cfg([f"experiment={recipe}"], out, cache_dir).trainer.max_steps
    with open_dict(cfg):
        for node in cfg.callbacks.values():
            if node is None or not str(node.get("_target_", "")).startswith("callbacks."):
                continue
            if node.get("heads") is not None:
                node.heads = 3  # the recipes remove one query head per KV group; so does this
            if node._target_ == "callbacks.qat.QuantizationAwareTraining" and node.get("group_size") is not None:
                node.group_size = 32  # the QAD recipes' 192 fits SmolLM2's widths, not the tiny student's
                for entry in (node.get("module_schemes") or {}).values():
                    entry.group_size = 32
            # down rows 256 wide, so the budget may give them K-quants too
            if node.get("target_ratio") or node.get("target_bytes"):
                cfg.student.intermediate_size = 256
            for key in STEP_KEYS:
                if node.get(key) is not None:
                    scaled = int(node[key] * TINY_STEPS / full)
                    node[key] = max(scaled, 1) if key == "every_n_steps" else scaled
            if node.get("importance") == "wanda":  # Wanda scores the batches before its first cut
                node.start_step = max(node.start_step, node.calib_batches)
                node.end_step = max(node.end_step, node.start_step)
    return cfg


def test_every_recipe_is_tested():
    assert set(RECIPES) == {
        "ce_only",
        "distill_only",
        "distill_prune",
        "distill_share",
        "distill_prune_qat4",
        "stacked_max",
        "qad_int4",
        "qad_int4_ce",
        "qad_int3",
        "qad_int3_emb4",
        "qad_q4_0",
        "qad_q4_mix",
        "distill_sparse",
        "llama3_8b_to_1b_slurm",
    }


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_header_gives_the_command(recipe):
    text = (CONF / "experiment" / f"{recipe}.yaml").read_text()
    assert f"experiment={recipe}" in text.split("defaults:")[0]
    assert f"recipe: {recipe}\n" in text


# The CE control and the int3 and Q4_0 variants share qad_int4's code path: run with -m slow (about 40 s each,
# loaded). tests/export/test_gguf.py trains on the Q4_0 grid and exports the file in the default suite, and
# qad_q4_mix runs here by default: it trains on a mix with K-quants and exports and measures that file.
_SLOW_RECIPES = {"qad_int4_ce", "qad_int3", "qad_q4_0", "distill_sparse"}  # sparsity: tests/compress


@pytest.mark.parametrize(
    "recipe", [pytest.param(r, marks=pytest.mark.slow) if r in _SLOW_RECIPES else r for r in CPU_RECIPES]
)
def test_recipe_runs_on_tiny_models_with_all_its_callbacks(recipe, tmp_path, cache_dir):
    cfg = recipe_cfg(recipe, tmp_path, cache_dir)
    expected = [k for k in stage_names() if cfg.callbacks.get(k)]
    _, objects = train(cfg)
    assert objects["trainer"].global_step == TINY_STEPS
    kinds = [c["kind"] for c in objects["module"].structure]
    assert stages(kinds) == expected  # every compression callback acted, in the checked order
    report = json.loads((tmp_path / "report.json").read_text())
    applied = [m["kind"] for m in report["modifications"] if not m["kind"].startswith("callback:")]
    assert applied == ["distillation", *kinds]  # the one report covers every modification, in order
    assert report["run"]["recipe"] == recipe
    assert report["run"]["steps"] == TINY_STEPS and report["run"]["train_seconds"] > 0
    student = report["metrics"]["student"]
    assert student["cost/compression_ratio"] > 0
    # Compression shrank the student below the fp32 model the recipe started from; weight sparsity alone keeps
    # the dense shapes (zeros stored densely, docs/sparsity.md), so it shrinks nothing on its own.
    if set(expected) - {"sparsity"}:
        start = build(cfg.student, teacher=objects["teacher"])
        fp32_bytes = 4 * sum(p.numel() for p in start.parameters())
        if "gguf" in cfg.export.formats:  # in torch it holds the grid's values in fp32; the file is what shrank
            assert student["cost/bytes_disk"] < 0.5 * fp32_bytes
        else:
            assert student["cost/bytes_memory"] < fp32_bytes
    assert (Path(objects["export_dir"]) / "config.json").exists()
    if "gguf" in cfg.export.formats:  # the recipe ships as a llama.cpp file, and the report measured that file
        assert report["run"]["gguf_max_abs_logit_vs_student"] <= 1e-4
        assert report["run"]["artifact"] == str(tmp_path / "student_gguf")
    elif "qat" in expected and "lowrank" not in expected:  # QAT's compact form cannot hold factorised layers
        assert (tmp_path / "student_quantized").is_dir()
        per_module = cfg.callbacks.qat.get("module_schemes") or {}
        meta = json.loads((tmp_path / "student_quantized" / "quantization.json").read_text())
        assert [g for g, _, _ in meta.get("module_schemes", [])] == list(per_module)  # as trained, in the file


def test_stacked_max_report_lists_modifications_in_order(tmp_path, cache_dir):
    cfg = recipe_cfg("stacked_max", tmp_path, cache_dir)
    train(cfg)
    md = (tmp_path / "report.md").read_text()
    section = md.split("## Modifications, in the order applied")[1].split("##")[0]
    positions = [section.index(f"**{kind}**") for kind in ("distillation", "prune", "share", "lowrank", "qat")]
    assert positions == sorted(positions)
    assert "recipe: stacked_max" in md


def test_cluster_recipe_composes_for_fsdp_bf16_on_two_nodes(tmp_path, cache_dir):
    cfg = compose_cfg(["experiment=llama3_8b_to_1b_slurm"], tmp_path, cache_dir)
    assert cfg.trainer.strategy._target_ == "distill.recipe.strategies.fsdp_strategy"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 8
    assert cfg.teacher.path == "meta-llama/Llama-3.1-8B"
    assert cfg.trainer_extras.activation_checkpointing is True
    # GPU ranks as the job would see them: the strategy checks pass there, and fail early on CPU.
    slurm_env = {"SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "1", "SLURM_NTASKS": "16"}
    check_trainer_config(cfg.trainer, objective=cfg.distill.objective, environ=slurm_env)
    s = cfg.student
    llama = LlamaConfig(
        vocab_size=128256,  # Llama-3's vocabulary, which the student takes from the teacher
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        intermediate_size=s.intermediate_size,
        head_dim=s.head_dim,
        tie_word_embeddings=s.tie_word_embeddings,
    )
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(llama).parameters())
    assert 1.0e9 < params < 1.5e9, params  # "~1B": Llama-3.2-1B's shape has 1.24B


def test_cluster_recipe_renders_a_two_node_batch_script(tmp_path):
    overrides = ["experiment=llama3_8b_to_1b_slurm", "slurm.partition=gpu"]
    cfg = compose_config(overrides)
    assert job_settings(cfg)["ntasks_per_node"] == 8
    script = render(cfg, overrides, tmp_path)
    assert "#SBATCH --nodes=2" in script
    assert "#SBATCH --ntasks-per-node=8" in script
    assert "#SBATCH --gpus-per-node=8" in script
    assert "experiment=llama3_8b_to_1b_slurm" in script


def test_cluster_recipe_runs_a_few_steps_on_tiny_models(tmp_path, cache_dir):
    cfg = recipe_cfg(
        "llama3_8b_to_1b_slurm",
        tmp_path,
        cache_dir,
        "~slurm",  # no SLURM job here
        "trainer=cpu",  # FSDP and bf16 need GPUs; the rest of the recipe (checkpointing, accumulation) runs
        # One process: the recipe's devices=8 would make Lightning re-launch this pytest command 7 times.
        "trainer.devices=1",
        "data=embedded",
        "~teacher.path",  # the recipe's Llama-3.1-8B location, which the tiny teacher does not take
        "~teacher.dtype",
        "~data.name",
        "~data.config_name",
        "data.num_workers=0",  # the recipe's 4 loader workers only cost start-up time on tiny data
        "student.head_dim=null",
        "student.num_heads=4",
        "student.num_kv_heads=2",
        "trainer.accumulate_grad_batches=2",
        "eval.tasks=[]",
        "eval.max_batches=2",
        "trainer.limit_val_batches=2",
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].world_size == 1
    assert objects["trainer"].global_step == TINY_STEPS
    assert objects["student"].is_gradient_checkpointing
    assert metrics["heldout/student/ppl"] > 0


@pytest.mark.slow  # three tiny runs and a sweep summary, about 90 s loaded; the summary has unit tests
def test_sweep_writes_one_report_per_point_and_a_combined_plot(tmp_path, cache_dir):
    sweep = tmp_path / "logs" / "train" / "multiruns" / "sweep"  # the default sweep dir, under the launch dir
    tiny = [o for o in TINY_RUN if not o.startswith(("trainer.max_steps", "eval.tasks"))]
    run_train_cli(
        [
            "-m",
            "run_name=sweep",
            "experiment=distill_prune",
            *tiny,
            "trainer.max_steps=6",
            "callbacks.prune.end_step=4",
            "callbacks.prune.every_n_steps=2",
            "callbacks.prune.heads=null",
            "eval.tasks=[distill_cloze]",
            "callbacks.prune.target=0.25,0.5",
        ],
        tmp_path,
        cache_dir,
    )
    reports = sorted(sweep.glob("*/report.json"))
    assert len(reports) == 2
    sizes = [json.loads(r.read_text())["metrics"]["student"]["cost/params"] for r in reports]
    assert sizes[0] > sizes[1]  # 25% of channels removed leaves more than 50%
    plot = sweep / "quality_vs_size.png"
    assert plot.stat().st_size > 10_000  # a real PNG, not an empty file
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (sweep / "sweep_report.md").read_text()
    assert "callbacks.prune.target=0.25" in summary and "callbacks.prune.target=0.5" in summary
    assert summary.count("\n| ") == 5  # header, separator, teacher, 2 points


def test_headline_table_is_read_from_the_reports(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bench.headline import DEFAULT_END, DEFAULT_START, END, START
    from bench.headline import run as headline_run
    from distill.config import ConfigError
    from distill.eval.report import build_report

    def headline(overrides):  # python -m bench.headline <overrides>, composed from conf/bench/headline.yaml
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            headline_run(compose(config_name="bench/headline", overrides=overrides))

    teacher = {
        "heldout/ppl": 25.0,
        "heldout/top1_agreement": 1.0,
        "cost/bytes_memory": 538e6,
        "cost/tokens_per_s": 100.0,
        "task/distill_cloze/acc": 0.7,
    }
    runs = tmp_path / "runs"
    for name, ppl, ratio in (("distill_only", 222.5, 2.71), ("stacked_max", 987.25, 4.4)):
        student = {
            "heldout/ppl": ppl,
            "heldout/top1_agreement": 0.2,
            "cost/bytes_memory": 538e6 / ratio,
            "cost/bytes_disk": 538e6 / ratio,
            "cost/compression_ratio": ratio,
            "cost/ratio_vs_fp32_teacher": ratio,
            "cost/ratio_vs_shipped_teacher": 98e6 / (538e6 / ratio),
            "cost/tokens_per_s": 300.0,
            "task/distill_cloze/acc": 0.4,
        }
        report = build_report(teacher, student, [], {}, {"max_compression_ratio": 8.0})
        report["run"] = {"recipe": name, "train_seconds": 300.0, "steps": 100}
        (runs / f"headline_{name}").mkdir(parents=True)
        (runs / f"headline_{name}" / "report.json").write_text(json.dumps(report))
    longer = tmp_path / "longer" / "stacked_max_1h"  # a longer run of a recipe: its own row, after the others
    longer.mkdir(parents=True)
    report["run"] = {"recipe": "stacked_max", "train_seconds": 3600.0, "steps": 400}
    (longer / "report.json").write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{DEFAULT_START}\nold words\n{DEFAULT_END}\n{START}\nold table\n{END}\noutro\n")
    args = [f"reports={runs}", f"results_dir={tmp_path / 'results'}", f"readmes=[{readme}]"]
    headline([*args, "recipes=[distill_only,stacked_max]", f"longer_runs=['{longer}']", "default_run=stacked_max_1h"])
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    # The default-run paragraph quotes the named longer run's report: steps, minutes, size, top-1.
    words = text.split(DEFAULT_START)[1].split(DEFAULT_END)[0]
    assert "old words" not in words and "trained 400 steps in 60 minutes" in words
    assert "1/4.40 of the fp32 teacher" in words and "**0.200** on the test split" in words
    with pytest.raises(ConfigError, match=r"^default_run='nope': not one of longer_runs \(stacked_max_1h\)"):
        headline([*args, "recipes=[distill_only]", f"longer_runs=['{longer}']", "default_run=nope"])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[2].startswith("| teacher") and "| 25.00 |" in rows[2]
    # disk MB, ratio vs the fp32 teacher, bits/weight (none here), test top-1 (no interval here), test KL, ppl
    assert rows[3].startswith("| distill_only | 198.5 | 2.71× | – | 0.200 | – | 222.50 |") and "| 5.0 min |" in rows[3]
    assert rows[4].startswith("| stacked_max | 122.3 | 4.40× | – |") and "| 987.25 |" in rows[4]
    assert rows[5].startswith("| stacked_max_1h | 122.3 |") and "| 60.0 min |" in rows[5] and len(rows) == 6
    assert "stacked_max_1h 400" in text and f"read from `{longer}`" in text
    assert (tmp_path / "results" / "headline_quality_vs_size.png").stat().st_size > 10_000
    with pytest.raises(ConfigError, match=r"recipes=\['distill_share'\]: no report under .*; run with run=true"):
        headline([*args, "recipes=distill_share"])  # no report: refused, nothing rewritten
    with pytest.raises(ConfigError, match=r"longer_runs=.*nowhere.*needs the report.json of a finished run"):
        headline([*args, "recipes=[distill_only]", f"longer_runs=['{tmp_path / 'nowhere'}']"])
    twins = [f"'{tmp_path / d / 'stacked_max_1h'}'" for d in ("a", "b")]
    with pytest.raises(ConfigError, match=r"longer_runs=.*give each run folder a different name"):
        headline([*args, "recipes=[distill_only]", f"longer_runs=[{','.join(twins)}]"])
    assert readme.read_text() == text
