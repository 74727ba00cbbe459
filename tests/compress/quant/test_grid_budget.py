"""The byte-budgeted torchao grid map: each grid's rounding and bytes, the KL probe, the budget and the export."""

from __future__ import annotations

import json

import pytest
import torch

from distill.compress.quant import schemes
from distill.compress.quant.grid_budget import (
    DEFAULT_GRIDS,
    budget_grid_map,
    grid_label,
    map_schemes,
    resolve_grids,
    rounded,
)
from distill.compress.quant.probe import probe_kl
from distill.compress.quant.type_map import ByteTarget
from distill.config import ConfigError
from distill.cost import disk_bytes
from distill.export.quantized import load_quantized, save_quantized
from tests.helpers import tiny_llama
from train import train

SKIP, KINDS = ("*norm*",), ("linear", "embedding")


def wide_llama(seed: int = 0) -> torch.nn.Module:
    """Rows 192 and 384 wide: every default group size (32, 64, 96, 192) divides both."""
    return tiny_llama(seed, vocab_size=256, hidden_size=192, intermediate_size=384).eval()


def budget_spec(chosen, grids=DEFAULT_GRIDS) -> schemes.QuantSpec:
    return schemes.QuantSpec("int3_weight_only", 64, SKIP, KINDS, (), None, map_schemes(chosen, grids))


def test_a_grid_rounds_as_torchao_quantizes_and_costs_its_codes_scales_and_zero_points():
    model = tiny_llama(vocab_size=128).eval()
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()  # 64 rows, 128 wide
    value, size = rounded(w, ("int3_weight_only", 64))
    spec = schemes.make_spec("int3_weight_only", 64, list(SKIP), "", list(KINDS))
    schemes.ptq(model, spec)
    torch.testing.assert_close(value, model.model.layers[0].mlp.down_proj.weight.dequantize(), rtol=0, atol=0)
    assert size == 64 * 128 * 3 // 8 + 64 * 2 * (4 + 1)  # packed 3-bit codes; fp32 scale + int8 zero per group
    _, row = rounded(w, ("int8_weight_only", None))
    assert row == 64 * 128 + 64 * (4 + 1)  # one byte a code, one scale and zero point per row


def test_the_probe_measures_each_rounding_alone_and_leaves_the_weights_as_they_were():
    model = tiny_llama(vocab_size=128, initializer_range=0.2).eval()  # logits far from uniform
    before = {k: v.clone() for k, v in model.state_dict().items()}
    down = model.model.layers[0].mlp.down_proj.weight
    ids = [torch.randint(0, 128, (2, 16))]
    grids = [("int8_weight_only", None), ("int4_weight_only", 32), ("int2_weight_only", 64)]
    kl = probe_kl(model, [down] * 3, [lambda w, g=g: rounded(w, g)[0] for g in grids], ids)
    assert 0 <= kl[0] < kl[1] < kl[2]  # coarser grids move the logits more
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_map_meets_the_budget_the_export_confirms_it_and_a_tie_takes_one_grid(tmp_path):
    model = wide_llama()
    names = schemes.targets(model, SKIP, KINDS)
    batches = [torch.randint(0, 256, (4, 32)) for _ in range(2)]
    sizes = {}
    for ratio in (5.0, 10.0):
        chosen = budget_grid_map(model, names, batches, ratio, DEFAULT_GRIDS, ("int3_weight_only", 64))
        assert chosen.file_bytes <= chosen.budget and set(chosen.types) == set(names)
        assert chosen.types["model.embed_tokens"] == chosen.types["lm_head"]
        spec = budget_spec(chosen)
        schemes.check_spec(model, spec)  # every chosen group divides its rows; one grid per tied Parameter
        quantized = schemes.ptq(wide_llama(), spec)
        out = save_quantized(quantized, None, tmp_path / f"r{ratio:g}", spec)  # reloads with identical logits
        # The estimate counts the tensors exactly and the records that name them from above: the file is within it.
        assert disk_bytes(out) <= chosen.file_bytes <= disk_bytes(out) + 16384
        meta = json.loads((out / "quantization.json").read_text())
        assert len(meta["module_schemes"]) == len(names)
        reloaded = load_quantized(out)
        assert reloaded.lm_head.weight.target_dtype == quantized.lm_head.weight.target_dtype
        sizes[ratio] = disk_bytes(out)
    assert sizes[10.0] < sizes[5.0]


def test_without_room_every_tensor_takes_its_cheapest_grid_and_with_room_its_best():
    model = wide_llama()
    names = schemes.targets(model, SKIP, KINDS)
    batches = [torch.randint(0, 256, (2, 16))]
    grids = (("int2_weight_only", 192), ("int4_weight_only", 32), ("int8_weight_only", None))
    tight = budget_grid_map(model, names, batches, ByteTarget(bytes=1000), grids, None)
    assert tight.file_bytes > tight.budget and set(tight.types.values()) == {grid_label(grids[0])}
    roomy = budget_grid_map(model, names, batches, 1.5, grids, ("int4_weight_only", 32))
    assert set(roomy.types.values()) == {grid_label(grids[2])}


def test_the_probe_moves_bytes_to_the_tensor_whose_rounding_the_output_feels():
    """A tied table read twice and a layer scaled to matter less: with the probe, the table gets the upgrades first."""
    model = wide_llama()
    with torch.no_grad():  # the layers' outputs barely reach the residual stream, so their rounding barely matters
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(1e-3)
            layer.mlp.down_proj.weight.mul_(1e-3)
    names = schemes.targets(model, SKIP, KINDS)
    batches = [torch.randint(0, 256, (4, 32))]
    grids = (("int2_weight_only", 64), ("int6_weight_only", 64))
    cheapest = budget_grid_map(model, names, batches, 100.0, grids, None).file_bytes
    # Room for one upgrade of about the table's size: the probe gives it to the table.
    table_extra = 256 * 192 * 4 // 8
    probed = budget_grid_map(model, names, batches, ByteTarget(bytes=cheapest + table_extra), grids, grids[0])
    assert probed.types["lm_head"] == grid_label(grids[1])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("int3_weight_only", r"give a list of grids"),
        ([{"scheme": "gguf_q4_0"}], r"budget_grids\[0\].scheme='gguf_q4_0': a byte budget chooses among torchao"),
        (
            [{"scheme": "int8_dynact_int4_weight", "group_size": 32}],
            r"budget_grids\[0\].scheme='int8_dynact_int4_weight'",
        ),
        (
            [{"scheme": "int3_weight_only", "group_size": 48}],
            r"budget_grids\[0\].group_size=48: int3_weight_only takes a group size",
        ),
        ([{"scheme": "int3_weight_only", "groups": 32}], r"budget_grids\[0\]=.*give a scheme name or"),
    ],
)
def test_bad_grids_name_the_entry_and_the_fix(value, message):
    with pytest.raises(ConfigError, match=message):
        resolve_grids(value, "budget_grids")


def test_a_torchao_run_with_target_bytes_trains_and_exports_the_budgeted_grids(tiny_cfg, tmp_path):
    from callbacks.qat import QuantizationAwareTraining

    overrides = ["callbacks=qat", "callbacks.qat.scheme=int3_weight_only", "callbacks.qat.group_size=32"]
    overrides += ["callbacks.qat.skip=['*norm*']", "callbacks.qat.modules=[linear,embedding]", "trainer.max_steps=2"]
    overrides += ["eval.enabled=false", "+callbacks.qat.target_bytes=60000"]
    overrides += [
        "+callbacks.qat.budget_grids=[{scheme: int2_weight_only, group_size: 32}, int4_weight_only, int8_weight_only]"
    ]
    _, objects = train(tiny_cfg(*overrides))
    (qat,) = [cb for cb in objects["trainer"].callbacks if isinstance(cb, QuantizationAwareTraining)]
    chosen = qat.type_map
    assert chosen.budget == 60000 and chosen.file_bytes <= 60000
    assert len(set(chosen.types.values())) > 1  # binding: neither all int8 nor all int2 at this budget
    assert all(grid_label(qat.spec.scheme_for(n)) == label for n, label in chosen.types.items())  # trained on it
    folder = tmp_path / "student_quantized"
    meta = json.loads((folder / "quantization.json").read_text())
    assert {g for g, _, _ in meta["module_schemes"]} == set(chosen.types)  # the file holds the map it trained on
    assert disk_bytes(folder) <= 60000


def test_the_estimate_stays_above_the_file_for_thirty_layers_with_the_tokenizer(tmp_path, tiny_teacher):
    """SmolLM2's 30 layers and module names (the records repeat them), narrow: ~200 quantized tensors."""
    from distill.compress.quant.grid_budget import choose_grids, measure_grids

    def deep() -> torch.nn.Module:
        return tiny_llama(vocab_size=512, hidden_size=192, intermediate_size=384, num_hidden_layers=30).eval()

    model = deep()
    names = schemes.targets(model, SKIP, KINDS)
    measured = measure_grids(model, names, [torch.randint(0, 512, (2, 32))], DEFAULT_GRIDS, None)
    chosen = choose_grids(model, measured, 8.0, tiny_teacher.tokenizer)
    spec = budget_spec(chosen)
    out = save_quantized(schemes.ptq(deep(), spec), tiny_teacher.tokenizer, tmp_path / "q", spec)
    assert disk_bytes(out) <= chosen.file_bytes <= chosen.budget
    assert chosen.file_bytes - disk_bytes(out) < 16384
