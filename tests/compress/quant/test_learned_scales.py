"""Trained block scales (``callbacks.qat.learn_scales``): exact bytes, LSQ gradients, replay, and the GGUF file."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from callbacks.qat import QuantizationAwareTraining
from distill.compress.quant import schemes
from distill.compress.quant.gguf_grid import encode_weights, fake_quantize
from distill.compress.quant.learned_scales import LEARNABLE, RANGES, LearnedScaleQuantizer, stored_scales
from distill.compress.quant.qat import convert, fake_quantized, learned_blocks, prepare
from distill.config import ConfigError
from students import scratch
from train import train

QUIET = ["eval.max_batches=1", "eval.tasks=[]", "eval.new_tokens=0", "eval.speed_runs=0"]


def _weight(rows: int = 8, cols: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def _moved(q: LearnedScaleQuantizer, seed: int = 1) -> LearnedScaleQuantizer:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q.log_ratio.copy_(torch.randn(q.log_ratio.shape, generator=generator) * 0.01)
        if q.kind == "q4_1":
            q.shift.copy_(torch.randn(q.shift.shape, generator=generator) * 0.05)
    return q


@pytest.mark.parametrize("kind", LEARNABLE)
def test_the_bytes_decode_to_the_values_the_student_ran_with(kind):
    """gguf-py's decoder reads back exactly the grid values, whatever the trained scales, and the scales stored."""
    w = _weight()
    q = _moved(LearnedScaleQuantizer(w, kind, "w"))
    d, low, _, values = q.parts(w)
    raw = q.gguf_bytes(w)
    decoded = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind.upper()]).reshape(w.shape)
    assert np.array_equal(decoded, values.numpy())
    # The training forward is those values (to an ulp: the straight-through sum), with the same codes.
    assert torch.allclose(q(w), values, rtol=0, atol=1e-7)
    got_d, got_low = stored_scales(raw, kind)
    assert torch.equal(got_d, d) and (low is None or torch.equal(got_low, low))
    # The scales are not the rule's: the values are not a fixed point of the grid's own rounding.
    assert not torch.equal(fake_quantize(values, kind), values)


def test_at_the_start_iq4_nl_and_q4_0_are_the_grid_rules_values():
    w = _weight(seed=3)
    for kind in ("iq4_nl", "q4_0"):
        start = LearnedScaleQuantizer(w, kind, "w").parts(w)[3]
        assert torch.equal(start, fake_quantize(w, kind)), kind


@pytest.mark.parametrize("kind", LEARNABLE)
def test_the_scales_get_lsqs_gradient(kind):
    """d/du of a loss is gain·d·Σ g·(level - y) inside the range and gain·d·Σ g·level outside; Q4_1's minimum gets Σ g
    over the clipped weights (inside, a shifted minimum moves the codes' origin and the value not at all)."""
    w = _weight(rows=4, cols=64, seed=2)
    q = _moved(LearnedScaleQuantizer(w, kind, "w", gain=10.0))
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    (q(w) * g).sum().backward()
    d, low, _, values = q.parts(w)
    lo, hi = RANGES[kind]
    blocks, grads = w.reshape(-1, 32), g.reshape(-1, 32)
    y = (blocks - (0 if low is None else low[:, None])) / d[:, None]
    level = (values.reshape(-1, 32) - (0 if low is None else low[:, None])) / d[:, None]
    inside = (y >= lo) & (y <= hi)
    want = 10.0 * d * (grads * torch.where(inside, level - y, level)).sum(-1)
    # rtol: the chain rule sees d before its fp16 rounding
    assert torch.allclose(q.log_ratio.grad.reshape(-1), want, rtol=2e-3, atol=1e-9)
    assert bool((~inside).any())  # the moved scales clip some weights, so both branches are tested
    if kind == "q4_1":
        want_low = 10.0 * q.d0.to(torch.int16).view(torch.float16).float().abs().reshape(-1) * (grads * ~inside).sum(-1)
        # atol: inside, d · (-1/d) + 1 cancels to a rounding error
        assert torch.allclose(q.shift.grad.reshape(-1), want_low, rtol=2e-3, atol=1e-6)


def test_the_weight_gets_the_clipped_straight_through_gradient():
    w = _weight(rows=1, cols=32, seed=4)
    q = LearnedScaleQuantizer(w, "q4_0", "w")
    with torch.no_grad():  # a smaller scale: the block's largest weights fall outside the grid
        q.log_ratio.fill_(-0.05)
    x = w.clone().requires_grad_()
    q(x).sum().backward()
    d = q.parts(w)[0]
    inside = ((w / d[0]) >= -8) & ((w / d[0]) <= 7)
    assert not bool(inside.all())
    assert torch.equal(x.grad, inside.float())


def _student(teacher):
    torch.manual_seed(0)
    return scratch.build(teacher, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def test_a_replayed_student_loads_the_trained_scales(tiny_teacher):
    """A checkpoint holds the scales; the structure log's spec rebuilds the quantizers they load into."""
    spec = schemes.make_spec("gguf_iq4_nl", None, ["*norm*", "lm_head", "*embed*"])
    spec = QuantizationAwareTraining(scheme="gguf_iq4_nl", learn_scales=True, skip=list(spec.skip)).spec
    trained = _student(tiny_teacher)
    prepare(trained, spec)
    learned = [m.weight_fake_quantizer for m in fake_quantized(trained).values()]
    assert learned and all(isinstance(q, LearnedScaleQuantizer) for q in learned)
    for i, q in enumerate(learned):
        _moved(q, seed=i)
    state = trained.state_dict()
    replayed = _student(tiny_teacher)
    prepare(replayed, schemes.QuantSpec.from_dict(spec.to_dict()))
    replayed.load_state_dict(state, strict=True)
    ids = torch.randint(0, 100, (1, 8))
    assert torch.equal(replayed(input_ids=ids).logits, trained(input_ids=ids).logits)
    blocks = learned_blocks(trained)
    convert(trained, spec)
    for name, raw in blocks.items():
        value = trained.get_parameter(name).detach().numpy()
        assert np.array_equal(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.IQ4_NL).reshape(value.shape), value)


def test_the_start_survives_a_strategy_that_casts_float_buffers_and_bad_values_are_refused_by_name():
    """FSDP's bf16 mixed precision casts floating buffers in place; the fp16 start is kept as bit patterns."""
    w = _weight()
    q = LearnedScaleQuantizer(w, "q4_1", "w")
    before = q.parts(w)[3]
    for module in q.modules():  # what FSDP's buffer cast does, in place
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(torch.bfloat16))
    assert torch.equal(q.parts(w)[3], before)
    bad = w.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"^weight w holds 1 non-finite value \(nan at row 3, col 7\)"):
        q(bad)
    with torch.no_grad():
        q.log_ratio.fill_(1e4)  # exp overflows: the scale is inf
    with pytest.raises(FloatingPointError, match=r"w: a trained q4_1 block scale overflowed .* lower callbacks.qat"):
        q(w)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"^callbacks.qat.learn_scales=True: trained block scales are llama.cpp's"):
        QuantizationAwareTraining(scheme="int4_weight_only", learn_scales=True)
    with pytest.raises(ConfigError, match=r"^callbacks.qat.scale_gain=0: give a number > 0"):
        QuantizationAwareTraining(scheme="gguf_q4_0", learn_scales=True, scale_gain=0)
    with pytest.raises(ConfigError, match=r"^callbacks.qat.learn_scales='yes': give true or false"):
        QuantizationAwareTraining(scheme="gguf_q4_0", learn_scales="yes")
    with pytest.raises(ValueError, match="learned scales take q8_0, q4_0, q4_1, iq4_nl; w is q3_k"):
        LearnedScaleQuantizer(_weight(cols=256), "q3_k", "w")


@pytest.mark.parametrize("start_step", [0, 2])  # prepared in setup, or mid-run with the optimizer rebuilt
def test_a_run_with_learned_scales_writes_them_into_its_gguf_file(tiny_cfg, tmp_path, start_step):
    """The budgeted mix trains its 32-block scales; the file holds those bytes and computes the student."""
    cfg = tiny_cfg(
        f"callbacks.qat.start_step={start_step}",
        "callbacks=qat",
        "callbacks/qat=gguf_q4_mix",
        "callbacks.qat.skip=['*norm*']",
        "callbacks.qat.modules=[linear,embedding]",
        "callbacks.qat.learn_scales=true",
        "callbacks.qat.scale_gain=100",  # a few steps must move the scales far enough to change codes
        "export.formats=[hf,gguf]",
        "trainer.max_steps=5",
        *QUIET,
        output_dir=tmp_path / "run",
    )
    _, objects = train(cfg)
    qat = next(cb for cb in objects["trainer"].callbacks if isinstance(cb, QuantizationAwareTraining))
    quant = qat.artifacts()[0]
    assert quant.spec.scale_gain == 100.0 and quant.gguf_blocks
    # The optimizer trained every learned scale (its log-ratio Parameters, shape (blocks, 1)), and they moved.
    optimizer = objects["trainer"].optimizers[0]
    scales = [p for g in optimizer.param_groups for p in g["params"] if p.dim() == 2 and p.shape[1] == 1]
    assert len(scales) == len(quant.gguf_blocks) and all(bool(p.abs().max() > 0) for p in scales)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["run"]["gguf_max_abs_logit_vs_student"] <= 1e-4  # the file is the trained student
    file = next((tmp_path / "run" / "student_gguf").glob("*.gguf"))
    tensors = {t.name: t for t in gguf.GGUFReader(file).tensors}
    changed = 0
    for name, raw in quant.gguf_blocks.items():
        kind = quant.gguf_types[name]
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind.upper()]).reshape(raw.shape[0], -1)
        if kind in ("iq4_nl",):  # the export's own encoder would write other bytes for these values
            changed += not np.array_equal(encode_weights(values, kind), raw)
        if name.endswith("mlp.down_proj.weight"):  # not q/k: rows not permuted in the file
            layer = name.split(".")[2]
            assert np.array_equal(np.asarray(tensors[f"blk.{layer}.ffn_down.weight"].data).reshape(raw.shape), raw)
    # The rule that writes an untrained file would not give these bytes: the file holds the trained scales.
    assert changed > 0
