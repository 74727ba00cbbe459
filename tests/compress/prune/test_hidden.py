"""Hidden-width (residual-stream) pruning: exact surgery, importance, export with the tie, replay, refusals."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from callbacks.prune import ProgressiveStructuredPruning
from distill.compress.prune.importance import ImportanceAccumulator
from distill.compress.prune.selection import add_compensation, compensation, select, select_per_layer
from distill.compress.prune.surgery import apply_spec, hidden_norms, hidden_params, shapes
from distill.compress.replay import replay
from distill.config import ConfigError
from distill.loaders.load_pruned import load_pruned
from tests.compress.prune.helpers import QUIET, STUDENT, make_batch, prepare, score
from tests.helpers import read_metrics, series
from tests.helpers import tiny_llama as base_llama
from train import train

TIES = pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])


def tiny_llama(tie: bool, seed: int = 0) -> LlamaForCausalLM:
    """2 layers, width 64, 4 query heads in 2 KV groups (head_dim 16), 512 tokens; norm weights random.

    Random norm weights (not Llama's ones) make a norm sliced at the wrong channels change the logits.
    """
    model = base_llama(seed, vocab_size=512, intermediate_size=96, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    with torch.no_grad():
        for norm in hidden_norms(model):
            norm.weight.uniform_(0.5, 1.5)
    return model.eval()


def silence_residual(model: LlamaForCausalLM, channels: list[int]) -> None:
    """Make ``channels`` of the residual stream exactly zero everywhere: nothing writes to them.

    Only the writers are zeroed (embedding columns, o_proj and down_proj rows); the readers (q/k/v/gate/up
    and lm_head columns, norm weights) keep random values, which multiply zero.
    """
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channels] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[channels] = 0
            layer.mlp.down_proj.weight[channels] = 0


def rms_reference(model: LlamaForCausalLM, kept: int) -> LlamaForCausalLM:
    """``model`` with its norms corrected for averaging over all channels instead of the ``kept`` ones.

    With the removed channels exactly zero, the full model's mean square is ``kept / hidden`` times the
    pruned model's, so RMSNorm_full(x) = sqrt(hidden / kept) · RMSNorm_pruned(x) on the kept channels
    when eps scales by the same factor. Dividing the norm weights by sqrt(hidden / kept) and scaling eps
    by ``kept / hidden`` makes the full model compute exactly what the pruned one does.
    """
    ref = copy.deepcopy(model)
    ratio = kept / model.config.hidden_size
    with torch.no_grad():
        for norm in hidden_norms(ref):
            norm.weight.mul_(math.sqrt(ratio))
            norm.variance_epsilon *= ratio
    return ref


def _spec(hidden: list[int]) -> dict:
    return {"layers": None, "q_heads": None, "kv_heads": None, "channels": None, "hidden": hidden}


@TIES
def test_pruned_width_equals_the_rms_corrected_original(tie):
    model = tiny_llama(tie)
    gone = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:32].tolist()  # scattered, not a block
    keep = sorted(set(range(64)) - set(gone))
    silence_residual(model, gone)
    reference = rms_reference(model, len(keep))
    pruned = copy.deepcopy(model)

    carry = apply_spec(pruned, _spec(keep))
    assert (pruned.config.hidden_size, pruned.config.head_dim, shapes(pruned)["hidden"]) == (32, 16, 32)
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tie  # the tie survives (or stays absent)
    assert all(w.shape[axis] == 32 for w, axis in hidden_params(pruned))
    # The optimizer-state carry slices exactly like the weights did, once per (tied) Parameter.
    assert all(torch.equal(fn(old.data), new.data) for new, (old, fn) in carry.items())
    assert len(carry) == len(hidden_params(model))

    ids = make_batch()
    with torch.no_grad():
        got = pruned(input_ids=ids).logits
        torch.testing.assert_close(got, reference(input_ids=ids).logits, rtol=0, atol=1e-5)
        # Without the correction the outputs differ: RMSNorm over fewer channels is a real change (healed later).
        assert float((got - model(input_ids=ids).logits).abs().max()) > 1e-3
        cached = pruned.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = pruned.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method", ["activation", "taylor", "magnitude"])
def test_loud_channel_outranks_a_dead_one(method):
    model = tiny_llama(tie=False)
    dead, loud = 5, 9
    with torch.no_grad():
        for w, axis in hidden_params(model):  # channel 5: every weight it indexes is zero
            w.select(axis, dead).zero_()
        model.model.embed_tokens.weight[:, loud] *= 20  # channel 9: large residual activations
    acc = ImportanceAccumulator(method, layers=False, hidden=True)
    if method == "taylor":
        model.train()
    score(acc, model)

    scores = acc.hidden_scores(model)
    assert scores.shape == (64,)
    assert float(scores[dead]) == 0 and int(scores.argmin()) == dead
    assert float(scores[loud]) > float(scores.sort().values[1])  # above the dead one and every ordinary one
    if method != "taylor":  # gradients need not favour it, but its activations and weights do
        assert int(scores.argmax()) == loud
    spec = select(acc, model, shapes(model) | {"hidden": 32})
    assert dead not in spec["hidden"] and loud in spec["hidden"] and len(spec["hidden"]) == 32


@pytest.mark.parametrize(("multiple", "widths"), [(8, [56, 40, 32]), (32, [64, 32, 32])])
def test_schedule_narrows_the_width_in_whole_units(multiple, widths):
    cb = ProgressiveStructuredPruning(
        hidden=0.5, hidden_multiple=multiple, importance="magnitude", end_step=6, every_n_steps=2, schedule="linear"
    )
    prepare(cb, tiny_llama(tie=True))  # width 64, 4 heads: steps of lcm(multiple, 4)
    assert [cb.sizes_at(e)["hidden"] for e in cb.events] == widths


def _train_hidden(tiny_cfg, *extra: str) -> dict:
    _, objects = train(
        tiny_cfg(
            "callbacks=prune",
            *STUDENT,
            *QUIET,
            "student.hidden_size=64",
            "callbacks.prune.channels=null",
            "callbacks.prune.hidden=32",
            "callbacks.prune.hidden_multiple=8",
            "callbacks.prune.schedule=linear",
            "callbacks.prune.end_step=6",
            "callbacks.prune.every_n_steps=2",
            "callbacks.prune.calib_batches=2",
            "trainer.max_steps=8",
            "trainer.log_every_n_steps=1",
            *extra,
        )
    )
    return objects


@TIES
def test_training_narrows_the_width_and_exports_plain_llama(tiny_cfg, tmp_path, tie):
    objects = _train_hidden(tiny_cfg, f"student.tie_word_embeddings={str(tie).lower()}")
    student, module, trainer = objects["student"].eval(), objects["module"], objects["trainer"]
    assert shapes(student)["hidden"] == 32
    # Progressive: 64 → 56 → 40 → 32 along the linear schedule, in steps of lcm(8, 4 heads) = 8.
    widths = list(dict.fromkeys(v for _, v in series(read_metrics(tmp_path), "prune/hidden")))
    assert widths == [56.0, 40.0, 32.0]
    assert [len(c["spec"]["hidden"]) for c in module.structure] == [56, 40, 32]
    emb = student.model.embed_tokens.weight
    assert (student.lm_head.weight is emb) == tie
    opt = trainer.optimizers[0]
    assert opt.state[emb]["exp_avg"].shape == emb.shape == (512, 32)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in module.trainable_parameters()}

    export = Path(objects["export_dir"])
    cfg = json.loads((export / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["head_dim"], cfg["tie_word_embeddings"]) == (32, 16, tie)
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tie
    ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, student(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert json.loads((export / "distill.json").read_text())["structure"] == module.structure


@TIES
def test_replay_rebuilds_width_heads_and_layers(tie):
    model = tiny_llama(tie)
    cb = ProgressiveStructuredPruning(heads=2, channels=0.5, layers=1, hidden=32, importance="activation", end_step=1)
    prepare(cb, model)
    score(cb.scores, model)
    spec = select(cb.scores, model, cb.sizes_at(1))
    assert spec["hidden"] is not None and len(spec["hidden"]) == 32
    apply_spec(model, spec)
    log = json.loads(json.dumps([{"kind": "prune", "spec": spec}]))  # as the checkpoint carries it

    fresh = tiny_llama(tie, seed=1)
    replay(fresh, log)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert shapes(fresh) == shapes(model) and fresh.config.hidden_size == 32
    assert (fresh.lm_head.weight is fresh.model.embed_tokens.weight) == tie
    fresh.load_state_dict(model.state_dict(), strict=True)
    ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_bias_compensation_follows_the_narrowed_width():
    model = tiny_llama(tie=False)
    cb = ProgressiveStructuredPruning(
        channels=0.5, hidden=32, importance="activation", bias_compensation=True, end_step=1
    )
    prepare(cb, model)
    score(cb.scores, model)
    spec = select(cb.scores, model, cb.sizes_at(1))
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    terms = compensation(cb.scores, model, spec)
    spec["biases"] = sorted({kind for _, kind, _ in terms})
    apply_spec(model, spec)
    add_compensation(model, terms)
    bias = model.model.layers[0].mlp.down_proj.bias
    gone = sorted(set(range(96)) - set(spec["channels"][0]))
    full = down[:, gone] @ cb.scores.input_mean("mlp", 0).float()[gone]
    torch.testing.assert_close(bias.detach(), full[spec["hidden"]])  # the kept hidden channels' share, in order


def test_per_layer_widths_keep_the_config_heads_and_load(tmp_path):
    model = tiny_llama(tie=True)
    cb = ProgressiveStructuredPruning(channels=0.5, heads=2, hidden=32, importance="magnitude", uniform=False)
    prepare(cb, model)
    spec = select_per_layer(cb.scores, model, cb.sizes_at(0), cb.plan.head_grouping)
    apply_spec(model, spec)
    assert (model.config.hidden_size, model.config.num_attention_heads) == (32, 4)  # heads: the unpruned count
    model.save_pretrained(tmp_path)
    ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path)(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden": 1.0}, r"callbacks.prune.hidden=1.0: .*would remove every one"),
        ({"hidden": 0}, r"callbacks.prune.hidden=0: .*0 would remove all"),
        ({"hidden": "half"}, r"callbacks.prune.hidden='half': give a fraction of hidden channels"),
        ({"hidden": 0.5, "hidden_multiple": 0}, r"callbacks.prune.hidden_multiple=0: give a positive int"),
        ({"hidden": 96}, r"callbacks.prune.hidden=96: the student has only 64 hidden channels"),
        ({"hidden": 40}, r"hidden=40: this keeps 40 of 64 .*multiple of .*hidden_multiple=32.*keep one of 32 "),
        ({"hidden": 0.25}, r"hidden=0.25: this keeps 48 of 64 hidden channels"),
        ({"hidden": 30, "hidden_multiple": 1}, r"hidden=30: .*of the 4 attention heads .*i.e. of 4; keep one of 4, 8"),
        ({"hidden": 50, "hidden_multiple": 1, "heads": 2}, None),  # 2 heads in the config divide 50
        (
            {"hidden": 50, "hidden_multiple": 1, "heads": 2, "uniform": False},  # the config keeps 4 heads
            r"hidden=50: .*of the 4 attention heads",
        ),
        ({"hidden": 32, "hidden_multiple": 64}, r"hidden=32: .*no smaller width is a multiple of 64"),
    ],
    ids=["all", "zero", "type", "multiple0", "too-big", "not-32", "fraction", "heads", "heads-ok", "per-layer", "64"],
)
def test_bad_hidden_targets_are_refused(kwargs, match):
    model = tiny_llama(tie=True)
    if match is None:
        cb = ProgressiveStructuredPruning(importance="magnitude", **kwargs)
        prepare(cb, model)
        assert cb.final["hidden"] == kwargs["hidden"]
        return
    with pytest.raises(ConfigError, match=match):
        prepare(ProgressiveStructuredPruning(importance="magnitude", **kwargs), model)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ("distill.objective.hidden.weight=1.0",),
            r"callbacks.prune.hidden=32: width pruning changes the student's hidden size.*hidden.weight=0",
        ),
        (
            (
                "callbacks=[prune,qat]",
                "callbacks/qat=int4_weight_only",
                "callbacks.qat.group_size=64",
                "callbacks.qat.start_step=6",
            ),
            r"callbacks.prune.hidden=32: this keeps 32 hidden channels, which the QAT group size 64 does not divide",
        ),
    ],
    ids=["hidden-state-loss", "qat-group"],
)
def test_width_pruning_the_run_cannot_follow_is_refused(tiny_cfg, overrides, match):
    cfg = tiny_cfg(
        "callbacks=prune",
        *STUDENT,
        *QUIET,
        "student.hidden_size=64",
        "callbacks.prune.channels=null",
        "callbacks.prune.hidden=32",
        "callbacks.prune.end_step=4",
        "trainer.max_steps=10",
        "export.enabled=false",
        *overrides,
    )
    with pytest.raises(ConfigError, match=match):
        train(cfg)
