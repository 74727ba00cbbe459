"""llama.cpp's own encoders in numpy, pinned byte for byte by fixtures that llama.cpp's library wrote.

``tests/fixtures/llama_cpp_quants.npz`` comes from ``bench/llama_cpp_fixtures.py`` (ggml-base built from
llama.cpp's sources, called through ctypes): five small tensors (random normal, normal with outliers, a
row of the embedded teacher's ``blk.3.ffn_down``, rows built for the rare branches, and rows on which a port
that sums in another order or rounds ties away from zero goes wrong), an importance vector for each, and
the bytes of every type with and without it.
"""

from __future__ import annotations

import math
from functools import cache

import gguf
import numpy as np
import pytest
import torch

from distill.compress.quant import llama_quants
from distill.compress.quant.gguf_grid import (
    K_KINDS,
    ROW_BYTES,
    GGUFBlockFakeQuantizer,
    encode,
    encode_weights,
    fake_quantize,
)
from distill.compress.quant.qat import prepare
from distill.compress.quant.schemes import make_spec
from distill.export import gguf as gguf_export
from tests.conftest import ROOT
from tests.helpers import tiny_llama

FIXTURES = ROOT / "tests" / "fixtures" / "llama_cpp_quants.npz"
TENSORS = ("normal", "outliers", "teacher_down_proj", "edge", "sensitive")


@cache
def fixtures() -> dict[str, np.ndarray]:
    with np.load(FIXTURES) as data:
        return {k: data[k] for k in data.files}


def _decode(blocks: np.ndarray, kind: str) -> np.ndarray:
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind.upper()])


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", llama_quants.KINDS)
def test_llama_cpp_bytes_are_reproduced_byte_for_byte(kind, imatrix):
    data = fixtures()
    for name in TENSORS:
        x, importance = data[f"{name}.x"], data[f"{name}.importance"]
        want = data[f"{name}.{kind}" + (".imatrix" if imatrix else "")]
        got = llama_quants.quantize(x, kind, importance if imatrix else None)
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {kind}")
        if name != "edge":  # the fixtures hold real roundings: close to the input, not bytes of anything
            assert np.abs(_decode(want, kind) - x).max() < 0.6 * np.abs(x).max()


def test_importance_moves_the_rounding_toward_the_weighted_error():
    # With an importance vector llama.cpp minimises the importance-weighted error; both fixtures show it.
    data = fixtures()
    for name in ("normal", "outliers", "teacher_down_proj"):
        x, importance = data[f"{name}.x"], data[f"{name}.importance"]
        for kind in ("q4_k", "q3_k", "iq4_nl"):
            plain, weighted = (_decode(data[f"{name}.{kind}{s}"], kind) for s in ("", ".imatrix"))
            assert (importance * (weighted - x) ** 2).sum() < (importance * (plain - x) ** 2).sum(), (name, kind)


def test_iq4_nl_bytes_are_an_fp16_scale_and_nibbles_into_the_level_table():
    blocks = fixtures()["normal.iq4_nl"].reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    codes = np.concatenate([blocks[:, 2:] & 15, blocks[:, 2:] >> 4], axis=1)  # first 16 low nibbles, then high
    by_hand = d * llama_quants.IQ4_NL_VALUES[codes]
    assert np.array_equal(_decode(fixtures()["normal.iq4_nl"], "iq4_nl").reshape(-1, 32), by_hand)


@pytest.mark.parametrize("kind", K_KINDS)
def test_the_export_rounds_untrained_blocks_as_llama_cpp_and_keeps_trained_ones(kind):
    data = fixtures()
    for name in ("normal", "teacher_down_proj"):  # off the grid everywhere: llama.cpp's bytes throughout
        np.testing.assert_array_equal(encode_weights(data[f"{name}.x"], kind), data[f"{name}.{kind}"])
        np.testing.assert_array_equal(gguf_export.encode(data[f"{name}.x"], kind), data[f"{name}.{kind}"])
    x = data["outliers.x"].copy()  # 2 rows of 2 super-blocks
    trained = fake_quantize(torch.from_numpy(x), kind).numpy()
    x[1, 256:] = trained[1, 256:]  # one super-block a QAT student trained on the grid
    out = encode_weights(x, kind)
    want, size = data[f"outliers.{kind}"], ROW_BYTES[kind]
    np.testing.assert_array_equal(out[0], want[0])
    np.testing.assert_array_equal(out[1, :size], want[1, :size])
    np.testing.assert_array_equal(out[1, size:], encode(trained, kind)[1, size:])
    assert np.array_equal(_decode(out, kind)[1, 256:], trained[1, 256:])  # written exactly as trained
    assert not np.array_equal(encode(x, kind)[0], want[0])  # the grid rule alone would round row 0 otherwise


def _weighted_error(x, w, scale, low, codes) -> float:
    """Σ w·(scale·code + low − x)², one element at a time in float64: the obviously correct reference."""
    return math.fsum(
        float(w[i]) * (float(scale) * float(codes[i]) + float(low) - float(x[i])) ** 2 for i in range(len(x))
    )


def _blocks(size: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    blocks = rng.normal(0, 0.02, (6, size)).astype(np.float32)
    blocks[4, 3] = 0.3  # an outlier stretches the range
    blocks[5] = np.abs(blocks[5]) - 0.01  # mostly positive, a few below 0
    return blocks


def test_q4_k_search_fits_each_sub_block_at_least_as_well_as_the_grid_rule():
    blocks = _blocks(32)
    xs = np.ascontiguousarray(blocks.T)
    w = np.sqrt((xs * xs).sum(0) / 32) + np.abs(xs)  # llama.cpp's weights for Q4_K without importance
    scale, neg_min, codes = llama_quants.make_qkx(xs, w, 15, -1.0, 0.1, 20)
    total = {"search": 0.0, "grid": 0.0}
    for j, x in enumerate(blocks):
        low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)  # the grid rule: range over 15 steps
        step = (high - low) / 15
        grid_codes = [min(15, max(0, math.floor((float(v) - low) / step + 0.5))) for v in x]
        grid = _weighted_error(x, w[:, j], step, low, grid_codes)
        search = _weighted_error(x, w[:, j], scale[j], -neg_min[j], codes[:, j])
        assert search <= grid * (1 + 1e-6), j
        total["search"] += search
        total["grid"] += grid
    assert total["search"] < 0.95 * total["grid"]


def test_q3_k_search_fits_each_sub_block_at_least_as_well_as_the_grid_rule():
    blocks = _blocks(16)
    scale, codes = llama_quants.make_q3(np.ascontiguousarray(blocks.T))
    total = {"search": 0.0, "grid": 0.0}
    for j, x in enumerate(blocks):
        w = x.astype(np.float64) ** 2  # make_q3_quants weighs by x²
        top = float(x[np.abs(x).argmax()])
        step = top / -4  # the grid rule: the largest magnitude at code -4
        grid_codes = [min(3, max(-4, round(float(v) / step))) for v in x]
        grid = _weighted_error(x, w, step, 0.0, grid_codes)
        search = _weighted_error(x, w, scale[j], 0.0, codes[:, j] - 4)
        assert search <= grid * (1 + 1e-6), j
        total["search"] += search
        total["grid"] += grid
    assert total["search"] < total["grid"]


def test_llama_cpp_rounding_keeps_random_weights_closer_than_the_grid_rule():
    x = np.random.default_rng(4).normal(0, 0.02, (16, 1024)).astype(np.float32)
    ratio = {}
    for kind in K_KINDS:
        ours = _decode(llama_quants.quantize(x, kind), kind)
        grid = fake_quantize(torch.from_numpy(x), kind).numpy()
        ratio[kind] = float(np.square(ours - x).sum() / np.square(grid - x).sum())
    assert ratio["q4_k"] < 0.9 and ratio["q3_k"] < 0.98  # measured 0.82 and 0.95


NAME = "model.layers.3.mlp.down_proj.weight"


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("kind", ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q4_k", "q3_k"])
def test_fake_quantize_refuses_inf_and_nan_naming_the_weight(kind, bad):
    w = torch.randn(8, 512)
    w[5, 17] = bad
    with pytest.raises(ValueError, match=rf"^weight {NAME} holds 1 non-finite value \({bad} at row 5, col 17\); "):
        fake_quantize(w, kind, NAME)
    with pytest.raises(ValueError, match=rf"^weight {NAME} holds 1 non-finite"):
        GGUFBlockFakeQuantizer(kind, NAME)(w.requires_grad_(True))


def test_every_encoder_refuses_inf_and_nan_naming_the_weight():
    x = np.random.default_rng(0).normal(0, 0.02, (4, 512)).astype(np.float32)
    x[2, 300], x[3, 7] = np.nan, np.inf
    message = rf"^weight {NAME} holds 2 non-finite values \(nan at row 2, col 300\); .*block's scale"
    for kind in K_KINDS:
        for encoder in (encode, encode_weights, llama_quants.quantize):
            with pytest.raises(ValueError, match=message):
                encoder(x, kind, name=NAME)
    for kind in ("q8_0", "q4_0", "q4_1", "q4_k"):  # the GGUF export's encoder, gguf-py's types included
        with pytest.raises(ValueError, match=message):
            gguf_export.encode(x, kind, NAME)
    assert gguf_export.encode(x, "f32", NAME) is not None  # float types store inf and NaN as they are
    with pytest.raises(ValueError, match=r"^the weight holds 2 non-finite values"):
        llama_quants.quantize(x, "iq4_nl")
    with pytest.raises(ValueError, match=r"^weight w importance holds 1 non-finite value \(inf at index 3\)"):
        llama_quants.quantize(x[:2], "q4_k", np.where(np.arange(512) == 3, np.inf, 1).astype(np.float32), "w")


def test_a_qat_student_whose_weight_went_non_finite_is_named_in_the_forward():
    model = tiny_llama()
    prepare(model, make_spec("gguf_q4_0", None, ["*norm*"]))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[9, 40] = math.inf
    with pytest.raises(
        ValueError, match=r"^weight model.layers.1.mlp.up_proj.weight holds 1 .*\(inf at row 9, col 40\)"
    ):
        model(input_ids=torch.tensor([[1, 2, 3]]))
