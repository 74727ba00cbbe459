"""QAT of the token embedding and a tied output head: one Parameter while training, one tensor after convert."""

from __future__ import annotations

import json

import pytest
import torch

from distill.compress.quant import schemes
from distill.compress.quant.qat import FIELD, convert, fake_quantized, prepare
from distill.config import ConfigError
from distill.export.quantized import dequantized_copy, load_quantized, save_quantized
from tests.helpers import tiny_llama

SPEC = schemes.make_spec("int4_weight_only", 32, ["*norm*"], modules=["linear", "embedding"])


def test_embedding_and_tied_head_train_tied_and_convert_to_one_tensor(tmp_path):
    model = tiny_llama(vocab_size=128).eval()
    ids = torch.randint(0, 128, (2, 12))
    prepare(model, SPEC)
    fq = fake_quantized(model)
    assert "model.embed_tokens" in fq and "lm_head" in fq  # both sides of the tie are fake-quantized
    assert model.model.embed_tokens.weight is model.lm_head.weight  # ... and still share one Parameter
    before = model.lm_head.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        logits = model(ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
    assert not torch.equal(model.lm_head.weight, before)  # the straight-through gradient reached the tie
    assert model.model.embed_tokens.weight is model.lm_head.weight

    with torch.no_grad():
        fake = model(ids).logits
    convert(model, SPEC)
    weight = model.model.embed_tokens.weight
    assert schemes.is_quantized(weight) and weight is model.lm_head.weight  # re-tied after convert
    with torch.no_grad():
        real = model(ids).logits
    torch.testing.assert_close(real, fake, atol=1e-4, rtol=1e-4)  # convert computes what training saw

    out = save_quantized(model, None, tmp_path / "q", SPEC)  # checks the reload's logits are identical
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["tied_keys"] == ["lm_head.weight"] and meta["modules"] == ["linear", "embedding"]
    reloaded = load_quantized(out)
    assert reloaded.model.embed_tokens.weight is reloaded.lm_head.weight

    plain = dequantized_copy(model)  # the plain export's model: float weights, still one tied Parameter
    assert plain.model.embed_tokens.weight is plain.lm_head.weight
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, real, atol=1e-5, rtol=1e-5)


def test_qat_convert_without_training_equals_ptq_including_the_embedding():
    qat, ptq = tiny_llama(vocab_size=128).eval(), tiny_llama(vocab_size=128).eval()
    prepare(qat, SPEC)
    convert(qat, SPEC)
    schemes.ptq(ptq, SPEC)
    for (name, a), (_, b) in zip(qat.state_dict().items(), ptq.state_dict().items(), strict=True):
        assert torch.equal(a.dequantize(), b.dequantize()), name


def test_embedding_needs_a_weight_only_scheme_and_a_fitting_group():
    with pytest.raises(ConfigError, match=r"callbacks.qat.modules=\['linear', 'embedding'\]: .* weight-only"):
        schemes.make_spec("int8_dynact_int4_weight", 32, ["*norm*"], FIELD, ["linear", "embedding"])
    with pytest.raises(ConfigError, match=r"callbacks.qat.group_size=128: it does not divide the embedding_dim=64"):
        prepare(
            tiny_llama(vocab_size=128).eval(),
            schemes.make_spec("int4_weight_only", 128, ["*norm*"], FIELD, ["embedding"]),
        )


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0", "iq4_nl"])
def test_a_gguf_embedding_rounds_the_rows_it_looks_up_with_the_whole_tables_values_and_gradient(kind):
    """Rounding the looked-up rows equals looking up the rounded table: forward and straight-through gradient."""
    from distill.compress.quant.gguf_grid import fake_quantize
    from distill.compress.quant.row_embedding import RowRoundedEmbedding

    table = torch.nn.Embedding(64, 96, padding_idx=0)
    with torch.no_grad():
        table.weight.mul_(0.05)
        table.weight[3, :32] *= 1e-4  # a block near the fp16 scale's subnormals
    module = RowRoundedEmbedding.on_grid(table, kind, "embed_tokens.weight")
    assert module.weight is table.weight  # the Parameter is kept (a tied head stays tied)
    ids = torch.tensor([[0, 3, 5, 5, 63], [7, 3, 1, 0, 2]])  # repeats and the padding row
    probe = torch.randn(2, 5, 96)
    out = module(ids)
    (out * probe).sum().backward()
    grad = table.weight.grad.clone()

    table.weight.grad = None
    whole = module.weight_fake_quantizer(table.weight)  # the whole table through the same straight-through rule
    reference = torch.nn.functional.embedding(ids, whole, padding_idx=0)
    (reference * probe).sum().backward()
    assert torch.equal(out, reference)
    torch.testing.assert_close(out.detach(), fake_quantize(table.weight, kind)[ids])  # the grid's values
    assert torch.equal(grad, table.weight.grad)
    assert grad[0].abs().sum() == 0 and grad[4].abs().sum() == 0  # the padding row and a row not looked up


def test_a_tied_gguf_embedding_is_row_rounded_and_stays_tied():
    from distill.compress.quant.row_embedding import RowRoundedEmbedding

    model = tiny_llama(vocab_size=128)
    spec = schemes.make_spec("gguf_q4_0", None, ["*norm*"], modules=["linear", "embedding"])
    prepare(model, spec)
    assert type(model.model.embed_tokens) is RowRoundedEmbedding
    assert model.model.embed_tokens.weight is model.lm_head.weight
