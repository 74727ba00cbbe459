"""The ZeRO-3 gather: a student partitioned by DeepSpeed over 2 CPU ranks (gloo) comes back whole on rank 0.

Lightning's DeepSpeed strategy refuses a CPU accelerator, but DeepSpeed itself partitions on CPU, so the
gather is tested here on ``deepspeed.initialize`` directly; ``bench/gpu_check.sh`` runs it under Lightning.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill.recipe.strategies import without_deepspeed_shm_allreduce
from tests.helpers import free_port, tiny_llama

deepspeed = pytest.importorskip("deepspeed")  # a dev dependency: installed by `make test`

LR = 0.5  # plain SGD: Adam would turn 1e-7 differences in reduced gradients into full steps on tiny ones


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}


def _one_process_step() -> dict[str, torch.Tensor]:
    """The same SGD step on the whole model in one process (each rank sees the same batch, so the means agree)."""
    model = tiny_llama(0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model(**_batch()).loss.backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    without_deepspeed_shm_allreduce()
    try:
        from distill.runtime.gather import gather_student, is_sharded, local_bytes

        model = tiny_llama(0)
        whole = local_bytes(model)
        # Threshold 0: DeepSpeed otherwise keeps parameters under 1e5 elements (all of this model's) whole.
        zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
        }  # DeepSpeed's default clips at 1.0
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        loss = engine(**_batch()).loss
        engine.backward(loss)
        engine.step()
        assert is_sharded(engine) and is_sharded(model)
        assert all(p.numel() == 0 for p in model.parameters())  # placeholders: the gather has work to do
        held = local_bytes(model)
        model.cpu()  # what Lightning's teardown does to the module after fit
        plain = gather_student(engine, model)
        if rank == 0:
            torch.save(
                {
                    "state": plain.state_dict(),
                    "held": held,
                    "whole": whole,
                    "tied": plain.lm_head.weight is plain.model.embed_tokens.weight,
                },
                out,
            )
        else:
            assert plain is None
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow  # ~30 s; the ZeRO-3 export equality in test_deepspeed_sim gathers too
def test_zero3_student_is_gathered_whole_with_its_fp32_masters(tmp_path):
    out = tmp_path / "gathered.pt"
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=2)
    got = torch.load(out, weights_only=False)
    assert got["tied"]  # the tied head is tied again, not a second copy
    assert abs(got["held"] / got["whole"] - 0.5) < 0.02  # each rank held half of every parameter
    want, initial = _one_process_step(), tiny_llama(0).state_dict()
    assert set(got["state"]) == set(want)
    moved = 0
    for key, value in want.items():
        assert got["state"][key].dtype == torch.float32, key
        torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
        moved += int(not torch.equal(value, initial[key]))
    assert moved > len(want) // 2  # the step changed the weights: the gather read the trained masters
