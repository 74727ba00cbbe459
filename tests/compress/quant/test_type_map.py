"""The byte-budgeted llama.cpp type map: importance, error, allocation and the file size it predicts."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from distill.compress.quant import gguf_grid, schemes
from distill.compress.quant.type_map import (
    ByteTarget,
    Unit,
    allocate,
    budget_type_map,
    collect_importance,
    relative_error,
    type_bytes,
)


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 64)
        self.a = nn.Linear(64, 64, bias=False)
        self.b = nn.Linear(64, 32, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(self.embed(input_ids))))


def test_importance_is_the_mean_square_of_each_input_channel_and_the_token_counts():
    torch.manual_seed(0)
    model = TwoLinears()
    batches = [torch.randint(0, 16, (3, 5)), torch.randint(0, 16, (2, 5))]
    got = collect_importance(model, ["embed", "a", "b"], batches)
    with torch.no_grad():
        x = torch.cat([model.embed(b).reshape(-1, 64) for b in batches]).double()
        h = torch.relu(model.a(x.float())).double()
    torch.testing.assert_close(got["a"], x.pow(2).mean(0))
    torch.testing.assert_close(got["b"], h.pow(2).mean(0))
    counts = torch.bincount(torch.cat([b.flatten() for b in batches]), minlength=16).double()
    torch.testing.assert_close(got["embed"], counts / counts.sum())


def test_relative_error_matches_an_explicit_sum():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    q = gguf_grid.fake_quantize(w, "q4_0")
    v = torch.rand(64, dtype=torch.float64)
    num = sum(float(v[j]) * float(w[i, j] - q[i, j]) ** 2 for i in range(8) for j in range(64))
    den = sum(float(v[j]) * float(w[i, j]) ** 2 for i in range(8) for j in range(64))
    got = relative_error((q - w).square(), w.square(), v, lookup=False)
    assert got == pytest.approx(num / den, rel=1e-6)
    rows = torch.rand(8, dtype=torch.float64)  # a lookup weighs whole rows (tokens)
    num = sum(float(rows[i]) * float(w[i, j] - q[i, j]) ** 2 for i in range(8) for j in range(64))
    den = sum(float(rows[i]) * float(w[i, j]) ** 2 for i in range(8) for j in range(64))
    assert relative_error((q - w).square(), w.square(), rows, lookup=True) == pytest.approx(num / den, rel=1e-6)


def _unit(sizes: dict[str, int], errors: dict[str, float]) -> Unit:
    order = tuple(sorted(sizes, key=lambda k: sizes[k]))
    return Unit(("m",), 1, order, sizes, errors)


def test_allocation_fits_the_budget_and_no_single_upgrade_is_left_that_fits():
    units = [
        _unit({"a": 10, "b": 14, "c": 20}, {"a": 1.0, "b": 0.4, "c": 0.1}),
        _unit({"a": 10, "b": 14, "c": 20}, {"a": 0.5, "b": 0.45, "c": 0.1}),
        _unit({"a": 6, "b": 9}, {"a": 2.0, "b": 0.2}),
    ]
    for budget in range(26, 70):
        choice, total = allocate(units, budget, fixed=0)
        assert total == sum(units[i].bytes[k] for i, k in choice.items())
        cheapest = sum(u.bytes[u.candidates[0]] for u in units)
        assert total <= budget or total == cheapest
        for i, u in enumerate(units):
            for k in u.candidates:
                if u.error[k] < u.error[choice[i]]:
                    assert total + u.bytes[k] - u.bytes[choice[i]] > budget  # it would not fit
        # Against brute force: never worse than 1.5x the optimum here, and equal at the budgets with slack.
        best = min(
            sum(u.error[k] for u, k in zip(units, combo, strict=True))
            for combo in itertools.product(*(u.candidates for u in units))
            if sum(u.bytes[k] for u, k in zip(units, combo, strict=True)) <= budget
        )
        got = sum(units[i].error[k] for i, k in choice.items())
        assert got <= 1.5 * best + 1e-12
    choice, _ = allocate(units, 60, fixed=0)  # room for everything
    assert [choice[i] for i in range(3)] == ["c", "c", "b"]


def _tiny_llama(intermediate: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def test_the_map_meets_the_budget_and_predicts_the_gguf_file_size(tmp_path, tiny_teacher):
    from distill.export.gguf import export_gguf

    model = _tiny_llama()
    spec = schemes.make_spec("gguf_q4_0", None, ["*norm*"], "", ["linear", "embedding"])
    names = schemes.targets(model, spec.skip, spec.modules)
    batches = [torch.randint(0, 512, (4, 32)) for _ in range(2)]
    tokenizer = tiny_teacher.tokenizer
    loose = budget_type_map(model, names, batches, 3.0, gguf_grid.KINDS, tokenizer)
    tight = budget_type_map(model, names, batches, 5.5, gguf_grid.KINDS, tokenizer)
    for chosen in (loose, tight):
        assert chosen.file_bytes <= chosen.budget
        assert set(chosen.types) == set(names)
        # Only types whose blocks fit the rows: the 64-wide rows take no K-quant, the 256-wide down rows may.
        for name, kind in chosen.types.items():
            width = model.get_submodule(name).weight.shape[-1]
            assert width % gguf_grid.BLOCKS[kind] == 0
        # The tied embedding and head share one weight, hence one type.
        assert chosen.types["model.embed_tokens"] == chosen.types["lm_head"]
    assert sum(type_bytes(k, 1 << 20) for k in loose.types.values()) > sum(
        type_bytes(k, 1 << 20) for k in tight.types.values()
    )
    trained = {f"{n}.weight": k for n, k in tight.types.items()}
    check = export_gguf(model, tokenizer, tmp_path / "g", "q4_0", trained, pre="default")
    # The estimate counts tensors exactly and the tokenizer and header from above (a budget it meets, the file meets),
    # by at most a few kB (8 kB of it for keys a large model's file holds and this one's lacks).
    assert check.bytes <= tight.file_bytes <= check.bytes + 16384


def test_a_budget_smaller_than_the_cheapest_types_gives_the_cheapest_map(tiny_teacher):
    model = _tiny_llama()
    names = schemes.targets(model, ["*norm*"], ["linear", "embedding"])
    chosen = budget_type_map(model, names, [torch.randint(0, 512, (2, 16))], 50.0, gguf_grid.KINDS)
    assert chosen.file_bytes > chosen.budget
    for name, kind in chosen.types.items():  # each the cheapest type whose blocks fit its rows
        width = model.get_submodule(name).weight.shape[-1]
        fitting = [k for k in gguf_grid.KINDS if width % gguf_grid.BLOCKS[k] == 0]
        assert type_bytes(kind, 1 << 20) == min(type_bytes(k, 1 << 20) for k in fitting)


def test_a_budget_in_bytes_is_the_same_budget_as_the_ratio_that_gives_those_bytes(tiny_teacher):
    # target_bytes: a depth-reduced student sized against its teacher's fp32 bytes, not its own.
    model = _tiny_llama()
    names = schemes.targets(model, ["*norm*"], ["linear", "embedding"])
    batches = [torch.randint(0, 512, (4, 32))]
    tokenizer = tiny_teacher.tokenizer
    by_ratio = budget_type_map(model, names, batches, 5.0, gguf_grid.KINDS, tokenizer)
    by_bytes = budget_type_map(model, names, batches, ByteTarget(bytes=by_ratio.budget), gguf_grid.KINDS, tokenizer)
    assert by_bytes.budget == by_ratio.budget
    assert by_bytes.types == by_ratio.types
    # Without the tokenizer (tensors only): 1/5 of fp32 is 124,774 bytes here, the cheapest types 86,400.
    larger = budget_type_map(model, names, batches, 5.0, gguf_grid.KINDS)
    smaller = budget_type_map(model, names, batches, ByteTarget(bytes=100_000), gguf_grid.KINDS)
    assert smaller.budget == 100_000
    assert smaller.file_bytes <= 100_000 < larger.file_bytes


def test_the_kl_probe_gives_the_upgrade_to_the_table_the_output_feels():
    """Layers scaled to barely reach the residual stream: their relative errors stay as large, their effect does not.

    Unprobed, the greedy walk upgrades the small layer matrices first (as much relative error per tensor, far fewer
    bytes); with the probe, the room for one table upgrade goes to the tied table.
    """
    model = _tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(1e-3)
            layer.mlp.down_proj.weight.mul_(1e-3)
    names = schemes.targets(model, ["*norm*"], ["linear", "embedding"])
    batches = [torch.randint(0, 512, (4, 32))]
    kinds = ("q4_0", "q8_0")
    cheapest = budget_type_map(model, names, batches, 100.0, kinds).file_bytes
    table = model.lm_head.weight.numel()
    target = ByteTarget(bytes=cheapest + type_bytes("q8_0", table) - type_bytes("q4_0", table))
    plain = budget_type_map(model, names, batches, target, kinds)
    probed = budget_type_map(model, names, batches, target, kinds, probe="q4_0")
    assert (plain.probed, probed.probed) == (False, True)
    assert plain.types["lm_head"] == "q4_0" and any(k == "q8_0" for k in plain.types.values())
    assert probed.types["lm_head"] == probed.types["model.embed_tokens"] == "q8_0"
    assert probed.file_bytes <= target.bytes and "KL probe" in probed.summary()


def test_budget_probe_reaches_the_map_the_callback_trains_on():
    from distill.compress.quant.budget import check_budget

    gguf = schemes.make_spec("gguf_q4_0", None, ["*norm*"], "", ["linear", "embedding"])
    torchao = schemes.make_spec("int3_weight_only", 32, ["*norm*"], "", ["linear", "embedding"])
    assert check_budget(gguf, 7.0, None, None, None).probe is False  # llama.cpp's default: the imatrix rule alone
    assert check_budget(gguf, 7.0, None, None, None, True).probe is True
    assert check_budget(torchao, 7.0, None, None, None).probe is True  # torchao's default: probed
    assert check_budget(torchao, 7.0, None, None, None, False).probe is False


@pytest.mark.parametrize("kwargs", [{}, {"ratio": 7.0, "bytes": 5}, {"ratio": 0.5}, {"bytes": 0}])
def test_a_byte_target_takes_one_valid_budget(kwargs):
    with pytest.raises(ValueError, match="ByteTarget"):
        ByteTarget(**kwargs)
