"""Choosing which teacher layers a shallower from_teacher student keeps, by measured importance."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from distill.compress.depth import (
    block_influence,
    calibration_batches,
    choose_layers,
    drop_loss,
    mean_next_token_loss,
)
from distill.config import ConfigError
from distill.eval.report import summarize_modifications
from distill.models.teacher import FrozenTeacher
from students import from_teacher

LAYERS = 5


def _model(seed: int = 0, identity: int | None = None) -> nn.Module:
    """A 5-layer Llama with weights large enough (std 0.2) that every layer matters differently."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        initializer_range=0.2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # a final norm that is not all ones, so it changes directions (see the BI test)
            model.model.norm.weight.uniform_(0.2, 2.0)
    if identity is not None:  # both residual branches write zeros: the layer passes its input through
        with torch.no_grad():
            model.model.layers[identity].self_attn.o_proj.weight.zero_()
            model.model.layers[identity].mlp.down_proj.weight.zero_()
    return model


def _teacher(model: nn.Module) -> FrozenTeacher:
    return FrozenTeacher(model, None, "tiny")  # from_teacher copies weights; it never reads the tokenizer


def _ids(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


def _hf_loss_sum(model: nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """transformers' own shifted-label CE (a mean over targets) times the number of targets."""
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return float(loss) * ids[:, 1:].numel(), ids[:, 1:].numel()


def test_drop_loss_equals_brute_force_removal_and_drops_the_cheapest():
    model = _model()
    batches = [_ids(3, 20, 1), _ids(3, 20, 2)]
    before = model(input_ids=batches[0]).logits.detach()
    model.train()  # the measurement must switch to eval and back
    scores = drop_loss(model, batches)

    # The model is left as it was: all layers, its config, its mode, its outputs.
    assert len(model.model.layers) == LAYERS and model.config.num_hidden_layers == LAYERS and model.training
    model.eval()
    torch.testing.assert_close(model(input_ids=batches[0]).logits, before)

    # Brute force: a freshly built copy without layer i, scored by transformers' own loss.
    teacher = _teacher(model)
    brute = []
    for i in range(LAYERS):
        reduced = from_teacher.build(teacher, num_layers=LAYERS - 1, layers=[j for j in range(LAYERS) if j != i])
        parts = [_hf_loss_sum(reduced, b) for b in batches]
        brute.append(sum(s for s, _ in parts) / sum(n for _, n in parts))
    assert scores == pytest.approx(brute, rel=1e-5)
    assert len({round(s, 4) for s in brute}) == LAYERS  # distinct, so the orderings below are meaningful

    by_cost = sorted(range(LAYERS), key=lambda i: brute[i])  # cheapest removal first
    for keep in (1, 2, 3, 4):
        dropped = set(range(LAYERS)) - set(choose_layers(scores, keep))
        assert dropped == set(by_cost[: LAYERS - keep])
    # Dropping one layer: the one whose removal leaves the lowest loss, as a brute-force search finds it.
    (dropped_one,) = set(range(LAYERS)) - set(choose_layers(scores, LAYERS - 1))
    assert dropped_one == min(range(LAYERS), key=lambda i: brute[i])


def test_padding_is_left_out_of_both_scores():
    model = _model(seed=3)
    full, short = _ids(1, 16, 4), _ids(1, 10, 5)
    padded = torch.cat([full, F.pad(short, (0, 6))])
    mask = torch.cat([torch.ones(1, 16), F.pad(torch.ones(1, 10), (0, 6))]).long()
    batch = {"input_ids": padded, "attention_mask": mask}

    # Right padding never changes a real token's states: the padded batch equals the rows run alone,
    # weighted by their real tokens (16 and 10; 15 and 9 predictions).
    alone = [block_influence(model, [full]), block_influence(model, [short])]
    expected = [(16 * a + 10 * b) / 26 for a, b in zip(*alone, strict=True)]
    assert block_influence(model, [batch]) == pytest.approx(expected, rel=1e-4)
    ce = (15 * mean_next_token_loss(model, [full]) + 9 * mean_next_token_loss(model, [short])) / 24
    assert mean_next_token_loss(model, [batch]) == pytest.approx(ce, rel=1e-5)
    drops = [(15 * a + 9 * b) / 24 for a, b in zip(drop_loss(model, [full]), drop_loss(model, [short]), strict=True)]
    assert drop_loss(model, [batch]) == pytest.approx(drops, rel=1e-5)


def test_block_influence_is_one_minus_cosine_and_finds_an_identity_layer():
    model = _model(seed=1, identity=2)
    ids = _ids(2, 24, 6)
    scores = block_influence(model, [ids])

    # By hand: hidden_states[i] enters layer i. The last entry has the final norm applied, so the last
    # layer's true output is read with the norm swapped out.
    with torch.no_grad():
        states = list(model(input_ids=ids, output_hidden_states=True).hidden_states[:-1])
        norm, model.model.norm = model.model.norm, nn.Identity()
        states.append(model.model(input_ids=ids).last_hidden_state)
        model.model.norm = norm
    by_hand = [float((1 - F.cosine_similarity(states[i], states[i + 1], dim=-1)).mean()) for i in range(LAYERS)]
    assert scores == pytest.approx(by_hand, rel=1e-4, abs=1e-6)

    assert scores[2] == pytest.approx(0.0, abs=1e-6)
    assert min(s for i, s in enumerate(scores) if i != 2) > 0.01
    assert choose_layers(scores, LAYERS - 1) == [0, 1, 3, 4]


def test_choose_layers_keeps_the_highest_scores_in_order():
    scores = [0.5, 0.1, 0.9, 0.1, 0.3]
    assert choose_layers(scores, 3) == [0, 2, 4]
    assert choose_layers(scores, 4) == [0, 1, 2, 4]  # a tie goes to the lower index
    assert choose_layers(scores, 5) == [0, 1, 2, 3, 4]
    edges = [0.1, 0.9, 0.8, 0.2]
    assert choose_layers(edges, 2) == [1, 2]
    assert choose_layers(edges, 2, keep_first_last=True) == [0, 3]
    assert choose_layers(edges, 3, keep_first_last=True) == [0, 1, 3]
    assert choose_layers(edges, 1, keep_first_last=True) == [3]
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"cannot keep {bad} of 4 layers"):
            choose_layers(edges, bad)


def test_calibration_rows_are_spread_over_the_split():
    blocks = torch.arange(80).view(10, 8)  # 10 packed blocks of 8 ids
    out = calibration_batches(blocks, batches=2, rows=2, tokens=12)  # 2 blocks a row, rows at blocks 0, 2, 4, 6
    assert [b.shape for b in out] == [(2, 12), (2, 12)]
    assert torch.equal(torch.cat(out), torch.stack([torch.arange(16 * r, 16 * r + 12) for r in range(4)]))
    as_dataset = datasets.Dataset.from_dict({"input_ids": blocks.tolist()}).with_format("torch")
    from_dataset = calibration_batches(as_dataset, batches=2, rows=2, tokens=12)
    assert all(torch.equal(a, b) for a, b in zip(out, from_dataset, strict=True))
    assert [b.shape for b in calibration_batches(blocks, batches=8, rows=4, tokens=16)] == [(4, 16), (1, 16)]
    (short,) = calibration_batches(blocks[:1], batches=8, rows=4, tokens=12)  # less text than one row
    assert torch.equal(short, torch.arange(8).view(1, 8))


@pytest.mark.parametrize("select", ["block_influence", "drop_loss"])
def test_from_teacher_keeps_the_measured_layers(select, caplog):
    model = _model(seed=1, identity=2)
    blocks = _ids(16, 16, 7)
    with caplog.at_level(logging.INFO, logger="distill"):
        student = from_teacher.build(
            _teacher(model),
            num_layers=3,
            select=select,
            calibration=blocks,
            calibration_batches=2,
            calibration_tokens=32,
        )
    data = calibration_batches(blocks, batches=2, rows=from_teacher.CALIBRATION_ROWS, tokens=32)
    scores = (block_influence if select == "block_influence" else drop_loss)(model, data)
    kept = choose_layers(scores, 3)
    if select == "block_influence":
        assert 2 not in kept  # the identity layer is the first to go
    else:  # removing the identity layer changes nothing; a random model may even gain from losing another
        assert scores[2] == pytest.approx(mean_next_token_loss(model, data), rel=1e-6)
    assert student.layer_selection == {
        "select": select,
        "teacher_layers": LAYERS,
        "kept": kept,
        "scores": pytest.approx(scores, rel=1e-4),  # measured on a GPU when there is one
        "tokens": 2 * 4 * 32,
    }
    assert not hasattr(student.config, "layer_selection") and "layer_selection" not in student.config.to_dict()
    t_sd, s_sd = model.state_dict(), student.state_dict()
    for s_idx, t_idx in enumerate(kept):
        assert torch.equal(
            s_sd[f"model.layers.{s_idx}.mlp.up_proj.weight"], t_sd[f"model.layers.{t_idx}.mlp.up_proj.weight"]
        )
    assert f"kept teacher layers {kept} of 5 by {select} on 256 training tokens" in caplog.text
    assert len(model.model.layers) == LAYERS  # the teacher is whole again

    line = summarize_modifications([{"kind": "layer_selection", "config": student.layer_selection}])[0]
    dropped = ", ".join(f"{i}: {scores[i]:.4g}" for i in range(LAYERS) if i not in kept)
    assert line == f"kept teacher layers {kept} of 5 by {select} (dropped {dropped}) on 256 training tokens"


def test_even_selection_is_unchanged_and_needs_no_text():
    teacher = _teacher(_model())
    student = from_teacher.build(teacher, num_layers=3)
    assert not hasattr(student, "layer_selection")
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.model.layers[2].mlp.up_proj.weight)


def test_selection_config_errors():
    teacher, blocks = _teacher(_model()), _ids(4, 16, 8)
    with pytest.raises(ConfigError, match=r"student.select='random': choose one of even, block_influence, drop_loss"):
        from_teacher.build(teacher, num_layers=2, select="random")
    with pytest.raises(ConfigError, match=r"student.layers=\[0, 4\]: explicit layers and student.select=drop_loss"):
        from_teacher.build(teacher, num_layers=2, layers=[0, 4], select="drop_loss", calibration=blocks)
    with pytest.raises(ConfigError, match=r"student.select='block_influence': measures the layers on training text"):
        from_teacher.build(teacher, num_layers=2, select="block_influence")
    with pytest.raises(ConfigError, match=r"student.calibration_batches=0"):
        from_teacher.build(teacher, num_layers=2, select="drop_loss", calibration=blocks, calibration_batches=0)
    with pytest.raises(ConfigError, match=r"student.calibration_tokens=1"):
        from_teacher.build(teacher, num_layers=2, select="drop_loss", calibration=blocks, calibration_tokens=1)


@pytest.mark.parametrize("select", ["even", "block_influence"])
def test_train_builds_data_first_only_for_a_measuring_student(select, tmp_path, cache_dir, monkeypatch):
    from distill.config import build
    from distill.recipe import setup
    from tests.conftest import compose_cfg

    built: list[str] = []
    seen: list[object] = []

    def recording_build(node, **kwargs):
        built.append(str(node.get("_target_")))
        return build(node, **kwargs)

    def recording_calibration(blocks, **kwargs):
        seen.append(blocks)
        return calibration_batches(blocks, **kwargs)

    monkeypatch.setattr(setup, "build", recording_build)
    monkeypatch.setattr(from_teacher, "calibration_batches", recording_calibration)
    cfg = compose_cfg(
        [
            "teacher=tiny_random",
            "student=from_teacher",
            "student.num_layers=1",
            f"student.select={select}",
            "student.calibration_batches=1",
            "student.calibration_tokens=16",
            "data.block_size=32",
        ],
        tmp_path,
        cache_dir,
    )
    plan = setup.check_settings(cfg)
    built.clear()  # the objective's; what follows is build_models'
    objects = setup.build_models(cfg, plan)
    student, data = "students.from_teacher.build", "distill.data.datamodule.DistillDataModule"
    order = built[1:3]
    if select == "even":  # as before: teacher, student, data (the student's init draws come first)
        assert order == [student, data] and seen == []
        assert not hasattr(objects["student"], "layer_selection")
    else:  # the data first, and the student measured on its training split
        assert order == [data, student]
        assert seen == [objects["datamodule"].train_set]
        assert objects["student"].layer_selection["kept"] in ([0], [1])


def test_a_share_of_the_teachers_depth_is_rounded_and_a_bad_one_refused(tiny_teacher):
    from distill.config import ConfigError
    from students.from_teacher import build

    assert build(tiny_teacher, num_layers=0.5).config.num_hidden_layers == 1  # half of 2 layers
    assert build(tiny_teacher, num_layers=0.01).config.num_hidden_layers == 1  # at least one
    for bad in (1.5, 0.0, -0.5, True):
        with pytest.raises(ConfigError, match=r"student.num_layers=.*: from_teacher can copy between 1 and 2 layers"):
            build(tiny_teacher, num_layers=bad)
