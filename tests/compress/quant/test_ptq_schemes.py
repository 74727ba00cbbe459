"""PTQ schemes from 2 to 8 bits, with the token embedding (and a tied head) quantized too: targets, packing, reload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from distill.compress.quant import schemes as quantization
from distill.config import ConfigError
from distill.export.quantized import _pack, _unpack, load_quantized, save_quantized
from tests.helpers import tiny_llama

EVERYTHING = ("linear", "embedding")


def _quantized_modules(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if quantization.is_quantized(getattr(m, "weight", None))}


@pytest.mark.parametrize(
    ("scheme", "bits", "group_size"),
    [
        ("int8_weight_only", 8, None),
        ("int6_weight_only", 6, 32),
        ("int5_weight_only", 5, 32),
        ("int4_weight_only", 4, 32),
        ("int3_weight_only", 3, 32),
        ("int2_weight_only", 2, 32),
    ],
)
def test_scheme_quantizes_linears_and_tied_embedding_and_reloads_identically(tmp_path, scheme, bits, group_size):
    model = tiny_llama().eval()
    probe = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=probe).logits
    spec = quantization.make_spec(scheme, group_size, [], modules=EVERYTHING)
    quantization.ptq(model, spec)

    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert _quantized_modules(model) == linears | {"model.embed_tokens"}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor, quantized once
    codes = model.model.embed_tokens.weight.qdata
    assert -(2 ** (bits - 1)) <= int(codes.min()) and int(codes.max()) <= 2 ** (bits - 1) - 1
    with torch.no_grad():
        after = model(input_ids=probe).logits
    assert (after - before).abs().max() > 0  # it is quantized, not a copy

    out = save_quantized(model, None, tmp_path / scheme, spec)
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["modules"] == list(EVERYTHING) and meta["tied_keys"] == ["lm_head.weight"]
    # Unique weights: the tied matrix once. Each group (or row, for int8) stores an fp32 scale and an
    # int8 zero point: 40 bits. In memory every code takes a byte; on disk `bits`.
    weights = [m.weight for n, m in model.named_modules() if n in linears - {"lm_head"} or n == "model.embed_tokens"]
    numel = sum(w.numel() for w in weights)
    groups = sum(w.numel() // (group_size or w.shape[-1]) for w in weights)
    assert meta["size"]["quantized_weights"] == numel
    assert meta["size"]["bits_per_weight"] == pytest.approx(8 + 40 * groups / numel)
    assert meta["size"]["disk_bits_per_weight"] == pytest.approx(bits + 40 * groups / numel)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert "lm_head._weight_qdata" not in f.keys()  # noqa: SIM118
        stored = f.get_tensor("model.embed_tokens._weight_qdata")
    assert stored.numel() == codes.numel() * bits // 8 and stored.dtype == (torch.int8 if bits == 8 else torch.uint8)

    reloaded = load_quantized(out)
    assert _quantized_modules(reloaded) == _quantized_modules(model)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, after, rtol=0, atol=0)


def test_tie_is_kept_only_when_both_sides_are_quantized(tmp_path):
    model = tiny_llama().eval()
    # The embedding skipped: the head is quantized on its own and the fp32 table stays; both are stored.
    spec = quantization.make_spec("int4_weight_only", 32, ["*embed*"], modules=EVERYTHING)
    quantization.ptq(model, spec)
    assert quantization.is_quantized(model.lm_head.weight)
    assert not quantization.is_quantized(model.model.embed_tokens.weight)
    out = save_quantized(model, None, tmp_path / "q", spec)
    assert json.loads((out / "quantization.json").read_text())["tied_keys"] == []
    probe = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(out)(input_ids=probe).logits, model(input_ids=probe).logits)


def test_default_targets_are_unchanged_linears_without_head_or_embedding():
    spec = quantization.make_spec("int4_weight_only", 32, None)
    assert spec.modules == ("linear",) and spec.skip == quantization.DEFAULT_SKIP
    model = tiny_llama().eval()
    names = quantization.targets(model, spec.skip, spec.modules)
    assert names and "lm_head" not in names and not any("embed" in n for n in names)
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    # The record of a Linear-only spec is what it was before module kinds existed, and reads back the same.
    assert spec.to_dict() == {"scheme": "int4_weight_only", "group_size": 32, "skip": list(quantization.DEFAULT_SKIP)}
    assert quantization.QuantSpec.from_dict(spec.to_dict()) == spec
    wide = quantization.make_spec("int3_weight_only", 32, [], modules=EVERYTHING)
    assert quantization.QuantSpec.from_dict(wide.to_dict()) == wide
    assert "model.embed_tokens" in quantization.targets(model, wide.skip, wide.modules)


def test_bad_module_kinds_and_embedding_widths_are_refused():
    with pytest.raises(ConfigError, match=r"modules=\['linear', 'conv'\]: choose a non-empty list of linear"):
        quantization.make_spec("int8_weight_only", None, [], modules=["linear", "conv"])
    with pytest.raises(ConfigError, match=r"int8_dynact_int4_weight quantizes activations.*weight-only scheme"):
        quantization.make_spec("int8_dynact_int4_weight", 32, [], modules=EVERYTHING)
    with pytest.raises(ConfigError, match=r"skip=.*it leaves no nn.Embedding to quantize"):
        spec = quantization.make_spec("int4_weight_only", 32, None, modules=["embedding"])
        quantization.ptq(tiny_llama().eval(), spec)
    table = nn.Sequential(nn.Embedding(10, 48))
    with pytest.raises(ConfigError, match=r"group_size=32: it does not divide the embedding_dim=48 of 0"):
        quantization.ptq(table, quantization.make_spec("int4_weight_only", 32, [], modules=["embedding"]))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_packing_round_trips_every_code_at_bits_over_eight_bytes(bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.randint(lo, hi + 1, (7, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(bits))
    codes[0, :2] = torch.tensor([lo, hi])  # both ends of the range
    packed = _pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 64 * bits // 8)
    assert torch.equal(_unpack(packed, bits), codes)
