"""Per-module torchao schemes (``module_schemes``): e.g. a tied embedding/head at int4 while the layers are int3."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.compress.quant import schemes
from distill.compress.quant.qat import FIELD, convert, fake_quantized, prepare
from distill.config import ConfigError
from distill.export.quantized import load_quantized, save_quantized
from distill.export.torchao_hf import save_transformers_torchao
from tests.helpers import tiny_llama

HEAD_INT4 = {"model.embed_tokens": "int4_weight_only", "lm_head": {"scheme": "int4_weight_only", "group_size": 32}}


def mixed_spec(per_module: dict | None = HEAD_INT4, prefix: str = "") -> schemes.QuantSpec:
    return schemes.make_spec("int3_weight_only", 64, ["*norm*"], prefix, ["linear", "embedding"], None, per_module)


def code_width(weight: torch.Tensor) -> torch.dtype:
    return weight.target_dtype


def test_each_target_gets_its_own_scheme_and_group_and_the_tie_holds():
    model = tiny_llama(vocab_size=128).eval()
    spec = mixed_spec()
    assert spec.scheme_for("lm_head") == ("int4_weight_only", 32)  # a bare name takes the scheme's default group
    assert spec.scheme_for("model.embed_tokens") == ("int4_weight_only", 32)
    assert spec.scheme_for("model.layers.0.mlp.down_proj") == ("int3_weight_only", 64)
    schemes.ptq(model, spec)
    assert model.model.embed_tokens.weight is model.lm_head.weight  # one tensor for the tie, at int4
    assert code_width(model.lm_head.weight) == torch.int4
    assert model.lm_head.weight.block_size[-1] == 32
    down = model.model.layers[0].mlp.down_proj.weight
    assert code_width(down) == torch.int3 and down.block_size[-1] == 64


def test_mixed_qat_converts_to_what_it_trained_on_and_both_exports_reload_exactly(tmp_path):
    model = tiny_llama(vocab_size=128).eval()
    ids = torch.randint(0, 128, (2, 12))
    spec = mixed_spec()
    prepare(model, spec)
    fq = fake_quantized(model)
    assert fq["lm_head"].weight_fake_quantizer.config.dtype == torch.int4
    assert fq["model.layers.1.self_attn.q_proj"].weight_fake_quantizer.config.dtype == torch.int3
    assert model.model.embed_tokens.weight is model.lm_head.weight
    with torch.no_grad():
        fake = model(ids).logits
    convert(model, spec)
    with torch.no_grad():
        real = model(ids).logits
    torch.testing.assert_close(real, fake, atol=1e-4, rtol=1e-4)
    assert code_width(model.model.layers[1].self_attn.q_proj.weight) == torch.int3
    assert code_width(model.lm_head.weight) == torch.int4

    out = save_quantized(model, None, tmp_path / "q", spec)  # reloads and compares logits (atol 0) itself
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["module_schemes"] == [
        ["model.embed_tokens", "int4_weight_only", 32],
        ["lm_head", "int4_weight_only", 32],
    ]
    assert code_width(load_quantized(out).lm_head.weight) == torch.int4

    hf = save_transformers_torchao(model, None, tmp_path / "hf", spec)  # plain from_pretrained, atol 0
    reloaded = AutoModelForCausalLM.from_pretrained(hf).eval()
    assert code_width(reloaded.model.layers[0].mlp.up_proj.weight) == torch.int3
    assert code_width(reloaded.model.embed_tokens.weight) == torch.int4


def test_the_int4_head_costs_the_bytes_its_codes_and_groups_say(tmp_path):
    """int4 codes in groups of 32 on the head, int3 in groups of 64 elsewhere: the file grows by that much."""
    sizes = {}
    for label, per_module in (("int3", None), ("mixed", HEAD_INT4)):
        model = tiny_llama(vocab_size=128).eval()
        spec = mixed_spec(per_module)
        schemes.ptq(model, spec)
        out = save_quantized(model, None, tmp_path / label, spec)
        sizes[label] = (out / "model.safetensors").stat().st_size
    table = 128 * 64
    # codes: +1 bit per weight; groups: 2 per row instead of 1, each with a scale and a zero point
    scales = json.loads((tmp_path / "int3" / "quantization.json").read_text())["size"]
    assert scales["quantized_weights"] > table
    grown = sizes["mixed"] - sizes["int3"]
    expect_codes = table // 8
    assert expect_codes < grown < expect_codes + table // 32 * 2 * 4 + 4096  # + the extra groups' scale/zero


def test_bad_module_schemes_are_refused_by_name():
    model = tiny_llama(vocab_size=128).eval()
    with pytest.raises(
        ConfigError,
        match=r"callbacks.qat.module_schemes=.*lm_head and model.embed_tokens share one weight but get lm_head int4",
    ):
        prepare(model, mixed_spec({"lm_head": "int4_weight_only"}, FIELD))
    with pytest.raises(ConfigError, match=r"callbacks.qat.module_schemes.\*nothing\*='int4_weight_only': the glob"):
        prepare(model, mixed_spec({"*nothing*": "int4_weight_only"}, FIELD))
    with pytest.raises(ConfigError, match=r"callbacks.qat.module_schemes.\*mlp\*.group_size=96: it does not divide"):
        prepare(model, mixed_spec({"*mlp*": {"scheme": "int4_weight_only", "group_size": 96}}, FIELD))
    with pytest.raises(
        ConfigError, match=r"callbacks.qat.module_schemes.\*embed\*.scheme='int8_dynact_int4_weight': .* weight-only"
    ):
        prepare(model, mixed_spec({"*embed*": "int8_dynact_int4_weight", "lm_head": "int8_dynact_int4_weight"}, FIELD))
    with pytest.raises(ConfigError, match=r"callbacks.qat.module_schemes.lm_head.scheme='gguf_q4_0': per-module"):
        mixed_spec({"lm_head": "gguf_q4_0"}, FIELD)
    with pytest.raises(ConfigError, match=r"callbacks.qat.module_schemes.lm_head=.*give each glob a scheme"):
        mixed_spec({"lm_head": {"bits": 4}}, FIELD)
    with pytest.raises(ConfigError, match=r"callbacks.qat.module_schemes=.*gguf_types"):
        schemes.make_spec("gguf_q4_0", None, ["*norm*"], FIELD, None, None, {"lm_head": "int4_weight_only"})


def test_the_ptq_command_takes_module_schemes_from_its_config(tmp_path):
    from omegaconf import OmegaConf

    from distill.export import ptq

    tiny_llama(vocab_size=128).save_pretrained(tmp_path / "fp")
    cfg = OmegaConf.create(
        {
            "model": str(tmp_path / "fp"),
            "scheme": "int3_weight_only",
            "group_size": 64,
            "skip": ["*norm*"],
            "modules": ["linear", "embedding"],
            "module_schemes": HEAD_INT4,
            "out": str(tmp_path / "q"),
        }
    )
    out = ptq.run(cfg)
    model = load_quantized(out)
    assert code_width(model.lm_head.weight) == torch.int4 and model.lm_head.weight.block_size[-1] == 32
    assert code_width(model.model.layers[0].self_attn.o_proj.weight) == torch.int3
