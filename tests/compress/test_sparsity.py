"""Weight sparsity: the masks, Wanda's scores, the schedule, and the callback in a run (with QAT, exported)."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distill.compress.sparsity import (
    InputNorms,
    layer_stats,
    level_at,
    scores,
    semi_structured_mask,
    unstructured_mask,
)
from distill.compress.stages import check_schedule
from distill.config import ConfigError, named_callbacks
from distill.eval.report import summarize_modifications
from train import train


def test_unstructured_mask_drops_the_lowest_share_of_each_row_or_of_the_layer():
    score = torch.rand(6, 40, generator=torch.Generator().manual_seed(0))
    keep = unstructured_mask(score, 0.25, "row")
    assert (~keep).sum(1).tolist() == [10] * 6
    for row, k in zip(score, keep, strict=True):  # every dropped score is below every kept one in its row
        assert row[~k].max() < row[k].min()
    keep = unstructured_mask(score, 0.25, "layer")
    assert int((~keep).sum()) == 60 and score[~keep].max() < score[keep].min()


def test_two_four_mask_keeps_the_two_best_of_every_block_and_prunes_the_cheapest_blocks_first():
    score = torch.rand(8, 16, generator=torch.Generator().manual_seed(1))
    full = semi_structured_mask(score, 0.5).reshape(-1, 4)
    assert full.sum(1).tolist() == [2] * 32
    blocks = score.reshape(-1, 4)
    top2 = blocks.topk(2, dim=1).indices
    assert torch.equal(full, torch.zeros_like(full).scatter_(1, top2, True))
    half = semi_structured_mask(score, 0.25).reshape(-1, 4)  # half the blocks 2:4, the others whole
    pruned = half.sum(1) == 2
    assert int(pruned.sum()) == 16 and bool((half[~pruned]).all())
    lost = blocks.sum(1) - blocks.topk(2, dim=1).values.sum(1)
    assert lost[pruned].max() <= lost[~pruned].min()  # the blocks that lose least went first


def test_wanda_scores_are_weight_magnitude_times_input_channel_norm():
    torch.manual_seed(0)
    linear = nn.Linear(6, 3)
    norms = InputNorms({"l": linear})
    xs = [torch.randn(2, 5, 6) for _ in range(3)]
    norms.collecting = True
    for x in xs:
        linear(x)
    norms.collecting = False
    linear(torch.randn(2, 5, 6) * 100)  # not collecting: not counted
    linear.eval()
    norms.collecting = True
    linear(torch.randn(2, 5, 6) * 100)  # eval (validation): not counted
    expected = torch.cat([x.reshape(-1, 6) for x in xs]).norm(dim=0)
    torch.testing.assert_close(norms.norms("l"), expected)
    torch.testing.assert_close(scores(linear.weight, "wanda", norms.norms("l")), linear.weight.abs() * expected)
    norms.remove()


def test_cubic_schedule_reaches_the_target_at_end_step_and_only_grows():
    levels = [level_at(s, 2, 10, 0.5) for s in range(0, 14)]
    assert levels[:3] == [0.0, 0.0, 0.0] and levels[10:] == [0.5] * 4
    assert all(a <= b for a, b in itertools.pairwise(levels))
    assert level_at(6, 2, 10, 0.5) > 0.5 * 0.5  # cubic: most of it early


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["callbacks.sparsity.pattern=3:4"], r"callbacks.sparsity.pattern='3:4': choose 2:4 or null"),
        (["callbacks.sparsity.target=1.5"], r"callbacks.sparsity.target=1.5: give the share of zero weights"),
        (["callbacks.sparsity.importance=random"], r"callbacks.sparsity.importance='random'"),
        (["callbacks.sparsity.start_step=1"], r"callbacks.sparsity.start_step=1: Wanda scores the 2 training"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(tiny_cfg, overrides, match):
    cfg = tiny_cfg("callbacks=sparsity", *overrides)
    with pytest.raises(ConfigError, match=match):
        named_callbacks(cfg.callbacks)


def test_sparsity_must_finish_before_qat_starts(tiny_cfg):
    cfg = tiny_cfg("callbacks=[sparsity,qat]", "callbacks.qat.start_step=10", "callbacks.sparsity.end_step=20")
    with pytest.raises(ConfigError, match=r"callbacks.qat.start_step=10: qat must start .* sparsity finishes"):
        check_schedule(named_callbacks(cfg.callbacks).values())


RUN = (
    "trainer.max_steps=10",
    "trainer.val_check_interval=100",
    "trainer.limit_val_batches=0",
    "eval.enabled=false",
    "callbacks.sparsity.start_step=2",
    "callbacks.sparsity.end_step=6",
    "callbacks.sparsity.every_n_steps=2",
)


def test_a_wanda_run_exports_half_zero_rows_that_stay_zero_while_it_heals(tiny_cfg, tmp_path):
    _, objects = train(tiny_cfg("callbacks=sparsity", *RUN, output_dir=tmp_path))
    final = [c for c in objects["module"].structure if c["kind"] == "sparsity"][-1]["spec"]
    assert final["step"] == 6 and final["level"] == 0.5 and final["layers"]
    exported = load_file(tmp_path / "student" / "model.safetensors")
    linears = {k: v for k, v in exported.items() if ".layers." in k and v.dim() == 2}
    assert linears and all(k.endswith("_proj.weight") for k in linears)
    for name, w in linears.items():  # four more steps of AdamW after the last cut: nothing grew back
        assert (w == 0).sum(1).tolist() == [w.shape[1] // 2] * w.shape[0], name
    assert (exported["model.embed_tokens.weight"] == 0).float().mean() < 0.01  # embeddings stay dense (pad row aside)
    stats = layer_stats((k, v) for k, v in linears.items())
    assert {s["sparsity"] for s in stats.values()} == {0.5}
    lines = summarize_modifications([{"kind": "sparsity", "config": final}])
    assert "50.0% of the decoder linears' weights zero" in lines[0] and "gain no speed" in lines[0]


def test_two_four_then_qat_keeps_the_pattern_through_quantization(tiny_cfg, tmp_path):
    run = tiny_cfg(
        "callbacks=[sparsity,qat]",
        *RUN,
        "callbacks.sparsity.pattern=2:4",
        "callbacks.sparsity.importance=magnitude",
        "callbacks.qat.start_step=6",
        output_dir=tmp_path,
    )
    _, objects = train(run)
    kinds = [c["kind"] for c in objects["module"].structure]
    assert kinds.index("qat") > max(i for i, k in enumerate(kinds) if k == "sparsity")
    exported = load_file(tmp_path / "student" / "model.safetensors")  # dequantized int4 weights
    linears = {k: v for k, v in exported.items() if ".layers." in k and v.dim() == 2}
    for name, w in linears.items():
        zeros = (w.reshape(-1, 4) == 0).sum(1)
        assert bool((zeros >= 2).all()), name  # every block of 4 keeps at least its 2 zeros after QAT
