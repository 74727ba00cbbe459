"""QAT under ``trainer.precision=bf16-mixed``: fp32 master weights rounded in fp32, matmuls in bf16 (CPU autocast).

Lightning's bf16-mixed keeps the Parameters in fp32 and runs the step under ``torch.autocast``. A weight fake
quantizer is called on the Parameter itself, so it rounds the fp32 master weight (an elementwise computation that
autocast leaves in fp32); the ``F.linear`` after it is on autocast's list and runs in bf16. The export converts the
fp32 masters, so the GGUF file holds the grid values exactly as the student trained on them (before autocast's
cast to bf16 for the matmul). Every scheme is checked for the dtypes; the run trains, exports and resumes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from distill.compress.quant import schemes
from distill.compress.quant.qat import fake_quantized, prepare
from tests.helpers import assert_same_losses, crash_at, read_metrics, series, tiny_llama
from train import train

# Every llama.cpp grid on one tiny student (rows 256 wide, so the K-quants fit), the tied embedding and head Q4_0.
EVERY_GRID = {
    "*.self_attn.k_proj": "q4_1",
    "*.self_attn.v_proj": "q8_0",
    "*.self_attn.o_proj": "q3_k",
    "*.mlp.up_proj": "iq4_nl",
    "*.mlp.down_proj": "q4_k",
}
QAD = [
    "callbacks=qat",
    "callbacks.qat.scheme=gguf_q4_0",
    "callbacks.qat.group_size=null",
    "callbacks.qat.modules=[linear,embedding]",
    "callbacks.qat.skip=['*norm*']",
    "+callbacks.qat.gguf_types={" + ",".join(f"{k}:{v}" for k, v in EVERY_GRID.items()) + "}",
    "student.hidden_size=256",
    "student.intermediate_size=256",
    "student.tie_word_embeddings=true",
    "distill.objective.chunked=true",  # the default run's loss (V = 49152); the tiny vocabulary would not take it
    "export.formats=[hf,gguf]",
    "eval.enabled=false",
    "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=0",
]
BF16 = "trainer.precision=bf16-mixed"
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu"}


class MatmulDtypes(TorchDispatchMode):
    """Count the matmuls dispatched (after autocast's casts), by op name and the dtype of their inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)})
            self.seen[(name, ",".join(dtypes))] += 1
        return func(*args, **(kwargs or {}))


def _spec(name: str) -> schemes.QuantSpec:
    scheme = schemes.get_scheme(name)
    if scheme.gguf in ("q4_k", "q3_k"):  # rows 256 wide: the K-quant on the down projection, Q4_0 elsewhere
        return schemes.make_spec("gguf_q4_0", None, ["*norm*"], gguf_types={"*.mlp.down_proj": scheme.gguf})
    return schemes.make_spec(name, 32 if scheme.grouped and scheme.gguf is None else None, None)


@pytest.mark.parametrize("name", list(schemes.SCHEMES))
def test_every_scheme_rounds_the_fp32_master_and_multiplies_in_bf16(name):
    model = tiny_llama(vocab_size=512, intermediate_size=256)
    prepare(model, _spec(name))
    down = model.model.layers[0].mlp.down_proj
    seen = {}
    down.weight_fake_quantizer.register_forward_hook(lambda m, args, out: seen.update(w=args[0], q=out))
    down.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    probe = MatmulDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), probe:
        logits = model(input_ids=ids).logits
    assert seen["w"] is down.weight and seen["q"].dtype == torch.float32  # rounded in fp32, on the master
    assert seen["y"].dtype == torch.bfloat16
    assert {dtypes for _, dtypes in probe.seen} == {"bfloat16"}  # every matmul, attention's included
    if schemes.get_scheme(name).act_bits is None:  # weight-only: bf16 of exactly the fp32 grid values
        expected = F.linear(seen["x"].to(torch.bfloat16), seen["q"].to(torch.bfloat16))
        assert torch.equal(seen["y"], expected)
    logits.float().square().mean().backward()
    assert down.weight.grad.dtype == torch.float32 and bool(down.weight.grad.abs().sum() > 0)


class GridProbe(pl.Callback):
    """Record, during training, the dtypes each llama.cpp quantizer gets and gives and its module's output dtype."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, str]] = set()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for module in fake_quantized(pl_module.student).values():
            state = {}
            module.weight_fake_quantizer.register_forward_hook(
                lambda m, args, out, s=state: s.update(w=(args[0].dtype, out.dtype))
            )
            module.register_forward_hook(lambda m, args, out, s=state: self._record(s, out))

    def _record(self, state: dict, out: torch.Tensor) -> None:
        w_in, w_out = state["w"]
        self.seen.add((str(w_in), str(w_out), str(out.dtype)))


def _run(tiny_cfg, out: Path, *extra: str) -> tuple[dict, dict]:
    cfg = tiny_cfg(*QAD, BF16, "trainer.max_steps=4", *extra, output_dir=out)
    with open_dict(cfg):
        cfg.callbacks.grid_probe = {"_target_": "tests.compress.quant.test_bf16_qad.GridProbe"}
    return train(cfg)


@pytest.mark.slow  # one training run with its export (about 15 s on 2 loaded cores)
def test_a_bf16_mixed_qad_run_trains_and_its_gguf_holds_the_fp32_grid_values(tiny_cfg, tmp_path):
    _, objects = _run(tiny_cfg, tmp_path / "run")
    trainer, student = objects["trainer"], objects["student"]
    assert trainer.precision == "bf16-mixed" and trainer.global_step == 4
    probe = next(cb for cb in trainer.callbacks if isinstance(cb, GridProbe))
    # Embedding lookups (the tied embedding) give fp32 rows; every Linear, the tied head's chunked path
    # aside (it calls F.linear itself), gives bf16 out of fp32 grid values.
    assert ("torch.float32", "torch.float32", "torch.bfloat16") in probe.seen
    assert {(w_in, w_out) for w_in, w_out, _ in probe.seen} == {("torch.float32", "torch.float32")}
    losses = [v for _, v in series(read_metrics(tmp_path / "run"), "train/loss")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in student.parameters())

    (file,) = (tmp_path / "run" / "student_gguf").glob("*.gguf")
    reloaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name).eval()
    trained = dict(student.named_parameters())
    for name, value in reloaded.named_parameters():  # the file holds the converted fp32 masters, value for value
        assert torch.equal(value, trained[name]), name
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    student.eval()
    with torch.no_grad():
        fp32 = student(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = student(input_ids=ids).logits.float()
        file_logits = reloaded(input_ids=ids).logits
    torch.testing.assert_close(file_logits, fp32, rtol=0, atol=1e-4)
    # What the student computed while training (bf16 matmuls) is the file's logits to bf16's precision.
    torch.testing.assert_close(bf16, file_logits, rtol=0.05, atol=0.05 * float(fp32.abs().max()))
    assert not torch.equal(bf16, fp32)  # the autocast forward did run in bf16


@pytest.mark.slow  # three training runs (about 40 s on 2 loaded cores)
def test_a_bf16_mixed_qad_run_resumes_with_the_same_losses(tiny_cfg, tmp_path):
    every_2 = ("callbacks.model_checkpoint.every_n_train_steps=2", "export.enabled=false")
    _run(tiny_cfg, tmp_path / "full", *every_2)
    crash_at(tiny_cfg(*QAD, BF16, "trainer.max_steps=4", *every_2, output_dir=tmp_path / "cut"), step=3)
    _, objects = _run(tiny_cfg, tmp_path / "cut", *every_2)  # resume=auto: the step-2 checkpoint
    assert objects["trainer"].global_step == 4
    assert_same_losses(tmp_path / "full", tmp_path / "cut", steps=4)
    a = torch.load(tmp_path / "full" / "checkpoints" / "step000004.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "step000004.ckpt", map_location="cpu", weights_only=False)
    for key, value in a["state_dict"].items():
        assert value.dtype == b["state_dict"][key].dtype
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-6, atol=1e-7)
