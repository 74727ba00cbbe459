"""``trainer_extras.compile_rounding``: the llama.cpp grids' rounding through torch.compile gives the eager values.

Compiling takes seconds per grid and shape on a loaded CPU, so everything that runs a compiled graph is ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from distill.compress.quant import schemes
from distill.compress.quant.compile_rounding import INDUCTOR_OPTIONS, compile_quantizers
from distill.compress.quant.gguf_grid import KINDS, GGUFBlockFakeQuantizer, fake_quantize
from distill.compress.quant.qat import prepare
from distill.recipe.strategies import apply_student_switches
from tests.compress.quant.test_bf16_qad import EVERY_GRID, QAD
from tests.helpers import assert_same_losses, crash_at, tiny_llama
from train import train


def test_the_switch_compiles_the_quantizers_qat_inserts_later_and_nothing_else():
    model = tiny_llama(vocab_size=512, hidden_size=256, intermediate_size=256)  # rows 256 wide: every grid fits
    assert apply_student_switches(model, {"compile_rounding": True, "compile": False}) == ["compile_rounding"]
    assert model._compiled_call_impl is None  # the student itself stays eager
    spec = schemes.make_spec("gguf_q4_0", None, ["*norm*"], modules=["linear", "embedding"], gguf_types=EVERY_GRID)
    prepare(model, spec)
    quantizers = [m for m in model.modules() if isinstance(m, GGUFBlockFakeQuantizer)]
    assert len(quantizers) == 2 * 7 + 2 and all(q._compiled_call_impl is None for q in quantizers)
    limit = torch._dynamo.config.recompile_limit
    try:
        assert compile_quantizers(model) == len(quantizers)  # what the switch's hook does at the next forward
        assert all(q._compiled_call_impl is not None for q in quantizers)
        shapes = {(q.kind, tuple(w.shape)) for q, w in _pairs(model)}
        assert torch._dynamo.config.recompile_limit >= 2 * len(shapes)  # no grid falls back to eager
    finally:
        torch._dynamo.config.recompile_limit = limit


def test_auto_compiles_only_a_student_large_enough_and_only_with_a_compiler(monkeypatch, caplog):
    from distill.compress.quant import compile_rounding as cr
    from distill.config import ConfigError

    model = tiny_llama(vocab_size=512, hidden_size=256, intermediate_size=256)
    assert apply_student_switches(model, {"compile_rounding": "auto"}) == ["compile_rounding=auto"]
    spec = schemes.make_spec("gguf_q4_0", None, ["*norm*"], modules=["linear", "embedding"], gguf_types=EVERY_GRID)
    prepare(model, spec)
    weights = sum({id(w): w.numel() for _, w in _pairs(model)}.values())
    with caplog.at_level("INFO", logger="distill"):
        model(input_ids=torch.tensor([[1, 2, 3]]))  # the hook decides at the first forward that finds quantizers
    assert f"compile_rounding=auto: eager ({weights:,} rounded weights, under 20,000,000" in caplog.text
    assert all(q._compiled_call_impl is None for q, _ in _pairs(model))
    # Large enough: compiled where inductor has a compiler, eager with the reason where it has none.
    monkeypatch.setattr(cr, "AUTO_MIN_WEIGHTS", weights)
    assert cr.auto_decision(model) == (True, f"{weights:,} rounded weights")
    monkeypatch.setattr(cr, "compiler_missing", lambda device: "inductor finds no C++ compiler (none)")
    compile_now, reason = cr.auto_decision(model)
    assert not compile_now and reason.startswith("inductor finds no C++ compiler (none); set trainer_extras.")
    with pytest.raises(ConfigError, match=r"^trainer_extras.compile_rounding='yes': give true, false or auto"):
        apply_student_switches(model, {"compile_rounding": "yes"})


def _pairs(model: torch.nn.Module) -> list[tuple[GGUFBlockFakeQuantizer, torch.Tensor]]:
    return [(m.weight_fake_quantizer, m.weight) for m in model.modules() if hasattr(m, "weight_fake_quantizer")]


@pytest.mark.slow  # one compile per grid (seconds each)
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_rounding_gives_the_eager_values_bit_for_bit(kind):
    torch._dynamo.reset()  # no graph compiled with other options by an earlier test
    weight = torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[0, :256] = 0  # all-zero blocks
    weight[1, :32] *= 1e-4  # a block whose IQ4_NL scale is an fp16 subnormal
    compiled = torch.compile(fake_quantize, dynamic=False, options=INDUCTOR_OPTIONS)
    assert torch.equal(compiled(weight, kind), fake_quantize(weight, kind))
    # Without emulate_precision_casts inductor drops the fp16 rounding of the scales: other values.
    if kind != "iq4_nl":  # IQ4_NL picks its scale among fp16 candidates by their error, then rounds with it
        torch._dynamo.reset()
        loose = torch.compile(fake_quantize, dynamic=False)
        assert not torch.equal(loose(weight, kind), fake_quantize(weight, kind))


@pytest.mark.slow  # compiles the IQ4_NL rounding for two batch shapes
def test_a_compiled_row_rounded_embedding_gives_the_eager_whole_table_values():
    from distill.compress.quant.row_embedding import RowRoundedEmbedding

    torch._dynamo.reset()
    table = torch.nn.Embedding(256, 96)
    with torch.no_grad():
        table.weight.mul_(0.05)
    module = RowRoundedEmbedding.on_grid(table, "iq4_nl", "embed_tokens.weight")
    whole = module.weight_fake_quantizer(table.weight).detach()  # eager, the whole table
    module.weight_fake_quantizer.compile(options=INDUCTOR_OPTIONS)
    for shape in ((4, 16), (3, 7), (2, 5)):  # the third runs the graph dynamo made dynamic
        ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(sum(shape)))
        assert torch.equal(module(ids).detach(), whole[ids])


STEPS = ("trainer.max_steps=5", "callbacks.model_checkpoint.every_n_train_steps=2")


@pytest.mark.slow  # four tiny training runs, two of them compiling (about 2 min on 2 loaded cores)
def test_compiled_rounding_trains_with_the_eager_losses_resumes_and_exports(tiny_cfg, tmp_path):
    eager_cfg = tiny_cfg(*QAD, *STEPS, "export.enabled=false", output_dir=tmp_path / "eager")
    train(eager_cfg)
    on = "trainer_extras.compile_rounding=true"
    _, compiled = train(tiny_cfg(*QAD, *STEPS, on, output_dir=tmp_path / "compiled"))
    assert_same_losses(tmp_path / "eager", tmp_path / "compiled", steps=5)
    check = compiled.get("gguf")
    assert check is not None and check.drift_max_abs_logit <= 1e-4  # the file is what the student trained on

    cut_cfg = tiny_cfg(*QAD, *STEPS, on, output_dir=tmp_path / "cut")
    crash_at(cut_cfg, step=3)
    with open_dict(cut_cfg):
        del cut_cfg.callbacks["crash"]
    _, resumed = train(cut_cfg)  # resume=auto: the step-2 checkpoint, compiled again
    assert resumed["trainer"].global_step == 5
    assert_same_losses(tmp_path / "eager", tmp_path / "cut", steps=5)
