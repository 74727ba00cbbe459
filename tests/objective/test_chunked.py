"""The chunked KD + CE loss equals the naive one in value and gradients, and never builds full logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.config import ConfigError
from distill.objective.chunked import chunked_distill_loss
from distill.objective.divergences import DIVERGENCES
from distill.objective.objective import DistillationObjective

B, T, D, V = 3, 11, 16, 50


def _setup(seed: int = 0, bias: bool = False, padded_vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, requires_grad=True)
    head = nn.Linear(D, padded_vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(padded_vocab, D, generator=g) * 0.5)
        if bias:
            head.bias.copy_(torch.randn(padded_vocab, generator=g))
    t_hidden = torch.randn(B, T, 8, generator=g)
    t_head = nn.Linear(8, padded_vocab, bias=False)
    with torch.no_grad():
        t_head.weight.copy_(torch.randn(padded_vocab, 8, generator=g))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 6:] = -100  # padding
    labels[2, :3] = -100
    return hidden, head, t_hidden, t_head, labels


def _teacher_rows(t_hidden: torch.Tensor, t_head: nn.Module, vocab: int):
    flat = t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1])
    return lambda a, b: t_head(flat[a:b]).detach()[:, :vocab]


@pytest.mark.parametrize("loss", sorted(DIVERGENCES))
@pytest.mark.parametrize(("chunk_size", "bias", "padded"), [(7, False, V), (1000, True, V), (4, True, V + 6)])
def test_chunked_equals_naive_in_value_and_gradient(loss, chunk_size, bias, padded):
    obj = DistillationObjective(loss=loss, alpha=0.4, temperature=1.7, beta=0.3, skew=0.2, chunk_size=chunk_size)

    hidden, head, t_hidden, t_head, labels = _setup(bias=bias, padded_vocab=padded)
    naive = obj(head(hidden)[..., :V], t_head(t_hidden).detach()[..., :V], labels)
    naive["loss"].backward()
    want_grads = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])

    hidden, head, t_hidden, t_head, labels = _setup(bias=bias, padded_vocab=padded)
    got = obj.forward_chunked(hidden, head, _teacher_rows(t_hidden, t_head, V), labels, V)
    got["loss"].backward()
    got_grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])

    for key in ("loss", "ce", "kd"):
        assert got[key].item() == pytest.approx(naive[key].item(), rel=1e-5), key
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_tied_output_layer_gets_both_gradients():
    """With tied embeddings, the head's gradient adds to the embedding's, as in the naive path."""
    emb = nn.Embedding(V, D)
    head = nn.Linear(D, V, bias=False)
    head.weight = emb.weight
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    t_hidden = torch.randn(B, T, 8, generator=torch.Generator().manual_seed(2))
    t_head = nn.Linear(8, V, bias=False)
    obj = DistillationObjective(chunk_size=5)

    obj(head(emb(ids)), t_head(t_hidden).detach(), ids)["loss"].backward()
    want = emb.weight.grad.clone()
    emb.weight.grad = None
    obj.forward_chunked(emb(ids), head, _teacher_rows(t_hidden, t_head, V), ids, V)["loss"].backward()
    torch.testing.assert_close(emb.weight.grad, want, rtol=1e-4, atol=1e-6)


def _gguf_q4_0() -> nn.Module:
    from distill.compress.quant.gguf_grid import GGUFBlockFakeQuantizer

    return GGUFBlockFakeQuantizer("q4_0")


def _torchao_int4() -> nn.Module:
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    return IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32))


class _Tanh(nn.Module):
    """A weight transform whose gradient is not the identity: the chain rule to the latent weight is checked."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.tanh(weight)


@pytest.mark.parametrize("quantizer", [_gguf_q4_0, _torchao_int4, _Tanh], ids=["gguf_q4_0", "torchao_int4", "tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_fake_quantized_head_is_rounded_once_and_matches_autograd(quantizer, bias):
    """A fake-quantized head (a GGUF grid's straight-through estimator, or torchao's clamped one) is rounded once
    per loss, not once per chunk, and gives the naive path's loss and gradients through the module."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    width = 64  # two blocks of 32 per row

    def fq_head(seed: int) -> tuple:
        _, _, t_hidden, t_head, labels = _setup(seed)
        g = torch.Generator().manual_seed(seed + 1)
        hidden = torch.randn(B, T, width, generator=g, requires_grad=True)
        head = FakeQuantizedLinear(width, V, bias=bias)
        with torch.no_grad():
            head.weight.copy_(torch.randn(V, width, generator=g) * 0.5)
            if bias:
                head.bias.copy_(torch.randn(V, generator=g))
        head.weight_fake_quantizer = quantizer()
        return hidden, head, t_hidden, t_head, labels

    obj = DistillationObjective(loss="forward_kl", alpha=0.5, temperature=1.0, chunk_size=4)
    hidden, head, t_hidden, t_head, labels = fq_head(3)
    naive = obj(head(hidden), t_head(t_hidden).detach(), labels)
    naive["loss"].backward()
    want = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])

    hidden, head, t_hidden, t_head, labels = fq_head(3)
    calls = []
    head.weight_fake_quantizer.register_forward_hook(lambda *_: calls.append(1))
    got = obj.forward_chunked(hidden, head, _teacher_rows(t_hidden, t_head, V), labels, V)
    got["loss"].backward()
    assert len(calls) == 1  # B·(T-1) = 30 rows in chunks of 4: 8 chunks, one rounding
    assert got["loss"].item() == pytest.approx(naive["loss"].item(), rel=1e-5)
    for g, w in zip([hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else []), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # validation: also one rounding
        obj.forward_chunked(hidden, head, _teacher_rows(t_hidden, t_head, V), labels, V)
    assert len(calls) == 2


@pytest.mark.parametrize("enabled", [True, False])
def test_fake_quantized_head_tied_to_a_fake_quantized_embedding_with_padded_rows(enabled):
    """A head tied to a fake-quantized embedding, with 6 padded rows past the vocabulary, and a torchao quantizer
    switched on or off (off, it returns the weight itself): the gradients add up as on autograd's path, and a
    no-grad (validation) call works."""
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    width, rows = 64, V + 6

    def build() -> tuple:
        g = torch.Generator().manual_seed(7)
        emb = FakeQuantizedEmbedding(rows, width)
        head = FakeQuantizedLinear(width, rows, bias=False)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(rows, width, generator=g) * 0.5)
        head.weight = emb.weight
        for module in (emb, head):
            module.weight_fake_quantizer = _torchao_int4()
            module.weight_fake_quantizer.enabled = enabled
        ids = torch.randint(0, V, (B, T), generator=g)
        t_hidden = torch.randn(B, T, 8, generator=g)
        t_head = nn.Linear(8, rows, bias=False)
        with torch.no_grad():
            t_head.weight.copy_(torch.randn(rows, 8, generator=g))
        return emb, head, ids, t_hidden, t_head

    obj = DistillationObjective(loss="forward_kl", alpha=0.5, temperature=1.0, chunk_size=4)
    emb, head, ids, t_hidden, t_head = build()
    obj(head(emb(ids))[..., :V], t_head(t_hidden).detach()[..., :V], ids)["loss"].backward()
    want = emb.weight.grad.clone()

    emb, head, ids, t_hidden, t_head = build()
    got = obj.forward_chunked(emb(ids), head, _teacher_rows(t_hidden, t_head, V), ids, V)
    got["loss"].backward()
    torch.testing.assert_close(emb.weight.grad, want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        again = obj.forward_chunked(emb(ids), head, _teacher_rows(t_hidden, t_head, V), ids, V)
    assert again["loss"].item() == pytest.approx(got["loss"].item(), rel=1e-6)


def test_no_grad_forward_skips_gradients():
    hidden, head, t_hidden, t_head, labels = _setup()
    obj = DistillationObjective(chunk_size=8)
    with torch.no_grad():
        out = obj.forward_chunked(hidden, head, _teacher_rows(t_hidden, t_head, V), labels, V)
    assert not out["loss"].requires_grad
    assert out["loss"].item() == pytest.approx(obj(head(hidden), t_head(t_hidden), labels)["loss"].item(), rel=1e-5)


def test_chunk_size_and_mode_are_validated():
    with pytest.raises(ConfigError, match="distill.objective.chunk_size=0"):
        DistillationObjective(chunk_size=0)
    with pytest.raises(ConfigError, match="distill.objective.chunked='sometimes'"):
        DistillationObjective(chunked="sometimes")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distill_loss(
            torch.zeros(2, 3),
            nn.Linear(3, 4),
            torch.zeros(2, dtype=torch.long),
            lambda a, b: torch.zeros(b - a, 4),
            lambda *a: (torch.zeros(()), torch.zeros(())),
            (1.0, 1.0),
            4,
            chunk_size=0,
        )


def test_auto_mode_follows_vocabulary_size(tiny_teacher):
    obj = DistillationObjective(chunked="auto", chunked_min_vocab=1000)
    assert not obj.use_chunked(512, tiny_teacher.model)
    assert obj.use_chunked(49152, tiny_teacher.model)
    assert DistillationObjective(chunked=True).use_chunked(512, tiny_teacher.model)
    assert not DistillationObjective(chunked=False).use_chunked(49152, tiny_teacher.model)


def test_module_chunked_step_matches_naive_and_never_builds_full_logits(tiny_teacher):
    from distill.module import DistillModule
    from students import scratch

    torch.manual_seed(0)
    student = scratch.build(tiny_teacher, hidden_size=32, num_layers=2, num_heads=2)
    batch_ids = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": batch_ids, "attention_mask": torch.ones_like(batch_ids), "labels": batch_ids.clone()}
    results = {}
    for chunked in (False, True):
        obj = DistillationObjective(
            loss="jsd", alpha=0.5, temperature=2.0, chunked=chunked, chunk_size=16, hidden={"weight": 0.5}
        )
        obj.attach(student.config, tiny_teacher.config)
        torch.manual_seed(1)
        obj.hidden.proj.reset_parameters() if hasattr(obj.hidden.proj, "reset_parameters") else None
        module = DistillModule(tiny_teacher, student, obj, optimizer=torch.optim.SGD)
        assert module.chunked is chunked
        sizes: list[int] = []

        def record(_m, _i, out, sizes=sizes):
            sizes.append(out.shape[0] * out.shape[1] if out.dim() == 3 else out.shape[0])

        hooks = [m.register_forward_hook(record) for m in (student.lm_head, tiny_teacher.model.lm_head)]
        student.zero_grad()
        out = module._step(batch)
        out["loss"].backward()
        for h in hooks:
            h.remove()
        results[chunked] = (out, student.model.layers[0].mlp.up_proj.weight.grad.clone(), max(sizes))
    (naive, g_naive, rows_naive), (chunk, g_chunk, rows_chunk) = results[False], results[True]
    assert chunk["loss"].item() == pytest.approx(naive["loss"].item(), rel=1e-5)
    assert chunk["hidden"].item() == pytest.approx(naive["hidden"].item(), rel=1e-6)
    torch.testing.assert_close(g_chunk, g_naive, rtol=1e-4, atol=1e-7)
    assert rows_naive == 4 * 24  # the naive path projects every token at once
    assert rows_chunk <= 16  # the chunked path never projects more than one chunk, for either model
