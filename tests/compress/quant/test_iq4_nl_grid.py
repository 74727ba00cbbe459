"""IQ4_NL as a QAT grid: fp16 scale times llama.cpp's 16 non-linear levels, a fixed point of itself and of llama.cpp.

The fixtures (``tests/fixtures/llama_cpp_quants.npz``, from ``bench/llama_cpp_fixtures.py``) hold llama.cpp's own
IQ4_NL bytes of rows already on this grid (``iq4_nl_grid``), with and without an importance row.
"""

from __future__ import annotations

import math
import time
from functools import cache

import gguf
import numpy as np
import pytest
import torch

from distill.compress.quant import llama_quants
from distill.compress.quant.gguf_grid import (
    FP16_MIN_NORMAL,
    GGUFBlockFakeQuantizer,
    encode,
    encode_weights,
    fake_quantize,
)
from distill.export import gguf as gguf_export
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "llama_cpp_quants.npz"
LEVELS = set(llama_quants.IQ4_NL_VALUES.tolist())


@cache
def fixtures() -> dict[str, np.ndarray]:
    with np.load(FIXTURES) as data:
        return {k: data[k] for k in data.files}


def _decode(blocks: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.IQ4_NL)


def _scales(blocks: np.ndarray) -> np.ndarray:
    """The fp16 scale of each block_iq4_nl (18 bytes: fp16 d, then 16 bytes of nibbles)."""
    return blocks.reshape(-1, 18)[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1)


def _weights(seed: int = 0) -> torch.Tensor:
    """Rows of 32-blocks at every scale from 1e-11 to 1e-1 (fp16-subnormal scales included), zeros, one-signed."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(512, 256, generator=g) * 10 ** (torch.rand(512, 8, 1, generator=g) * 10 - 11).expand(
        512, 8, 32
    ).reshape(512, 256)
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = 0.01  # a constant block
    w[2] = w[2].abs()  # one-signed blocks
    w[3, :5] = 0
    return w


def test_iq4_nl_values_are_levels_times_an_fp16_scale_and_a_fixed_point():
    w = _weights()
    values = fake_quantize(w, "iq4_nl")
    assert not torch.equal(values, w) and values.dtype == w.dtype
    blocks = encode(w.numpy(), "iq4_nl")
    assert blocks.shape == (512, 8 * 18) and blocks.dtype == np.uint8
    assert np.array_equal(_decode(blocks), values.numpy())  # bit for bit what the file holds
    d = _scales(blocks)
    ratios = values.numpy().reshape(-1, 32) / np.where(d == 0, 1, d)[:, None]
    assert set(np.unique(ratios[d != 0]).tolist()) <= LEVELS
    assert (d < FP16_MIN_NORMAL).sum() > 100  # subnormal fp16 scales are exercised
    assert torch.equal(fake_quantize(values, "iq4_nl"), values)  # rounded again, nothing moves
    assert np.array_equal(encode(values.numpy(), "iq4_nl"), blocks)
    assert torch.equal(values[0, :32], torch.zeros(32))
    # Straight-through gradient: the identity.
    p = w.clone().requires_grad_(True)
    (GGUFBlockFakeQuantizer("iq4_nl")(p) * torch.arange(256.0)).sum().backward()
    assert torch.equal(p.grad, torch.arange(256.0).expand(512, 256))


def test_llama_cpp_writes_weights_on_the_iq4_nl_grid_unchanged():
    data = fixtures()
    grid = data["iq4_nl_grid.x"]
    assert np.array_equal(fake_quantize(torch.from_numpy(grid), "iq4_nl").numpy(), grid)  # on this grid
    ours = encode_weights(grid, "iq4_nl")
    assert np.array_equal(_decode(ours), grid)  # what the export writes holds exactly the trained values
    normal = np.abs(_scales(ours)) >= FP16_MIN_NORMAL
    zero = (grid.reshape(-1, 32) == 0).all(1)
    assert normal.sum() > 50 and (~normal & ~zero).sum() >= 2 and zero.any()
    for suffix in ("", ".imatrix"):
        cpp = data[f"iq4_nl_grid.iq4_nl{suffix}"]
        same = (cpp.reshape(-1, 18) == ours.reshape(-1, 18)).all(1)
        # llama.cpp's search finds each block's scale and codes again (importance or not), but for scales in
        # fp16's subnormal range, which it rounds differently: the export writes those blocks' codes itself.
        assert same[normal | zero].all(), suffix
        assert np.array_equal(_decode(cpp).reshape(-1, 32)[normal], grid.reshape(-1, 32)[normal])
        assert not same[~normal & ~zero].all()


def test_the_export_keeps_trained_iq4_nl_blocks_and_rounds_others_as_llama_cpp():
    data = fixtures()
    x = data["outliers.x"].copy()  # 2 rows of 16 blocks, off the grid
    np.testing.assert_array_equal(encode_weights(x, "iq4_nl"), data["outliers.iq4_nl"])
    np.testing.assert_array_equal(gguf_export.encode(x, "iq4_nl"), data["outliers.iq4_nl"])
    trained = fake_quantize(torch.from_numpy(x), "iq4_nl").numpy()
    x[1, 64:160] = trained[1, 64:160]  # three blocks a QAT student trained on the grid
    out = encode_weights(x, "iq4_nl").reshape(2, 16, 18)
    want = data["outliers.iq4_nl"].reshape(2, 16, 18)
    kept = np.zeros((2, 16), bool)
    kept[1, 2:5] = True
    np.testing.assert_array_equal(out[~kept], want[~kept])
    assert np.array_equal(_decode(out.reshape(2, -1))[1, 64:160], trained[1, 64:160])


def test_the_iq4_nl_grid_rounds_closer_than_llama_cpp_and_q4_0():
    # Five trial scales at least squared error: less error than llama.cpp's x²-weighted search on generic
    # weights, and far less than Q4_0's grid at the same 4.5 bits per weight.
    rng = np.random.default_rng(4)
    data = {
        "normal": rng.normal(0, 0.02, (64, 1024)).astype(np.float32),
        "heavy tails": (rng.standard_t(4, (64, 1024)) * 0.02).astype(np.float32),
        "teacher row": fixtures()["teacher_down_proj.x"],
    }
    for name, x in data.items():

        def error(values: np.ndarray, x: np.ndarray = x) -> float:
            return float(np.square(values - x, dtype=np.float64).sum())

        grid = error(fake_quantize(torch.from_numpy(x), "iq4_nl").numpy())
        assert grid < 0.995 * error(_decode(llama_quants.quantize(x, "iq4_nl"))), name  # measured 0.92 to 0.98
        assert grid < 0.8 * error(fake_quantize(torch.from_numpy(x), "q4_0").numpy()), name  # measured 0.64, 0.77


NAME = "model.layers.3.mlp.down_proj.weight"


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_the_iq4_nl_grid_refuses_inf_and_nan_naming_the_weight(bad):
    w = torch.randn(8, 512) * 1e-3  # small blocks take the subnormal-scale trials too
    w[5, 17] = bad
    with pytest.raises(ValueError, match=rf"^weight {NAME} holds 1 non-finite value \({bad} at row 5, col 17\); "):
        fake_quantize(w, "iq4_nl", NAME)
    with pytest.raises(ValueError, match=rf"^weight {NAME} holds 1 non-finite"):
        GGUFBlockFakeQuantizer("iq4_nl", NAME)(w.requires_grad_(True))
    with pytest.raises(ValueError, match=rf"^weight {NAME} holds 1 non-finite"):
        encode_weights(w.detach().numpy(), "iq4_nl", NAME)


def _seconds(fn, repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(576, 576), (49152, 576)], ids=["576x576", "49152x576"])
def test_iq4_nl_fake_quant_forward_costs_a_few_q4_0_forwards(shape):
    # Five trial roundings against Q4_0's one: SmolLM2's square projections and its tied embedding.
    w = torch.randn(*shape) * 0.02
    q4_0 = _seconds(lambda: fake_quantize(w, "q4_0"))
    iq4_nl = _seconds(lambda: fake_quantize(w, "iq4_nl"))
    print(f"{shape}: q4_0 {q4_0 * 1e3:.1f} ms, iq4_nl {iq4_nl * 1e3:.1f} ms, ratio {iq4_nl / q4_0:.2f}")
    assert iq4_nl < 12 * q4_0
