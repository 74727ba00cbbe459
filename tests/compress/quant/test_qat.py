"""QAT callback (torchao): prepare/convert placement and numerics, export round trip, PTQ, errors.

Resume after a crash mid-QAT: tests/test_resume.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)

from callbacks.base import CompressionCallback
from callbacks.qat import QuantizationAwareTraining
from distill.compress import stages as structure
from distill.compress.quant import schemes as quantization
from distill.compress.quant.qat import convert, fake_quantized, prepare
from distill.config import ConfigError
from distill.export.quantized import load_quantized
from students import scratch
from train import train

ROOT = Path(__file__).resolve().parents[3]
SMOKE_LINEARS = {  # the smoke student: 1 layer, width 32, MLP 64
    f"model.layers.0.{n}"
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
}


def _student(teacher, layers: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return scratch.build(teacher, hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=1, intermediate_size=64)


def _dq(t: torch.Tensor, block: tuple[int, ...], bits: int, symmetric: bool) -> torch.Tensor:
    """torchao's own quantize → dequantize, the reference for the fake-quantized forward."""
    qmin, qmax = (-8, 7) if bits == 4 else (-128, 127)
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    scale, zp = choose_qparams_affine(t, mapping, block, torch.int8, quant_min=qmin, quant_max=qmax)
    q = quantize_affine(t, block, scale, zp, torch.int8, qmin, qmax)
    return dequantize_affine(q, block, scale, zp, torch.int8, qmin, qmax)


def test_prepare_places_fake_quant_exactly_where_configured(tiny_teacher):
    student = _student(tiny_teacher, layers=2)
    keys, params = list(student.state_dict()), {n: p for n, p in student.named_parameters()}
    probe = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        before = student(input_ids=probe).logits
    prepare(student, quantization.make_spec("int8_dynact_int4_weight", 32, None))
    expected = {f"model.layers.{i}.{n.split('.', 3)[3]}" for i in (0, 1) for n in SMOKE_LINEARS}
    assert set(fake_quantized(student)) == expected
    assert type(student.lm_head) is nn.Linear and type(student.model.embed_tokens) is nn.Embedding
    # Fake-quant keeps the same Parameters: checkpoint keys and optimizer entries are unchanged.
    assert list(student.state_dict()) == keys
    assert all(p is params[n] for n, p in student.named_parameters())
    with torch.no_grad():
        assert not torch.allclose(student(input_ids=probe).logits, before)  # it does change the numerics

    other = _student(tiny_teacher, layers=2)
    prepare(other, quantization.make_spec("int8_weight_only", None, ["lm_head", "*mlp*", "*layers.1.*"]))
    assert set(fake_quantized(other)) == {n for n in expected if n.startswith("model.layers.0.self_attn")}
    everything = _student(tiny_teacher)
    prepare(everything, quantization.make_spec("int8_weight_only", None, []))
    assert "lm_head" in fake_quantized(everything)  # an empty skip list leaves nothing out


@pytest.mark.parametrize(
    ("scheme", "group_size"),
    [
        ("int4_weight_only", 32),
        ("int8_weight_only", None),
        ("int8_dynact_int4_weight", 32),
        ("int8_dynact_int8_weight", None),
    ],
)
def test_fake_quant_forward_equals_torchao_quantize_dequantize(scheme, group_size):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 16))
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    x = torch.randn(2, 5, 64)
    spec = quantization.make_spec(scheme, group_size, [])
    prepare(model, spec)
    s = quantization.get_scheme(scheme)
    w_ref = _dq(w, (1, group_size or 64), s.weight_bits, symmetric=True)
    x_ref = _dq(x, (1, 1, 64), 8, symmetric=False) if s.act_bits else x
    with torch.no_grad():
        fake = model(x)
    torch.testing.assert_close(fake, F.linear(x_ref, w_ref, b), rtol=0, atol=1e-6)
    assert (fake - F.linear(x, w, b)).abs().max() > 1e-4

    convert(model, spec)  # real quantized weights that compute what training saw
    qw = model[0].weight
    assert quantization.is_quantized(qw) and qw.qdata.dtype == torch.int8
    lo, hi = (-8, 7) if s.weight_bits == 4 else (-128, 127)
    assert lo <= int(qw.qdata.min()) and int(qw.qdata.max()) <= hi
    torch.testing.assert_close(qw.dequantize(), w_ref, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fake, rtol=0, atol=1e-6)


def test_frozen_ranges_stay_fixed_and_carry_into_convert(tiny_teacher):
    student = _student(tiny_teacher)
    spec = quantization.make_spec("int4_weight_only", 32, None)
    prepare(student, spec)
    cb = QuantizationAwareTraining(scheme="int4_weight_only", group_size=32, freeze_ranges_step=0)
    module = type("M", (), {"student": student})()
    cb._freeze(module)
    q = student.model.layers[0].mlp.down_proj.weight_fake_quantizer
    frozen = q.scale.clone()
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1.5)  # the weights move; frozen scales must not
        probe = torch.randint(0, 512, (1, 8))
        fake = student(input_ids=probe).logits
    torch.testing.assert_close(q.scale, frozen, rtol=0, atol=0)
    convert(student, spec)
    w = student.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(w.scale.reshape(frozen.shape), frozen.to(w.scale.dtype), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=probe).logits, fake, rtol=0, atol=1e-5)


def test_train_converts_and_compact_export_reloads_identically(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "callbacks=qat",
        "callbacks/qat=int4_weight_only",
        "trainer.max_steps=6",
        "eval.max_batches=1",
        "eval.tasks=[]",  # the report's held-out metrics and cost still run on the quantized student
        "eval.new_tokens=0",
        "eval.speed_runs=0",
    )
    metrics, objects = train(cfg)
    student = objects["student"].eval()
    quantized = {
        n for n, m in student.named_modules() if isinstance(m, nn.Linear) and quantization.is_quantized(m.weight)
    }
    assert quantized == SMOKE_LINEARS and not fake_quantized(student)
    assert not quantization.is_quantized(student.lm_head.weight)
    assert objects["module"].structure == [
        {
            "kind": "qat",
            "spec": {"scheme": "int4_weight_only", "group_size": 32, "skip": list(quantization.DEFAULT_SKIP)},
        }
    ]
    assert "heldout/student/ppl" in metrics

    out = tmp_path / "student_quantized"
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["scheme"] == "int4_weight_only" and meta["group_size"] == 32
    # q/o 32×32, k/v 16×32 (one KV head of 16), MLP 3 × 32·64. Each weight stores an int8 code, and each
    # group of 32 an fp32 scale and an int8 zero point: 8 + 40/32 = 9.25 bits.
    n_weights = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64
    assert meta["size"]["quantized_weights"] == n_weights
    assert meta["size"]["bits_per_weight"] == pytest.approx(9.25)
    assert meta["size"]["disk_bytes"] == (out / "model.safetensors").stat().st_size
    assert meta["size"]["quantized_bytes"] == n_weights * 9.25 / 8  # vs n_weights * 4 in fp32
    # The run report's cost (distill.cost) measures the same quantized student in memory.
    assert metrics["cost/student/bytes_memory"] == meta["size"]["memory_bytes"]
    # On disk the int4 codes are packed two per byte: 4 + 40/32 bits.
    assert meta["size"]["disk_bits_per_weight"] == pytest.approx(5.25)
    assert len(meta["packed_int4"]) == len(SMOKE_LINEARS)

    reloaded = load_quantized(out)
    assert all(quantization.is_quantized(reloaded.get_submodule(n).weight) for n in SMOKE_LINEARS)
    probe = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = student(input_ids=probe).logits
        torch.testing.assert_close(reloaded(input_ids=probe).logits, expected, rtol=0, atol=0)
        # The plain export holds the dequantized weights: weight-only, so the same function.
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(objects["export_dir"]).eval()
        torch.testing.assert_close(plain(input_ids=probe).logits, expected, rtol=0, atol=1e-5)


def _ptq_cli(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill.export.ptq", *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=300,
    )


@pytest.mark.slow  # a fresh interpreter and a training run
def test_ptq_cli_matches_convert_without_training(tiny_cfg, tmp_path, tiny_teacher):
    student = _student(tiny_teacher)
    student.save_pretrained(tmp_path / "fp")
    spec = quantization.make_spec("int8_dynact_int4_weight", 32, None)
    prepare(student, spec)
    convert(student, spec)  # QAT with zero training steps is PTQ
    proc = _ptq_cli([f"model={tmp_path / 'fp'}", "scheme=int8_dynact_int4_weight", "group_size=32"], tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {tmp_path / 'fp-ptq-int8_dynact_int4_weight'}: " in proc.stdout
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()  # Hydra's record of the call
    ptq = load_quantized(tmp_path / "fp-ptq-int8_dynact_int4_weight")
    for name in SMOKE_LINEARS:
        torch.testing.assert_close(ptq.get_submodule(name).weight.qdata, student.get_submodule(name).weight.qdata)
    proc = _ptq_cli([f"model={tmp_path / 'fp'}", "scheme=int3"], tmp_path / "bad")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: scheme='int3': unknown quantization scheme")


class _Prune(CompressionCallback):
    stage, start_step, end_step = "prune", 0, 50


def test_bad_settings_are_refused_with_clear_errors(tiny_cfg):
    with pytest.raises(ConfigError, match=r"callbacks.qat.scheme='int3': unknown quantization scheme; choose one of"):
        QuantizationAwareTraining(scheme="int3")
    with pytest.raises(ConfigError, match=r"callbacks.qat.group_size=48: .* multiple of 32 up to 1024"):
        QuantizationAwareTraining(scheme="int4_weight_only", group_size=48)
    with pytest.raises(ConfigError, match=r"callbacks.qat.group_size=32: int8_weight_only quantizes per output row"):
        QuantizationAwareTraining(scheme="int8_weight_only", group_size=32)
    with pytest.raises(ConfigError, match=r"^callbacks.qat.init='imatrix': give rtn, or imatrix .* gguf_\* scheme"):
        QuantizationAwareTraining(scheme="int4_weight_only", init="imatrix")
    with pytest.raises(ConfigError, match=r"^callbacks.qat.init='gptq': give rtn, or imatrix"):
        QuantizationAwareTraining(scheme="gguf_q4_0", init="gptq")
    with pytest.raises(ConfigError, match=r"freeze_ranges_step=1: give a global step >= start_step \(3\)"):
        QuantizationAwareTraining(start_step=3, freeze_ranges_step=1)
    with pytest.raises(ConfigError, match=r"qat.start_step=40: qat must start .* prune finishes .*end_step=50"):
        structure.check_schedule([QuantizationAwareTraining(start_step=40), _Prune()])
    structure.check_schedule([QuantizationAwareTraining(start_step=50), _Prune()])  # after pruning: fine

    # 64 does not divide the 32 in-features of the smoke student's attention and gate/up projections.
    with pytest.raises(
        ConfigError,
        match=r"callbacks.qat.group_size=64: it does not divide the in_features=32 of model.layers.0.self_attn.q_proj; "
        r"use one of \[32\]",
    ):
        train(tiny_cfg("callbacks=qat", "callbacks.qat.group_size=64", "export.enabled=false"))
    with pytest.raises(ConfigError, match=r"callbacks.qat.start_step=10: QAT would never run: trainer.max_steps=10"):
        train(tiny_cfg("callbacks=qat", "callbacks.qat.start_step=10", "export.enabled=false"))
    with pytest.raises(ConfigError, match=r"callbacks.qat.skip=\['\*'\]: it leaves no nn.Linear to quantize"):
        prepare(nn.Sequential(nn.Linear(32, 8)), quantization.make_spec("int8_weight_only", None, ["*"]))


def test_cli_unknown_scheme_is_one_line(tmp_path, cache_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=smoke",
            "callbacks=qat",
            "callbacks.qat.scheme=int3",
            f"hydra.run.dir={tmp_path}/run",
            f"paths.cache_dir={cache_dir}",
            f"data.cache_dir={cache_dir}/data",
        ],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: callbacks.qat.scheme='int3': unknown quantization")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_sim_trains_fake_quantized_student_and_exports(tmp_path, cache_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=smoke",
            "trainer=ddp_sim",
            "callbacks=qat",
            f"hydra.run.dir={tmp_path}/run",
            f"paths.cache_dir={cache_dir}",
            f"data.cache_dir={cache_dir}/data",
            "callbacks.progress_bar=null",
        ],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "distributed_backend=gloo" in out and "QAT prepared" in out
    model = load_quantized(tmp_path / "run" / "student_quantized")
    assert all(quantization.is_quantized(model.get_submodule(n).weight) for n in SMOKE_LINEARS)


def test_init_imatrix_starts_from_the_values_of_the_imatrix_ptq_file(tiny_teacher):
    """``init=imatrix``: the weights become what ``llama-quantize --imatrix`` stores for the same map."""
    import copy

    from distill.compress.quant.qat import start_from_imatrix
    from distill.compress.quant.type_map import collect_importance
    from distill.export.gguf import rounded_copy, tensor_types

    model = copy.deepcopy(tiny_teacher.model).eval()
    mix = {"*.mlp.*": "iq4_nl", "*.self_attn.o_proj": "q4_1"}
    spec = quantization.make_spec("gguf_q4_0", None, ["*norm*"], modules=["linear", "embedding"], gguf_types=mix)
    names = quantization.targets(model, spec.skip, spec.modules)
    ids = [torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))]
    importance = collect_importance(model, names, ids)
    # The PTQ file of the same map and importance (the embedding, as in llama.cpp, without any).
    types = tensor_types(model, "q4_0", {f"{n}.weight": spec.gguf_kind(n) for n in names})
    by_weight = {f"{n}.weight": importance[n].float().numpy() for n in names if "embed" not in n}
    expected = rounded_copy(model, types, by_weight).state_dict()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distinct = {id(model.get_submodule(n).weight) for n in names}  # a tied head is its embedding's weight
    assert start_from_imatrix(model, spec, importance) == len(distinct)
    for key, value in model.state_dict().items():
        if value.dim() < 2:
            assert torch.equal(value, before[key]), key  # norms stay
        else:
            assert torch.equal(value, expected[key]), key
            assert not torch.equal(value, before[key]), key


def test_a_run_with_init_imatrix_trains_from_the_budgeted_maps_importance(tiny_cfg, caplog):
    overrides = ["callbacks=qat", "callbacks/qat=gguf_q4_mix", "callbacks.qat.skip=['*norm*']"]
    overrides += ["callbacks.qat.modules=[linear,embedding]", "trainer.max_steps=2", "export.enabled=false"]
    overrides += ["eval.enabled=false", "callbacks.qat.init=imatrix"]
    with caplog.at_level("INFO"):
        metrics, _ = train(tiny_cfg(*overrides))
    assert "QAT starts from llama.cpp's importance-weighted rounding of" in caplog.text
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_a_run_with_target_bytes_trains_on_a_map_within_those_bytes(tiny_cfg):
    # The budget of a student sized against something other than itself (1/8 of a deeper teacher, say).
    from callbacks.qat import QuantizationAwareTraining

    overrides = ["callbacks=qat", "callbacks/qat=gguf_q4_mix", "callbacks.qat.skip=['*norm*']"]
    overrides += ["callbacks.qat.modules=[linear,embedding]", "trainer.max_steps=1", "export.enabled=false"]
    overrides += ["eval.enabled=false", "callbacks.qat.target_ratio=null", "callbacks.qat.target_bytes=45000"]
    _, objects = train(tiny_cfg(*overrides))
    (qat,) = [cb for cb in objects["trainer"].callbacks if isinstance(cb, QuantizationAwareTraining)]
    assert qat.type_map.budget == 45000
    # Binding: with room, every matrix takes Q8_0 (about 65 kB here); 45 kB forces 4-bit types on some.
    assert qat.type_map.file_bytes <= 45000
    assert set(qat.type_map.types.values()) - {"q8_0"}
    assert dict(qat.spec.gguf_types) == qat.type_map.types  # the run trained on that map
