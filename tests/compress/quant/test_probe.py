"""The KL probe: the suffix replay gives the full forward's KLs, and a model it cannot replay is probed in full."""

from __future__ import annotations

import pytest
import torch

from distill.compress.quant import probe
from distill.compress.quant.gguf_grid import fake_quantize
from tests.helpers import tiny_llama


def _probe(model: torch.nn.Module) -> list[float]:
    params = [model.model.embed_tokens.weight]  # the table: outside every layer, so a full forward
    params += [layer.mlp.down_proj.weight for layer in model.model.layers]
    params += [model.model.layers[1].self_attn.q_proj.weight, model.model.norm.weight]
    roundings = [lambda w: fake_quantize(w, "q4_0")] * (len(params) - 1) + [lambda w: w * 1.05]
    ids = [torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))]
    return probe.probe_kl(model, params, roundings, ids)


def test_the_suffix_replay_gives_the_kls_of_full_forwards(monkeypatch):
    model = tiny_llama(num_hidden_layers=4, initializer_range=0.2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replayed = _probe(model)
    monkeypatch.setattr(probe, "_stack", lambda _model: None)  # no layers to replay from: every probe in full
    full = _probe(model)
    assert all(kl > 0 for kl in full)
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(full), rtol=1e-4, atol=1e-7)
    for key, value in model.state_dict().items():  # every rounding undone
        assert torch.equal(value, before[key]), key


def test_a_model_whose_logits_the_replay_does_not_give_is_probed_in_full(monkeypatch):
    """A head wrapped in a soft cap (as Gemma 2 caps its logits) after the norm: the replay check refuses it."""
    model = tiny_llama(num_hidden_layers=3, initializer_range=0.2).eval()
    forward = model.forward

    def capped(*args: object, **kwargs: object) -> object:
        out = forward(*args, **kwargs)
        out.logits = 5 * torch.tanh(out.logits / 5)
        return out

    monkeypatch.setattr(model, "forward", capped)
    replays = []
    replay = probe._Suffix.replay
    monkeypatch.setattr(probe._Suffix, "replay", lambda self, *a: replays.append(a) or replay(self, *a))
    kls = _probe(model)
    assert len(replays) == 1  # the check's one replay; no probe used it
    monkeypatch.setattr(probe, "_stack", lambda _model: None)
    torch.testing.assert_close(torch.tensor(kls), torch.tensor(_probe(model)), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("tokens", [256, 1024])
def test_probe_rows_cut_rows_of_at_most_256_for_about_the_tokens_asked(tokens):
    batches = [torch.arange(4 * 512).reshape(4, 512), torch.arange(4 * 512).reshape(4, 512)]
    (rows,) = probe.probe_rows(batches, tokens)
    assert rows.shape == (tokens // 256, 256)
