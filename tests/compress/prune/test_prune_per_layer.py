"""Per-layer (non-uniform) pruning widths: global ranking, exact surgery, export + loader, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from callbacks.prune import ProgressiveStructuredPruning
from distill.compress.prune.selection import select_per_layer
from distill.compress.prune.surgery import apply_spec, layer_shapes, shapes
from distill.config import ConfigError
from distill.loaders.load_pruned import LAYER_SHAPES_KEY, load_pruned
from distill.models.loading import load_causal_lm
from tests.compress.prune.helpers import PRUNE, QUIET, make_batch, make_student, masked_copy, prepare, score
from tests.helpers import read_metrics, series
from train import train

PER_LAYER = (*PRUNE, "callbacks.prune.uniform=false")


def _kill_half_of_layer0(student) -> None:
    """Zero most of layer 0's MLP channels and one query head per group there: layer 0 should give up more."""
    d = student.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        mlp = student.model.layers[0].mlp
        mlp.gate_proj.weight[:40] = 0
        mlp.up_proj.weight[:40] = 0
        mlp.down_proj.weight[:, :40] = 0
        attn = student.model.layers[0].self_attn
        for h in (0, 2):  # one query head in each of the 2 KV groups (group size 2)
            attn.q_proj.weight[h * d : (h + 1) * d] = 0
            attn.o_proj.weight[:, h * d : (h + 1) * d] = 0


@pytest.mark.parametrize("grouping", ["within_group", "kv_groups"])
def test_dead_units_concentrate_the_pruning_in_their_layer(tiny_teacher, grouping):
    student = make_student(tiny_teacher).eval()
    _kill_half_of_layer0(student)
    heads = 2  # per layer on average: within_group keeps 1 of 2 per group; kv_groups keeps 1 of 2 groups
    cb = ProgressiveStructuredPruning(
        heads=heads, channels=0.5, importance="activation", head_grouping=grouping, end_step=1, uniform=False
    )
    prepare(cb, student)
    score(cb.scores, student)
    spec = select_per_layer(cb.scores, student, cb.sizes_at(1), cb.plan.head_grouping)
    masked = masked_copy(student, spec)

    apply_spec(student, spec)
    per_layer = layer_shapes(student)
    channels = [s["channels"] for s in per_layer]
    assert sum(channels) == 3 * 32  # the total meets the 50% target...
    assert channels[0] < 32 < max(channels[1:])  # ...but the layer with dead channels gave up more
    assert all(c >= 1 for c in channels)
    assert set(spec["channels"][0]).isdisjoint(range(40)) or channels[0] <= 24
    assert sum(s["heads"] for s in per_layer) == 3 * heads
    if grouping == "within_group":
        assert per_layer[0]["heads"] == 2 and spec["q_heads"][0] == [1, 3]  # the two dead heads went
    cfg = student.config
    assert (cfg.intermediate_size, cfg.num_attention_heads) == (64, 4)  # the config keeps the unpruned counts
    assert getattr(cfg, LAYER_SHAPES_KEY) == per_layer

    ids = make_batch()
    with torch.no_grad():  # removing units equals zeroing them in the original, exactly
        torch.testing.assert_close(student(input_ids=ids).logits, masked(input_ids=ids).logits, rtol=0, atol=1e-5)
        cached = student.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = student.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_per_layer_run_exports_shapes_and_a_loader(tiny_cfg, tmp_path):
    _, objects = train(tiny_cfg(*PER_LAYER, *QUIET, "trainer.max_steps=10"))
    student = objects["student"].eval()
    s = shapes(student)
    assert s["layers"] == 2 and s["total_channels"] == 2 * 32 and s["total_heads"] == 2 * 2

    logged = read_metrics(tmp_path)
    assert series(logged, "prune/layer0/channels") and series(logged, "prune/layer1/heads")

    export = Path(objects["export_dir"])
    cfg = json.loads((export / "config.json").read_text())
    assert cfg[LAYER_SHAPES_KEY] == layer_shapes(student)
    assert (export / "load_pruned.py").is_file()
    with pytest.raises((RuntimeError, ValueError), match="size mismatch|shape|mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(export)  # plain transformers refuses rather than loading wrong shapes
    ids = make_batch()
    with torch.no_grad():
        expected = student(input_ids=ids).logits
        torch.testing.assert_close(load_pruned(export)(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        # evaluate.py's loader takes the same path.
        via_eval = load_causal_lm(str(export), dtype="auto", field="model")
        torch.testing.assert_close(via_eval(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_per_layer_widths_with_sharing_are_refused(tiny_cfg):
    cfg = tiny_cfg(
        "callbacks=[prune,share]",
        *PER_LAYER[1:],
        *QUIET,
        "student.num_layers=4",
        "callbacks.prune.layers=null",
        "callbacks.share.start_step=9",
        "trainer.max_steps=10",
        "export.enabled=false",
    )
    with pytest.raises(ConfigError, match=r"uniform=False: callbacks.share needs decoder layers of one shape"):
        train(cfg)
