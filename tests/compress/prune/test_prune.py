"""Progressive structured pruning: importance, surgery, schedule, export, DDP and bad targets.

Resume after a crash mid-schedule: tests/test_resume.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from callbacks.prune import ProgressiveStructuredPruning
from distill.compress.prune.selection import add_compensation, compensation, select
from distill.compress.prune.surgery import apply_spec, shapes
from distill.config import ConfigError
from tests.compress.prune.helpers import PRUNE, QUIET, STUDENT, make_batch, make_student, masked_copy, prepare, score
from tests.helpers import read_metrics, series
from train import train

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("method", ["activation", "taylor", "magnitude"])
def test_dead_head_channel_and_layer_are_pruned_first(tiny_teacher, method):
    student = make_student(tiny_teacher)
    d = 8  # head_dim = 32 / 4
    with torch.no_grad():
        attn = student.model.layers[0].self_attn
        attn.q_proj.weight[1 * d : 2 * d] = 0  # query head 1 (KV group 0) is dead
        attn.o_proj.weight[:, 1 * d : 2 * d] = 0
        mlp = student.model.layers[1].mlp
        mlp.gate_proj.weight[5] = 0  # channel 5 of layer 1 is dead
        mlp.up_proj.weight[5] = 0
        mlp.down_proj.weight[:, 5] = 0
        dead = student.model.layers[2]  # layer 2 adds nothing to the residual stream
        dead.self_attn.o_proj.weight.zero_()
        dead.mlp.down_proj.weight.zero_()
    cb = ProgressiveStructuredPruning(heads=2, channels=63, layers=2, importance=method, start_step=0, end_step=1)
    prepare(cb, student)
    score(cb.scores, student)

    heads = cb.scores.head_scores(student)[0]
    assert int(heads.argmin()) == 1 and float(heads[1]) < 1e-9 < float(heads.sort().values[1])
    channels = cb.scores.channel_scores(student)[1]
    assert int(channels.argmin()) == 5 and float(channels[5]) < 1e-9 < float(channels.sort().values[1])
    assert int(cb.scores.layer_scores(student).argmin()) == 2

    spec = select(cb.scores, student, cb.sizes_at(1))
    assert spec["layers"] == [0, 1]
    assert spec["q_heads"][0] == [0, 2] or spec["q_heads"][0] == [0, 3]  # head 1 lost within KV group 0
    assert 5 not in spec["channels"][1] and len(spec["channels"][1]) == 63


@pytest.mark.parametrize(
    ("grouping", "heads", "expect"), [("within_group", 2, (2, 2)), ("kv_groups", 2, (2, 1))], ids=["within", "kv"]
)
def test_pruned_output_equals_masked_original(tiny_teacher, grouping, heads, expect):
    student = make_student(tiny_teacher).eval()
    cb = ProgressiveStructuredPruning(
        heads=heads, channels=0.5, layers=2, importance="activation", head_grouping=grouping, end_step=1
    )
    prepare(cb, student)
    score(cb.scores, student)
    spec = select(cb.scores, student, cb.sizes_at(1))
    masked = masked_copy(student, spec)
    old_params = {n: p for n, p in student.named_parameters()}

    carry = apply_spec(student, spec)
    s = shapes(student)
    assert (s["layers"], s["heads"], s["kv_heads"], s["channels"]) == (2, *expect, 32)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    # The optimizer-state carry slices exactly like the weights did.
    assert carry and all(torch.equal(fn(old.data), new.data) for new, (old, fn) in carry.items())
    assert not any(p is old_params.get(n) for n, p in student.named_parameters() if "proj" in n)

    ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, masked(input_ids=ids).logits, rtol=0, atol=1e-5)
        # The KV cache lines up after layers were dropped: cached greedy decoding equals the uncached one.
        cached = student.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = student.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_bias_compensation_reduces_the_error_before_healing(tiny_teacher):
    student = make_student(tiny_teacher).eval()
    cb = ProgressiveStructuredPruning(heads=2, channels=0.5, importance="magnitude", bias_compensation=True, end_step=1)
    prepare(cb, student)
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [
        mod.register_forward_pre_hook(lambda m, a, key=(i, kind): inputs.__setitem__(key, a[0].detach()))
        for i, layer in enumerate(student.model.layers)
        for kind, mod in (("mlp", layer.mlp), ("attn", layer.self_attn.o_proj))
    ]
    score(cb.scores, student, batches=1)  # the same batch the errors are measured on
    for h in hooks:
        h.remove()
    spec = select(cb.scores, student, cb.sizes_at(1))
    original = copy.deepcopy(student)
    plain = copy.deepcopy(student)
    apply_spec(plain, spec)
    terms = compensation(cb.scores, student, spec)
    spec["biases"] = ["attention", "mlp"]
    apply_spec(student, spec)
    add_compensation(student, terms)
    assert student.config.mlp_bias and student.config.attention_bias
    with torch.no_grad():
        for i in range(3):
            x_mlp, x_attn = inputs[(i, "mlp")], inputs[(i, "attn")]
            want = original.model.layers[i].mlp(x_mlp)
            err_plain = (plain.model.layers[i].mlp(x_mlp) - want).pow(2).mean()
            err_comp = (student.model.layers[i].mlp(x_mlp) - want).pow(2).mean()
            assert err_comp < err_plain, (i, float(err_comp), float(err_plain))
            heads = torch.tensor([c for h in spec["q_heads"][i] for c in range(h * 8, (h + 1) * 8)])
            want = original.model.layers[i].self_attn.o_proj(x_attn)
            err_plain = (plain.model.layers[i].self_attn.o_proj(x_attn[..., heads]) - want).pow(2).mean()
            err_comp = (student.model.layers[i].self_attn.o_proj(x_attn[..., heads]) - want).pow(2).mean()
            assert err_comp < err_plain, (i, float(err_comp), float(err_plain))


def test_bias_compensated_run_exports_plain_llama_with_biases(tiny_cfg, tmp_path):
    _, objects = train(tiny_cfg(*PRUNE, *QUIET, "trainer.max_steps=10", "callbacks.prune.bias_compensation=true"))
    student, export = objects["student"], Path(objects["export_dir"])
    assert student.model.layers[0].mlp.down_proj.bias is not None
    assert float(student.model.layers[0].mlp.down_proj.bias.detach().abs().sum()) > 0
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["mlp_bias"] and cfg["attention_bias"] and cfg["intermediate_size"] == 32
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    ids = make_batch()
    with torch.no_grad():
        expected = student.eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_schedule_is_cubic_and_ends_at_the_target(tiny_teacher):
    cb = ProgressiveStructuredPruning(channels=0.5, start_step=0, end_step=40, every_n_steps=10, importance="magnitude")
    assert cb.events == [10, 20, 30, 40]
    prepare(cb, make_student(tiny_teacher))
    kept = [cb.sizes_at(e)["channels"] for e in cb.events]
    assert kept == [64 - round(32 * (1 - 0.75**3)), 64 - round(32 * (1 - 0.5**3)), 64 - round(32 * (1 - 0.25**3)), 32]
    assert kept[0] - kept[1] > kept[2] - kept[3]  # cubic: fast early, gentle late
    linear = ProgressiveStructuredPruning(
        channels=0.5, end_step=40, every_n_steps=10, schedule="linear", importance="magnitude"
    )
    prepare(linear, make_student(tiny_teacher))
    assert [linear.sizes_at(e)["channels"] for e in linear.events] == [56, 48, 40, 32]


def test_training_prunes_progressively_and_exports_plain_llama(tiny_cfg, tmp_path):
    _, objects = train(tiny_cfg(*PRUNE, *QUIET, "trainer.max_steps=10"))
    student, module, trainer = objects["student"], objects["module"], objects["trainer"]
    s = shapes(student)
    assert (s["layers"], s["heads"], s["kv_heads"], s["channels"]) == (2, 2, 2, 32)
    assert [c["kind"] for c in module.structure] == ["prune"] * len(module.structure) and len(module.structure) >= 2

    params = series(read_metrics(tmp_path), "prune/params")
    values = list(dict.fromkeys(v for _, v in params))  # each pruning step's count, in order
    assert len(values) >= 2 and values == sorted(values, reverse=True) and values[-1] == s["params"]

    # Optimizer holds exactly the pruned parameters, with Adam moments of their new shapes.
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.trainable_parameters()}
    q = student.model.layers[0].self_attn.q_proj.weight
    assert q.shape == (16, 32) and opt.state[q]["exp_avg"].shape == q.shape

    export = Path(objects["export_dir"])
    cfg = json.loads((export / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 2, 2)
    assert (cfg["intermediate_size"], cfg["head_dim"], cfg["model_type"]) == (32, 8, "llama")
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    ids = make_batch()
    with torch.no_grad():
        expected = student.eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    meta = json.loads((export / "distill.json").read_text())
    assert meta["structure"] == module.structure


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("callbacks.prune.heads=1.0",), r"callbacks.prune.heads=1.0: .* would remove every one"),
        (("callbacks.prune.layers=0",), r"callbacks.prune.layers=0: .* 0 would remove all"),
        (("callbacks.prune.layers=0.9",), r"callbacks.prune.layers=0.9: this would remove all 3 layers"),
        (("callbacks.prune.heads=3",), r"callbacks.prune.heads=3: this keeps 3 of 4 query heads, which breaks GQA"),
        (
            ("callbacks.prune.heads=0.5", "callbacks.prune.head_grouping=kv_groups", "student.num_kv_heads=4"),
            None,  # 4 groups of 1: removing half the groups is fine
        ),
        (("callbacks.prune.heads=1",), r"heads=1: .*multiple of 2.*keep one of 2, 4"),
        (("callbacks.prune.start_step=5", "callbacks.prune.end_step=3"), r"end_step=3: must be at least start_step=5"),
        (("callbacks.prune.end_step=20",), r"end_step=20: .*before trainer.max_steps=10"),
        (("callbacks.prune.channels=65",), r"channels=65: the student has only 64"),
        (
            ("student.hidden_size=36", "student.num_heads=12", "student.num_kv_heads=4", "callbacks.prune.heads=8"),
            r"heads=8: .*divide hidden_size=36; keep one of 4, 12",  # 8 keeps GQA but LlamaConfig would refuse it
        ),
        (("callbacks.prune.target=0.25",), r"target=0.25: it sets the MLP channels.*channels=0.5 does too"),
    ],
    ids=[
        "all-heads",
        "no-layers",
        "all-layers",
        "gqa-3",
        "kv-groups-ok",
        "gqa-1",
        "end<start",
        "past-max",
        "too-big",
        "width",
        "target+channels",
    ],
)
def test_bad_targets_are_refused(tiny_cfg, overrides, match):
    cfg = tiny_cfg(
        "callbacks=prune",
        *STUDENT,
        *QUIET,
        "export.enabled=false",
        "trainer.max_steps=10",
        "callbacks.prune.end_step=4",
        *overrides,
    )
    if match is None:
        _, objects = train(cfg)
        assert shapes(objects["student"])["kv_heads"] == 2
        return
    with pytest.raises(ConfigError, match=match):
        train(cfg)


class RankRecorder(pl.Callback):
    """Writes each rank's pruning log and a weight fingerprint at the end of training (for the DDP test)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        weights = {k: float(v.double().sum()) for k, v in pl_module.student.state_dict().items()}
        record = {"structure": pl_module.structure, "weights": weights, "shapes": shapes(pl_module.student)}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow  # two ranks pruning over gloo, about 100 s loaded; DDP training is in the default suite
@pytest.mark.ddp
def test_ddp_ranks_prune_the_same_units_and_stay_in_sync(tmp_path, cache_dir):
    overrides = [o for o in PRUNE if not o.startswith("trainer.log")]
    args = [
        "experiment=smoke",
        "trainer=ddp_sim",
        *overrides,
        "trainer.max_steps=12",
        "eval.enabled=false",
        "+callbacks.record._target_=tests.compress.prune.test_prune.RankRecorder",
        f"+callbacks.record.out_dir={tmp_path}/ranks",
        f"hydra.run.dir={tmp_path}/run",
        f"paths.cache_dir={cache_dir}",
        f"data.cache_dir={cache_dir}/data",
        "callbacks.progress_bar=null",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    r0, r1 = (json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["structure"]) >= 2 and r0["structure"] == r1["structure"]
    assert (r0["shapes"]["layers"], r0["shapes"]["heads"], r0["shapes"]["channels"]) == (2, 2, 32)
    # Gradients of the sliced parameters were synchronised by the rebuilt DDP wrapper: weights agree.
    for k, v in r0["weights"].items():
        assert r1["weights"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
