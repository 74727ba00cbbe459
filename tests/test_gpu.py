"""On a GPU: the llama.cpp grids round as on the CPU, and a tiny run trains in bf16 and exports what it trained.

Marked ``gpu`` (left out of the default suite) and skipped where torch sees no CUDA device:
``pytest -m gpu tests/test_gpu.py`` on a machine with one.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("kind", ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q4_k", "q3_k", "iq4_nl"])
def test_the_gguf_grids_round_on_the_gpu_exactly_as_on_the_cpu(kind):
    from distill.compress.quant.gguf_grid import fake_quantize

    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fake_quantize(weight.cuda(), kind).cpu(), fake_quantize(weight, kind), rtol=0, atol=0)


def test_a_tiny_run_trains_on_the_gpu_in_bf16_and_exports_what_it_trained(tiny_cfg, tmp_path):
    from train import train

    cfg = tiny_cfg("trainer=gpu", "trainer.max_steps=4", "eval.tasks=[]", "eval.speed_runs=1")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 4
    assert next(objects["student"].parameters()).is_cuda
    assert (tmp_path / "student" / "model.safetensors").is_file()
    assert metrics["heldout/student/top1_agreement"] >= 0
