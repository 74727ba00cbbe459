"""Compression under sharding: QAT under ``trainer=fsdp_sim`` (and ZeRO-3), and the refusals that remain.

QAT fake-quantizes the student before the strategy wraps it, trains sharded (FSDP gathers each unit's weights
before its forward, so the fake quantizer rounds whole rows), and converts the *gathered* student on rank 0
(``finish_gathered``). The export of 2 ranks with batch b must equal one process with batch 2b: the trained
fp32 weights to 1e-4, and the exported grid values code for code, up to the few values that end one grid step
apart (a weight 1e-7 from a rounding boundary in one run lands on the other side in the other; the DDP and
ZeRO-2 QAT tests allow the same 1 %).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import gguf
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill.compress.quant.qat import fake_quantized
from distill.compress.quant.row_embedding import RowRoundedEmbedding
from distill.config import ConfigError
from distill.recipe.strategies import check_sharded_callbacks
from tests.conftest import compose_cfg
from tests.helpers import (
    SGD,
    SIM_RUN,
    assert_killed_run_resumes,
    assert_sharded_run_matches,
    read_metrics,
    run_train_cli,
    series,
)
from train import train

# llama.cpp grids on every matrix of the smoke student: Q4_0 by default (the tied embedding and head too), Q4_K
# on the 256-wide down projection rows (K-quants need rows of 256), Q8_0 on the attention output.
QAT_GGUF = [
    "callbacks=qat",
    "callbacks.qat.scheme=gguf_q4_0",
    "callbacks.qat.group_size=null",
    "callbacks.qat.modules=[linear,embedding]",
    "callbacks.qat.skip=['*norm*']",
    "+callbacks.qat.gguf_types={*.mlp.down_proj:q4_k,*.self_attn.o_proj:q8_0}",
    "student.intermediate_size=256",
    "student.tie_word_embeddings=true",
    "export.formats=[hf,gguf]",
]
PROBE = "+callbacks.probe._target_=tests.runtime.test_fsdp_compress.FakeQuantProbe"
OFF_GRID_SHARE = 0.01  # values one grid step apart allowed, as in the DDP/ZeRO-2 QAT test (measured there 0.15 %)
SUB_BLOCK = {"q3_k": 16}  # the run of values that shares one step: a block, or a K-quant's sub-block (else 32)


class FakeQuantProbe(pl.Callback):
    """Print, per rank, how many fake-quant calls saw a weight not whole, and the grid each module trains on."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calls, self.partial = 0, 0
        kinds = {}
        for name, module in fake_quantized(pl_module.student).items():
            quantizer = module.weight_fake_quantizer
            kinds[name.replace("_fsdp_wrapped_module.", "")] = getattr(quantizer, "kind", type(quantizer).__name__)
            if isinstance(module, RowRoundedEmbedding):  # whole rows of the table, as many as looked up
                whole = (None, module.embedding_dim)
            elif isinstance(module, torch.nn.Embedding):
                whole = (module.num_embeddings, module.embedding_dim)
            else:
                whole = (module.out_features, module.in_features)
            quantizer.register_forward_pre_hook(self._count(whole))
        print(f"rank {trainer.global_rank} grid kinds {json.dumps(kinds, sort_keys=True)}", flush=True)

    def _count(self, whole: tuple[int | None, int]) -> Any:
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            shape = tuple(args[0].shape)
            self.calls += 1
            self.partial += shape != whole if whole[0] is not None else shape[-1] != whole[1]

        return hook

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print(f"rank {trainer.global_rank} fake-quant calls {self.calls} not whole {self.partial}", flush=True)


def _fsdp(run: Path, *extra: str) -> list[str]:
    return [*SIM_RUN, "trainer=fsdp_sim", "data.batch_size=2", f"hydra.run.dir={run}", *extra]


def _step_bound(values: np.ndarray, run: int) -> np.ndarray:
    """Per value, the smallest gap between distinct values of its run of ``run`` (one grid step or more)."""
    blocks = np.sort(values.reshape(-1, run), axis=-1)
    gaps = np.diff(blocks, axis=-1)
    gaps = np.where(gaps > 0, gaps, np.inf).min(axis=-1, keepdims=True)
    return np.broadcast_to(gaps, blocks.shape).reshape(values.shape)


def grid_differences(a: np.ndarray, b: np.ndarray, kind: str, name: str) -> int:
    """How many values of two grid tensors differ (> 1e-4); each must be at most one step of its block apart."""
    off = np.abs(a - b) > 1e-4
    bound = _step_bound(a, SUB_BLOCK.get(kind, 32)) * 1.001 + 1e-7
    assert (np.abs(a - b)[off] <= bound[off]).all(), f"{name}: values more than one grid step apart"
    return int(off.sum())


def assert_same_grid_values(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], kinds: dict[str, str | None]
) -> tuple[int, int]:
    """Tensors ``a`` and ``b`` alike: grid ones code for code up to one-step misses, the others to 1e-4.

    A full-precision tensor trained beside a grid may also move by a little more than 1e-4 where a grid value
    (or, with ``int8_dynact_*``, an activation) landed one step apart; such values count in the same share.
    Returns (grid values one step apart, grid values in all).
    """
    assert set(a) == set(b)
    off = total = near = values = 0
    for name, kind in kinds.items():
        assert a[name].shape == b[name].shape, name
        if kind is None:
            diff = np.abs(a[name] - b[name])
            assert diff.max() <= 1e-3, (name, float(diff.max()))
            near, values = near + int((diff > 1e-4).sum()), values + a[name].size
            continue
        off += grid_differences(a[name], b[name], kind, name)
        total += a[name].size
    assert total and off <= OFF_GRID_SHARE * total, (off, total)
    assert near <= OFF_GRID_SHARE * values, (near, values)
    return off, total


def gguf_tensors(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a GGUF file dequantized by gguf-py (llama.cpp's arithmetic), and its type."""
    reader = gguf.GGUFReader(file)
    values = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32) for t in reader.tensors}
    return values, {t.name: t.tensor_type.name for t in reader.tensors}


def _grid_of_gguf_type(name: str) -> str | None:
    return None if name in ("F32", "F16") else name.lower()


def _qat(trainer: pl.Trainer) -> Any:
    return next(cb for cb in trainer.callbacks if getattr(cb, "stage", None) == "qat")


def _checkpoint_student(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}


def assert_qat_run_matches(run: Path, single_dir: Path, single: dict, out: str, masters: bool = True) -> dict[str, Any]:
    """A 2-rank QAT run against one process with twice the batch: losses, fp32 masters, HF export, GGUF file.

    ``masters``: compare the fp32 weights of the last checkpoint (a plain file: FSDP's full state dict).

    Returns the counts of grid values one step apart in the HF export and in the GGUF file.
    """
    # Fake-quant ran on whole weights on both ranks, and both trained on the one-process grids.
    for rank in (0, 1):
        calls, partial = map(int, re.search(rf"rank {rank} fake-quant calls (\d+) not whole (\d+)", out).groups())
        assert calls > 0 and partial == 0, (rank, calls, partial)
    maps = [json.loads(m) for m in re.findall(r"rank \d grid kinds (\{[^}]*\})", out)]
    assert len(maps) == 2 and maps[0] == maps[1] and maps[0]
    trained = _qat(single["trainer"]).gguf_types
    assert {f"{n}.weight": k for n, k in maps[0].items()} == trained
    # The losses with fake-quant in the forward, then the fp32 weights before convert rounds them (last.ckpt).
    sharded_val, single_val = (dict(series(read_metrics(d), "val/loss")) for d in (run, single_dir))
    assert len(sharded_val) == 2 and sharded_val == pytest.approx(single_val, rel=1e-4)
    if masters:
        sharded_masters, own_masters = _checkpoint_student(run), _checkpoint_student(single_dir)
        assert set(sharded_masters) == set(own_masters) and len(own_masters) > 5
        for k, v in own_masters.items():
            torch.testing.assert_close(sharded_masters[k], v, rtol=1e-4, atol=1e-4)
    # The HF export holds the grid values: the gathered student was converted, not its shards.
    a = {k: v.numpy() for k, v in load_file(run / "student" / "model.safetensors").items()}
    b = {k: v.numpy() for k, v in load_file(single_dir / "student" / "model.safetensors").items()}
    hf = assert_same_grid_values(a, b, {k: trained.get(k) for k in b})
    # The GGUF file: the same tensors and types (the recorded per-weight ones), the same codes.
    (file,) = (run / "student_gguf").glob("*.gguf")
    (own_file,) = (single_dir / "student_gguf").glob("*.gguf")
    (va, ta), (vb, tb) = gguf_tensors(file), gguf_tensors(own_file)
    assert ta == tb and {"Q4_0", "Q4_K", "Q8_0", "F32"} <= set(ta.values()), ta
    in_file = assert_same_grid_values(va, vb, {k: _grid_of_gguf_type(t) for k, t in tb.items()})
    return {"hf": hf, "gguf": in_file}


@pytest.mark.ddp
def test_qat_on_llama_cpp_grids_under_fsdp_exports_what_one_process_with_twice_the_batch_exports(
    tiny_cfg, tmp_path, cache_dir
):
    run = tmp_path / "fsdp"
    proc = run_train_cli(_fsdp(run, *SGD, *QAT_GGUF, PROBE), tmp_path, cache_dir)
    out = proc.stdout + proc.stderr
    assert "FullyShardedDataParallel" in out and "gathered the sharded student on rank 0" in out
    assert "rank 1 builds the teacher and student empty" in out  # prepared on meta, filled from rank 0
    single_cfg = tiny_cfg(*SIM_RUN[1:], *SGD, *QAT_GGUF, PROBE, "data.batch_size=4", output_dir=tmp_path / "single")
    _, single = train(single_cfg)
    counts = assert_qat_run_matches(run, tmp_path / "single", single, out)
    print("values one grid step apart (HF export, GGUF file):", counts)
    # The file is the converted student: it reloads with the student's logits.
    drift = float(re.search(r"against the student max \|Δlogit\| ([0-9.e+-]+)", out).group(1))
    assert drift <= 1e-4


@pytest.mark.ddp
@pytest.mark.slow  # a 2-rank run and one process
def test_learned_block_scales_under_fsdp_export_what_one_process_exports(tiny_cfg, tmp_path, cache_dir):
    """The scales are Parameters of their own: sharded, trained, gathered and written as one process does."""
    learned = [*QAT_GGUF, "callbacks.qat.learn_scales=true", "callbacks.qat.scale_gain=100"]
    run = tmp_path / "fsdp"
    proc = run_train_cli(_fsdp(run, *SGD, *learned, PROBE), tmp_path, cache_dir)
    out = proc.stdout + proc.stderr
    assert "gathered the sharded student on rank 0" in out
    single_cfg = tiny_cfg(*SIM_RUN[1:], *SGD, *learned, PROBE, "data.batch_size=4", output_dir=tmp_path / "single")
    _, single = train(single_cfg)
    blocks = _qat(single["trainer"]).gguf_blocks
    assert blocks and {"q4_0", "q8_0"} <= {_qat(single["trainer"]).gguf_types[n] for n in blocks}
    masters = _checkpoint_student(run)
    assert any(k.endswith("weight_fake_quantizer.log_ratio") for k in masters)  # compared below with the rest
    assert_qat_run_matches(run, tmp_path / "single", single, out)
    drift = float(re.search(r"against the student max \|Δlogit\| ([0-9.e+-]+)", out).group(1))
    assert drift <= 1e-4


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_sim", "deepspeed_stage_3", "deepspeed_sim"])
@pytest.mark.parametrize("stage", ["share", "lowrank", "qat"])
def test_one_shot_stages_under_sharding_run_from_the_first_step_only(stage, strategy):
    cfg = compose_cfg([f"trainer={strategy}", f"callbacks={stage}"], Path("/tmp/u"), Path("/tmp/u"))
    check_sharded_callbacks(cfg.trainer, cfg.callbacks)  # start_step 0: changed before the strategy wraps it
    cfg = compose_cfg(
        [f"trainer={strategy}", f"callbacks={stage}", f"callbacks.{stage}.start_step=3"], Path("/u"), Path("/u")
    )
    with pytest.raises(ConfigError, match=rf"callbacks.{stage}.start_step=3: under .*after the strategy wrapped"):
        check_sharded_callbacks(cfg.trainer, cfg.callbacks)


@pytest.mark.ddp
@pytest.mark.slow  # one 2-rank run of the recipe with its end-of-run report (~2 min on 2 loaded cores)
def test_qad_q4_mix_runs_end_to_end_under_fsdp_with_one_type_map_on_every_rank(tmp_path, cache_dir):
    from tests.test_experiments import TINY_RUN

    run = tmp_path / "qad"
    args = ["experiment=qad_q4_mix", *TINY_RUN, "trainer=fsdp_sim", PROBE, f"hydra.run.dir={run}"]
    proc = run_train_cli(args, tmp_path, cache_dir)
    out = proc.stdout + proc.stderr
    # target_ratio: rank 0 chose the types from the whole student (rank 1 held it empty) and sent them; both
    # ranks trained on that one map, fake-quantizing whole weights.
    maps = [json.loads(m) for m in re.findall(r"rank \d grid kinds (\{[^}]*\})", out)]
    assert len(maps) == 2 and maps[0] == maps[1] and maps[0], maps
    for rank in (0, 1):
        calls, partial = map(int, re.search(rf"rank {rank} fake-quant calls (\d+) not whole (\d+)", out).groups())
        assert calls > 0 and partial == 0
    report = json.loads((run / "report.json").read_text())
    assert report["run"]["recipe"] == "qad_q4_mix" and report["run"]["steps"] == 10
    assert report["run"]["gguf_max_abs_logit_vs_student"] <= 1e-4  # the file is the converted gathered student
    assert report["run"]["artifact"] == str(run / "student_gguf")
    (file,) = (run / "student_gguf").glob("*.gguf")
    _, types = gguf_tensors(file)
    grids = set(maps[0].values())
    assert {t.lower() for t in types.values()} - {"f32"} == grids  # the file holds the trained per-weight types
    assert report["metrics"]["student"]["heldout/ppl"] > 0


@pytest.mark.ddp
@pytest.mark.slow  # two 2-rank-sized runs
def test_torchao_qat_with_frozen_ranges_under_fsdp_exports_what_one_process_exports(tiny_cfg, tmp_path, cache_dir):
    # The ranges are frozen at step 2 from whole weights (params_whole gathers them for the moment); the export
    # holds the int4 grid values of the gathered student, converted with those ranges.
    qat = ["callbacks=qat", "callbacks.qat.freeze_ranges_step=2", "student.tie_word_embeddings=true"]
    run = tmp_path / "fsdp"
    proc = run_train_cli(_fsdp(run, *SGD, *qat, PROBE), tmp_path, cache_dir)
    single_cfg = tiny_cfg(*SIM_RUN[1:], *SGD, *qat, "data.batch_size=4", output_dir=tmp_path / "single")
    _, single = train(single_cfg)
    frozen = _qat(single["trainer"])._frozen
    assert frozen  # the one-process run froze its ranges at step 2
    a = {k: v.numpy() for k, v in load_file(run / "student" / "model.safetensors").items()}
    b = {k: v.numpy() for k, v in load_file(tmp_path / "single" / "student" / "model.safetensors").items()}
    grids = {f"{n}.weight": "int4" for n in frozen}
    counts = assert_same_grid_values(a, b, {k: grids.get(k) for k in b})
    print("int4 values one grid step apart, of all:", counts)
    assert "rank 1 fake-quant calls" in proc.stdout + proc.stderr
    sharded_val, single_val = (dict(series(read_metrics(d), "val/loss")) for d in (run, tmp_path / "single"))
    assert len(sharded_val) == 2 and sharded_val == pytest.approx(single_val, rel=1e-4)


@pytest.mark.ddp
@pytest.mark.slow  # a 2-rank ZeRO-3 run and one process
def test_qat_on_llama_cpp_grids_under_zero3_exports_what_one_process_exports(tiny_cfg, tmp_path, cache_dir):
    pytest.importorskip("deepspeed")
    run = tmp_path / "zero3"
    args = [*SIM_RUN, "trainer=deepspeed_sim", "data.batch_size=2", f"hydra.run.dir={run}", *SGD, *QAT_GGUF, PROBE]
    proc = run_train_cli(args, tmp_path, cache_dir)
    out = proc.stdout + proc.stderr
    assert "gathered the sharded student on rank 0" in out
    single_cfg = tiny_cfg(*SIM_RUN[1:], *SGD, *QAT_GGUF, PROBE, "data.batch_size=4", output_dir=tmp_path / "single")
    _, single = train(single_cfg)
    # DeepSpeed writes its checkpoint as partitions, so the fp32 masters are compared through the export instead.
    counts = assert_qat_run_matches(run, tmp_path / "single", single, out, masters=False)
    print("values one grid step apart under ZeRO-3 (HF export, GGUF file):", counts)


ONE_SHOT = {
    # Two layers tied into one block with a LoRA delta each, started from the SVD of each layer's residual (which
    # rank 1, holding the student empty, cannot compute: it gets rank 0's values when FSDP wraps it).
    "share": [
        "callbacks=share",
        "student.num_layers=2",
        "callbacks.share.pattern=all",
        "callbacks.share.lora_rank=2",
        "callbacks.share.lora_init=svd",
    ],
    # Ranks for half the parameters, from the singular values rank 0 computes and sends.
    "lowrank": ["callbacks=lowrank", "callbacks.lowrank.param_budget=0.5"],
}


@pytest.mark.ddp
@pytest.mark.slow  # a 2-rank run and one process each (~3 min on 2 loaded cores)
@pytest.mark.parametrize("trainer", ["fsdp_sim", "deepspeed_sim"])
@pytest.mark.parametrize("stage", ["share", "lowrank"])
def test_sharing_and_low_rank_under_sharding_export_what_one_process_exports(
    stage, trainer, tiny_cfg, tmp_path, cache_dir
):
    if trainer == "deepspeed_sim":
        pytest.importorskip("deepspeed")
    run = tmp_path / trainer
    extra = [*SGD, *ONE_SHOT[stage]]
    args = [*SIM_RUN, f"trainer={trainer}", "data.batch_size=2", f"hydra.run.dir={run}", *extra]
    out = run_train_cli(args, tmp_path, cache_dir)
    assert "gathered the sharded student on rank 0" in out.stdout + out.stderr
    single_cfg = tiny_cfg(*SIM_RUN[1:], *extra, "data.batch_size=4", output_dir=tmp_path / "single")
    _, single = train(single_cfg)
    assert [c["kind"] for c in single["module"].structure] == [stage]
    # The plain export (ties cloned, factors multiplied back) and the compact one (each shared tensor once, the
    # factors) hold the one-process weights.
    for folder in ("student", "student_compact"):
        a, b = (load_file(d / folder / "model.safetensors") for d in (run, tmp_path / "single"))
        assert set(a) == set(b) and a
        for k, v in b.items():
            torch.testing.assert_close(a[k], v, rtol=1e-4, atol=1e-4, msg=f"{folder}: {k}")
    sharded_val, single_val = (dict(series(read_metrics(d), "val/loss")) for d in (run, tmp_path / "single"))
    assert len(sharded_val) == 2 and sharded_val == pytest.approx(single_val, rel=1e-4)


# Progressive pruning of a 3-layer student (4 heads in 2 KV groups, 64 channels) to 2 layers, 2 heads and 32
# channels on a cubic schedule over steps 1 to 3, scored on the activations of the batch before each cut.
PRUNE = [
    "callbacks=prune",
    "student.num_layers=3",
    "student.num_heads=4",
    "student.num_kv_heads=2",
    "student.intermediate_size=64",
    "callbacks.prune.heads=2",
    "callbacks.prune.channels=0.5",
    "callbacks.prune.layers=2",
    "callbacks.prune.start_step=1",
    "callbacks.prune.end_step=3",
    "callbacks.prune.every_n_steps=1",
    "callbacks.prune.calib_batches=1",
]
MOMENTUM = "+distill.optimizer.momentum=0.9"  # SGD's momentum buffers: the optimizer state each cut must carry


@pytest.mark.slow  # two gloo ranks and two cuts (about 30 s); QAT under FSDP stays in the default suite
@pytest.mark.ddp
def test_progressive_pruning_under_fsdp_exports_what_one_process_with_twice_the_batch_exports(
    tiny_cfg, tmp_path, cache_dir
):
    # Each cut gathers the student on rank 0, cuts it there and on rank 1's empty copy, wraps it again and
    # reloads the momentum of the surviving rows and columns, resharded. A lost or misplaced buffer, or a
    # different cut on one rank, would change the weights below.
    run = tmp_path / "fsdp"
    proc = run_train_cli(_fsdp(run, *SGD, MOMENTUM, *PRUNE), tmp_path, cache_dir)
    out = proc.stdout + proc.stderr
    single_cfg = tiny_cfg(*SIM_RUN[1:], *SGD, MOMENTUM, *PRUNE, "data.batch_size=4", output_dir=tmp_path / "single")
    _, single = train(single_cfg)
    # The same units cut at the same steps: the 2-rank run's structure log (in its checkpoint) is the one-process one.
    structure = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "student_structure"
    ]
    assert len(structure) >= 2 and structure == single["module"].structure
    last = ast.literal_eval(re.findall(r"pruned at step \d: (\{[^}]*\})", out)[-1])
    assert (last["layers"], last["heads"], last["channels"]) == (2, 2, 32)
    assert last["params"] == sum(p.numel() for p in single["student"].parameters())  # the whole student's
    assert_sharded_run_matches(run, tmp_path / "single", single, out)


@pytest.mark.ddp
@pytest.mark.slow  # three 2-rank runs that prune
def test_a_killed_fsdp_pruning_run_resumes_to_the_uninterrupted_weights(tmp_path, cache_dir):
    # Killed at step 3, after two cuts: the resumed run rebuilds the pruned shapes before FSDP's checkpoint
    # loads into them (restructure_for_checkpoint), then cuts once more, as the uninterrupted run did.
    def args(run: Path, *extra: str) -> list[str]:
        return _fsdp(run, *PRUNE, *extra)

    assert_killed_run_resumes(args, tmp_path, cache_dir)
