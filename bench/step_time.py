"""Distillation step time: MFU and a breakdown of the step, the rounding's cost per llama.cpp grid, framework overhead.

Three sections (``sections=[...]``), each printed as a table; everything measured goes to one JSON (``json=``):

- ``mfu``: each run of ``runs`` (the default recipe ``experiment=qad_q4_mix``, and ``from_teacher``: the same
  full-depth copy without QAT) trains ``steps`` + 1 steps through ``train.py``'s own ``train(cfg)``, with timers
  around the module's pieces (:class:`StepBreakdown`: hooks and Lightning's callback hooks only, the numerics
  untouched). The step's model FLOPs are counted from the models' shapes (:func:`step_flops`, formula below) and
  divided by the median step time, as a share of the matmul rate measured in the same process on the step's own
  GEMM shapes (:func:`gemm_peak`), in fp32 and in bf16.
- ``rounding``: one step's fake-quant forward per grid (Q4_0, Q4_K, Q3_K, IQ4_NL ...) on the teacher's weights
  (SmolLM2's shapes), eager and through ``torch.compile`` (``trainer_extras.compile_rounding``).
- ``overhead``: one Lightning step against the sum of its parts run alone, and the step with a top-64 teacher cache
  against the live teacher, on a ``layers``-deep ``from_teacher`` student.

    python -m bench.step_time                                  # all three on the embedded SmolLM2 teacher
    python -m bench.step_time 'sections=[mfu]' steps=3
    python -m bench.step_time 'sections=[rounding]' rounding_compile=true

The settings are Hydra overrides of ``conf/bench/step_time.yaml``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from bench import ROOT
from distill.config import config_error, exit_on_config_error

SECTIONS = ("mfu", "rounding", "overhead")
PARTS = ("teacher_forward", "student_forward", "rounding", "loss", "student_backward", "optimizer", "other")
FORMULA = (
    "F = 2·N_t·T + 2·H_t·R + 4·A_t·S·T  (teacher forward)  +  6·N_s·T + 6·H_s·R + 12·A_s·S·T  (student forward and "
    "backward); T = B·S tokens, R = B·(S-1) rows the output layer scores, N = the body's matmul parameters (every "
    "Linear weight), H = the output layer's, A = Σ over layers of heads·head_dim (attention scores and values over "
    "the full S×S, not halved for the causal mask). Rounding, norms, softmax and the optimizer are not counted."
)
RUN_SETTINGS = ["debug=quiet", "eval.enabled=false", "export.enabled=false"]


# -- the breakdown of one step ----------------------------------------------------------------------------------------
class StepBreakdown(pl.Callback):
    """Each training step's wall time split into :data:`PARTS` by timers around the module's pieces.

    A part's time is exclusive: the teacher's output layer called from inside the chunked loss counts as teacher,
    the rounding inside the student's forward as rounding, not twice. The timers are forward hooks on the teacher,
    the student's body and every fake quantizer, a wrapper of the objective's ``forward_chunked`` (on this
    instance), and Lightning's backward and optimizer hooks; none of them touches a tensor. ``other`` is the rest
    of the step: data, logging, zeroing gradients, the scheduler and the callbacks. The chunked loss applies the
    student's output layer and differentiates it chunk by chunk inside its forward, so ``loss`` holds that layer's
    forward and backward; the student's body backward is ``student_backward``.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._stack: list[str] = []
        self._mark = 0.0
        self._current: dict[str, float] = {}
        self._hooked: set[int] = set()
        self._in_step = False

    def enter(self, part: str) -> None:
        """Start ``part``; the part running until now pauses (outside a training step: nothing)."""
        if not self._in_step:
            return
        now = time.perf_counter()
        if self._stack:
            self._current[self._stack[-1]] += now - self._mark
        self._stack.append(part)
        self._mark = now

    def exit(self, *_: object) -> None:
        """End the innermost part; the one it interrupted resumes."""
        if not self._in_step or not self._stack:
            return
        now = time.perf_counter()
        self._current[self._stack.pop()] += now - self._mark
        self._mark = now

    def _hook(self, module: nn.Module | None, part: str) -> None:
        if module is None or id(module) in self._hooked:
            return
        self._hooked.add(id(module))
        module.register_forward_pre_hook(lambda *_: self.enter(part))
        module.register_forward_hook(self.exit, always_call=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the timers on the teacher, the student's body, the objective and the optimizer."""
        teacher, student = pl_module.teacher, pl_module.student
        self._hook(teacher, "teacher_forward")
        model = getattr(teacher, "model", None)
        if model is not None:
            self._hook(model.base_model, "teacher_forward")
            self._hook(model.get_output_embeddings(), "teacher_forward")
        self._hook(student, "student_forward")
        self._hook(student.base_model, "student_forward")
        self._hook(pl_module.objective, "loss")
        objective, chunked = pl_module.objective, pl_module.objective.forward_chunked

        def timed_loss(*args: Any, **kwargs: Any) -> Any:
            self.enter("loss")
            try:
                return chunked(*args, **kwargs)
            finally:
                self.exit()

        objective.forward_chunked = timed_loss  # this instance only; removed at the end of training
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(self.exit)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the objective back its own method."""
        pl_module.objective.__dict__.pop("forward_chunked", None)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Start the step's clock; time the fake quantizers present now (QAT may insert them at any step)."""
        for module in pl_module.student.modules():
            for name in ("weight_fake_quantizer", "activation_fake_quantizer"):
                self._hook(getattr(module, name, None), "rounding")
        self._in_step, self._current, self._stack = True, dict.fromkeys(PARTS, 0.0), []
        self.enter("other")

    def on_before_backward(self, *args: Any) -> None:
        """The backward pass starts."""
        self.enter("student_backward")

    def on_after_backward(self, *args: Any) -> None:
        """The backward pass ended."""
        self.exit()

    def on_before_optimizer_step(self, *args: Any) -> None:
        """Gradient clipping and the optimizer's update follow; the optimizer's post hook ends them."""
        self.enter("optimizer")

    def on_train_batch_end(self, *args: Any) -> None:
        """Close the step."""
        while self._stack:
            self.exit()
        self._in_step = False
        self.steps.append(dict(self._current))


# -- FLOPs and the matmul peak ----------------------------------------------------------------------------------------
def _linears(model: nn.Module) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The (out, in) shapes of the body's Linear layers, and the output layer's (vocabulary, width)."""
    head = model.get_output_embeddings()
    body = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    return body, tuple(head.weight.shape)


def attention_width(model: nn.Module) -> int:
    """Σ over the decoder layers of heads·head_dim: the width of the attention scores' and values' products."""
    return sum(m.q_proj.weight.shape[0] for m in model.modules() if isinstance(getattr(m, "q_proj", None), nn.Linear))


def step_flops(teacher: nn.Module, student: nn.Module, batch: int, block: int) -> dict[str, float]:
    """The model FLOPs of one distillation step (:data:`FORMULA`), teacher and student, and their inputs."""
    tokens, rows = batch * block, batch * (block - 1)
    out: dict[str, float] = {}
    for who, model, passes in (("teacher", teacher, 1), ("student", student, 3)):
        body, (vocab, width) = _linears(model)
        n, h, a = sum(o * i for o, i in body), vocab * width, attention_width(model)
        out |= {f"N_{who}": n, f"H_{who}": h, f"A_{who}": a}
        out[who] = passes * (2 * n * tokens + 2 * h * rows + 4 * a * block * tokens)
    out["total"] = out["teacher"] + out["student"]
    return out


def step_gemms(teacher: nn.Module, student: nn.Module, tokens: int, rows: int, chunk: int) -> Counter:
    """The step's matmuls as ``(op, M, K, N)`` with counts, as autograd runs them for each Linear.

    ``linear``: an (M, K) input times an (N, K) weight transposed (the teacher's and the student's forward);
    ``dgrad``: the output's gradient (M, K) times the weight (K, N); ``wgrad``: the output's gradient transposed
    (M, K) times the input (K, N) (the student's backward). The output layer runs on ``chunk`` rows at a time
    (the chunked loss): ``rows // chunk`` times, and once on the rest.
    """
    gemms: Counter = Counter()
    for model, backward in ((teacher, False), (student, True)):
        body, (vocab, width) = _linears(model)
        layers = [(tokens, out, inp, 1) for out, inp in body]
        layers += [(chunk, vocab, width, rows // chunk), (rows % chunk, vocab, width, 1)]
        for m, out, inp, times in layers:
            if m == 0 or times == 0:
                continue
            gemms[("linear", m, inp, out)] += times
            if backward:
                gemms[("dgrad", m, out, inp)] += times
                gemms[("wgrad", out, m, inp)] += times
    return gemms


def gemm_seconds(op: str, m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """Median seconds of one GEMM of :func:`step_gemms` on random operands laid out as autograd's are."""
    a = torch.randn(m, k, dtype=dtype) if op != "wgrad" else torch.randn(k, m, dtype=dtype).t()
    b = torch.randn(n, k, dtype=dtype) if op == "linear" else torch.randn(k, n, dtype=dtype)

    def run() -> None:
        if op == "linear":
            torch.nn.functional.linear(a, b)
        else:
            torch.mm(a, b)

    return _median(run, repeats)


def gemm_peak(gemms: Counter, seconds: dict[tuple, float]) -> dict[str, float]:
    """The rate of the step's own GEMMs run alone, back to back: Σ count·flops / Σ count·seconds; and the best one."""
    flops = sum(count * 2.0 * m * k * n for (_, m, k, n), count in gemms.items())
    total = sum(count * seconds[shape] for shape, count in gemms.items())
    best = max(2.0 * m * k * n / seconds[(op, m, k, n)] for op, m, k, n in gemms)
    return {"flops_per_s": flops / total, "best_shape_flops_per_s": best}


def _median(fn, n: int) -> float:
    fn()  # warm-up: allocation, kernel selection
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- the mfu section --------------------------------------------------------------------------------------------------
def compose_run(cfg: DictConfig, overrides: list[str], out: Path) -> DictConfig:
    """``conf/train.yaml`` with a run's overrides, the bench's sizes and steps; no checkpoint, eval or export."""
    from bench.studies.recipe import compose_train

    train_cfg = compose_train(
        [
            *overrides,
            *RUN_SETTINGS,
            f"data.batch_size={cfg.batch}",
            f"data.block_size={cfg.block}",
            f"trainer.max_steps={cfg.steps + 1}",
            *cfg.train_overrides,
        ],
        out,
        quiet=False,
    )
    with open_dict(train_cfg):
        train_cfg.callbacks.step_breakdown = {"_target_": "bench.step_time.StepBreakdown"}
    return train_cfg


def time_run(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Train one run of ``runs`` for ``steps`` + 1 steps; its median step and parts (the first step left out)."""
    from train import train

    with tempfile.TemporaryDirectory() as tmp:
        train_cfg = compose_run(cfg, list(overrides), Path(tmp))
        _, objects = train(train_cfg)
    trainer, module = objects["trainer"], objects["module"]
    (breakdown,) = [cb for cb in trainer.callbacks if type(cb).__name__ == "StepBreakdown"]
    steps = breakdown.steps[1:]
    parts = {p: statistics.median(s[p] for s in steps) for p in PARTS}
    totals = [sum(s.values()) for s in steps]
    teacher = getattr(module.teacher, "model", module.teacher)
    flops = step_flops(teacher, objects["student"], cfg.batch, cfg.block)
    chunk = module.objective.chunk_size if module.chunked else cfg.batch * (cfg.block - 1)
    gemms = step_gemms(teacher, objects["student"], cfg.batch * cfg.block, cfg.batch * (cfg.block - 1), chunk)
    return {
        "overrides": list(overrides),
        "precision": str(trainer.precision),
        "chunked_loss": bool(module.chunked),
        "step_seconds": statistics.median(totals),
        "step_seconds_each": totals,
        "parts_seconds": parts,
        "flops": flops,
        "gemms": gemms,
    }


def mfu_section(cfg: DictConfig) -> dict[str, Any]:
    """Time every run, then each GEMM shape of their steps in fp32 and bf16, and derive each run's MFU."""
    runs = {name: time_run(cfg, overrides) for name, overrides in cfg.runs.items()}
    shapes = sorted({shape for r in runs.values() for shape in r["gemms"]})
    seconds = {
        key: {shape: gemm_seconds(*shape, dtype, cfg.peak_repeats) for shape in shapes} for key, dtype in DTYPES.items()
    }
    for result in runs.values():
        gemms = result.pop("gemms")
        result["peak"] = {key: gemm_peak(gemms, seconds[key]) for key in DTYPES}
        achieved = result["flops"]["total"] / result["step_seconds"]
        result["achieved_flops_per_s"] = achieved
        result["mfu"] = {key: achieved / peak["flops_per_s"] for key, peak in result["peak"].items()}
    _print_mfu(runs)
    gemm_table = [
        {
            "op": op,
            "m": m,
            "k": k,
            "n": n,
            **{f"{key}_flops_per_s": 2.0 * m * k * n / seconds[key][(op, m, k, n)] for key in DTYPES},
        }
        for op, m, k, n in shapes
    ]
    return {"formula": FORMULA, "runs": runs, "gemms": gemm_table}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _print_mfu(runs: dict[str, dict]) -> None:
    print(FORMULA)
    head = f"{'run':<14}{'step s':>8}{'GFLOP':>8}{'GFLOP/s':>9}{'peak fp32':>10}{'bf16':>7}{'MFU fp32':>9}{'bf16':>7}"
    print(head + "".join(f"{p:>22}" for p in PARTS))
    for name, r in runs.items():
        peak, mfu, total = r["peak"], r["mfu"], r["step_seconds"]
        line = f"{name:<14}{total:8.3f}{r['flops']['total'] / 1e9:8.1f}{r['achieved_flops_per_s'] / 1e9:9.1f}"
        line += f"{peak['fp32']['flops_per_s'] / 1e9:10.1f}{peak['bf16']['flops_per_s'] / 1e9:7.1f}"
        line += f"{mfu['fp32']:9.3f}{mfu['bf16']:7.3f}"
        line += "".join(f"{r['parts_seconds'][p]:14.3f} ({r['parts_seconds'][p] / total:5.1%})" for p in PARTS)
        print(line)
    print("(GFLOP per step; peaks in GFLOP/s: the step's own GEMM shapes run alone; parts: median seconds, share)")


# -- the rounding section ---------------------------------------------------------------------------------------------
def rounded_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The weights a step of the default recipe rounds: every Linear and the embedding (a tied head twice)."""
    return [
        (name, m.weight.detach())
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Embedding) and "norm" not in name
    ]


def rounding_section(cfg: DictConfig, teacher: nn.Module, base_step: float | None) -> dict[str, Any]:
    """One step's rounding per grid on ``teacher``'s weights, eager and (``rounding_compile``) compiled."""
    from distill.compress.quant.gguf_grid import BLOCKS

    weights = rounded_weights(teacher)
    total = sum(w.numel() for _, w in weights)
    results = {}
    for kind in cfg.rounding_kinds:
        fits = [w for _, w in weights if w.shape[-1] % BLOCKS[kind] == 0]
        if not fits:
            continue
        result = _time_rounding(fits, kind, cfg.rounding_repeats, cfg.rounding_compile)
        result["weights_share"] = sum(w.numel() for w in fits) / total
        if base_step is not None:  # the rounding's share of a step that adds it to the plain student's step
            for mode in ("eager", "compiled"):
                if result.get(f"{mode}_seconds") is not None:
                    result[f"{mode}_share"] = result[f"{mode}_seconds"] / (base_step + result[f"{mode}_seconds"])
        results[kind] = result
    _print_rounding(results, base_step)
    return {"base_step_seconds": base_step, "weights": total, "kinds": results}


def _time_rounding(weights: list[torch.Tensor], kind: str, repeats: int, compiled: bool) -> dict[str, Any]:
    """Median seconds of one pass of ``fake_quantize`` over ``weights``; compiled: alternating with eager runs."""
    from distill.compress.quant.compile_rounding import INDUCTOR_OPTIONS
    from distill.compress.quant.gguf_grid import fake_quantize

    def eager() -> list[torch.Tensor]:
        return [fake_quantize(w, kind) for w in weights]

    if not compiled:
        return {"eager_seconds": _median(eager, repeats), "compiled_seconds": None}
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(weights))
    fn = torch.compile(fake_quantize, dynamic=False, options=INDUCTOR_OPTIONS)
    start = time.perf_counter()
    values = [fn(w, kind) for w in weights]  # compiles each shape once
    compile_seconds = time.perf_counter() - start
    exact = all(torch.equal(v, e) for v, e in zip(values, eager(), strict=True))
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for mode, run in (("eager", eager), ("compiled", lambda: [fn(w, kind) for w in weights])):
            t = time.perf_counter()
            run()
            times[mode].append(time.perf_counter() - t)
    return {
        "eager_seconds": statistics.median(times["eager"]),
        "compiled_seconds": statistics.median(times["compiled"]),
        "compile_seconds": compile_seconds,
        "exact": exact,
    }


def _print_rounding(results: dict[str, dict], base_step: float | None) -> None:
    base = f"{base_step:.3f} s" if base_step is not None else "not measured in this run"
    print(f"rounding of one step (every weight the grid fits, the tied head twice); plain student's step {base}")
    print(f"{'grid':<8}{'weights':>8}{'eager s':>9}{'share':>7}{'compiled s':>11}{'share':>7}{'compile s':>10}  exact")
    for kind, r in results.items():
        line = f"{kind:<8}{r['weights_share']:8.0%}{r['eager_seconds']:9.3f}{r.get('eager_share', float('nan')):7.1%}"
        if r["compiled_seconds"] is not None:
            line += f"{r['compiled_seconds']:11.3f}{r.get('compiled_share', float('nan')):7.1%}"
            line += f"{r['compile_seconds']:10.1f}  {r['exact']}"
        print(line)


# -- the overhead section (framework overhead, cached teacher) ---------------------------------------------------------
class StepTimer(pl.Callback):
    """Wall time of each training step, from batch start to batch end."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter() - self._t)


def lightning_step_time(module, dm, steps: int) -> float:
    """Median step time of ``steps`` Lightning training steps (the first, warm-up step excluded)."""
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=steps + 1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    return statistics.median(timer.times[1:])


def overhead_section(cfg: DictConfig, teacher) -> dict[str, Any]:
    """The Lightning step against the sum of its parts, and the cached-teacher step against the live one."""
    from distill.data.datamodule import DistillDataModule
    from distill.module import DistillModule
    from distill.objective.objective import DistillationObjective
    from students import from_teacher

    torch.manual_seed(0)
    dm = DistillDataModule(teacher.tokenizer, block_size=cfg.block, batch_size=cfg.batch)
    dm.setup()
    student = from_teacher.build(teacher, num_layers=cfg.layers)
    objective = DistillationObjective(alpha=0.5, temperature=2.0)
    module = DistillModule(teacher, student, objective, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4))
    print(f"tokens/step {cfg.batch * cfg.block}, chunked loss: {module.chunked}, threads {torch.get_num_threads()}")

    step = lightning_step_time(module, dm, cfg.steps)
    parts = parts_alone(module, dm, cfg.batch, cfg.steps)
    total = sum(parts.values())
    print("parts alone: " + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()) + f"; sum {total:.3f} s")
    print(f"lightning step {step:.3f} s")
    print(f"ratio step / sum_of_parts = {step / total:.3f}  (framework overhead {100 * (step / total - 1):+.1f}%)")

    step_cached = cached_step_time(module, dm, cfg.batch, cfg.steps)
    print(f"cached-teacher step {step_cached:.3f} s")
    print(f"ratio cached_step / online_step = {step_cached / step:.3f}")
    return {"layers": cfg.layers, "parts_alone": parts, "lightning_step": step, "cached_step": step_cached}


def parts_alone(module, dm, batch_size: int, steps: int) -> dict[str, float]:
    """Median time of each part of a step alone (teacher, student body, loss, optimizer), on one batch."""
    from distill.data.datamodule import DistillDataModule

    teacher, student, objective = module.teacher, module.student, module.objective
    batch = DistillDataModule.collate([dm.train_set[i] for i in range(batch_size)])
    ids, labels, v = batch["input_ids"], batch["labels"], module.vocab_size
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)

    def teacher_part():
        rows, _ = teacher.rows(ids, vocab=v)
        n = ids.shape[0] * (ids.shape[1] - 1)
        for s in range(0, n, objective.chunk_size):
            rows(s, min(s + objective.chunk_size, n))

    def student_part():  # body forward + backward, without the output layer and loss
        h = student.base_model(input_ids=ids, use_cache=False).last_hidden_state
        h.backward(torch.ones_like(h) * 1e-6)

    hidden = student.base_model(input_ids=ids, use_cache=False).last_hidden_state.detach().requires_grad_(True)
    rows, _ = teacher.rows(ids, vocab=v)
    n = ids.shape[0] * (ids.shape[1] - 1)
    t_rows = torch.cat([rows(s, min(s + objective.chunk_size, n)) for s in range(0, n, objective.chunk_size)])

    def loss_part():  # output layer + loss forward and backward, teacher logits precomputed
        out = objective.forward_chunked(hidden, student.get_output_embeddings(), lambda i, j: t_rows[i:j], labels, v)
        out["loss"].backward()

    def optimizer_part():
        opt.step()
        opt.zero_grad(set_to_none=False)

    for p_ in module.trainable_parameters():
        p_.grad = torch.zeros_like(p_)
    parts = [("teacher", teacher_part), ("student", student_part), ("loss", loss_part), ("optimizer", optimizer_part)]
    return {name: _median(fn, steps) for name, fn in parts}


def cached_step_time(module, dm, batch_size: int, steps: int) -> float:
    """Median Lightning step time of the same student trained from a top-64 cache of the same teacher."""
    from distill.models.cache_builder import build_cache
    from distill.models.teacher_cache import CachedTeacher
    from distill.module import DistillModule

    with tempfile.TemporaryDirectory() as tmp:
        # Cache only the blocks the timed steps will draw: the sampler's first batches.
        sampler_blocks = sorted({i for b in _first_batches(dm, batch_size, steps + 1) for i in b})
        sub = dm.train_set.select(sampler_blocks)
        full_train, dm.train_set = dm.train_set, sub
        build_cache(module.teacher, dm, tmp, top_k=64, splits=("train",), progress=False)
        dm.train_set = full_train
        cached = CachedTeacher(tmp)
        module_cached = DistillModule(
            cached, module.student, module.objective, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4)
        )
        return lightning_step_time(module_cached, dm, steps)


def _first_batches(dm, batch: int, steps: int) -> list[list[int]]:
    from distill.data.sampler import StepBatchSampler

    return list(StepBatchSampler(len(dm.train_set), batch, steps, seed=dm.seed))


# -- entry point ------------------------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict[str, Any]:
    """Measure the sections asked for, print their tables and write them all to ``cfg.json``; returns the result."""
    from distill.compress.quant.gguf_grid import KINDS

    sections = list(cfg.sections)
    if not sections or set(sections) - set(SECTIONS):
        raise config_error("sections", sections, f"choose among {', '.join(SECTIONS)}")
    if "rounding" in sections and (not cfg.rounding_kinds or set(cfg.rounding_kinds) - set(KINDS)):
        raise config_error("rounding_kinds", list(cfg.rounding_kinds), f"choose among {', '.join(KINDS)}")
    result: dict[str, Any] = {"machine": machine(), "batch": cfg.batch, "block": cfg.block, "steps": cfg.steps}
    if "mfu" in sections:
        result["mfu"] = mfu_section(cfg)
    if "rounding" in sections or "overhead" in sections:
        teacher = hydra.utils.instantiate(cfg.teacher)
        if "rounding" in sections:
            plain = result.get("mfu", {}).get("runs", {}).get(cfg.rounding_base_run)
            base = plain["step_seconds"] if plain else None
            result["rounding"] = rounding_section(cfg, teacher.model, base)
        if "overhead" in sections:
            result["overhead"] = overhead_section(cfg, teacher)
    result["machine"]["load_average_end"] = os.getloadavg()
    out = Path(cfg.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results file's tables (``step_time.md`` beside the JSON): MFU and breakdown, rounding per grid."""
    m = result["machine"]
    lines = [
        "# Step time",
        "",
        f"`python -m bench.step_time` on {m['cpus']} CPUs ({m['processor']}, {m['threads']} threads, "
        f"torch {m['torch']}), "
        f"{m['date']}, load average {m['load_average_start'][0]:.2f} at the start; {result['batch']} × "
        f"{result['block']} tokens per step, the median of {result['steps']} steps after a warm-up step.",
        "",
    ]
    if "mfu" in result:
        runs = result["mfu"]["runs"]
        lines += [
            "| run | step s | GFLOP | GFLOP/s | fp32 peak | bf16 peak | MFU fp32 | MFU bf16 | "
            + " | ".join(p.replace("_", " ") for p in PARTS)
            + " |",
            "| --- |" + " ---: |" * (7 + len(PARTS)),
        ]
        for name, r in runs.items():
            total = r["step_seconds"]
            cells = [
                f"{total:.2f}",
                f"{r['flops']['total'] / 1e9:.0f}",
                f"{r['achieved_flops_per_s'] / 1e9:.1f}",
                f"{r['peak']['fp32']['flops_per_s'] / 1e9:.1f}",
                f"{r['peak']['bf16']['flops_per_s'] / 1e9:.1f}",
                f"{r['mfu']['fp32']:.2f}",
                f"{r['mfu']['bf16']:.2f}",
                *(f"{r['parts_seconds'][p]:.2f} ({r['parts_seconds'][p] / total:.0%})" for p in PARTS),
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        peaks = "Peaks: the step's own GEMM shapes run alone in this run (GFLOP/s). "
        lines += ["", peaks + result["mfu"]["formula"], ""]
    if "rounding" in result:
        rnd = result["rounding"]
        base = rnd["base_step_seconds"]
        lines += [
            "One step's fake-quant rounding per llama.cpp grid, every weight the grid's rows fit (the tied head "
            f"twice), eager and `torch.compile`d; share: of a step that adds it to the plain student's "
            f"{f'{base:.2f} s' if base is not None else '(not measured)'}.",
            "",
            "| grid | weights | eager s | share | compiled s | share | compile s | same values |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for kind, r in rnd["kinds"].items():
            compiled = r.get("compiled_seconds")
            cells = [
                f"{r['weights_share']:.0%}",
                f"{r['eager_seconds']:.3f}",
                f"{r['eager_share']:.0%}" if "eager_share" in r else "–",
                f"{compiled:.3f}" if compiled is not None else "–",
                f"{r['compiled_share']:.0%}" if "compiled_share" in r else "–",
                f"{r['compile_seconds']:.0f}" if compiled is not None else "–",
                str(r.get("exact", "–")),
            ]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on; the load average says how busy the machine was."""
    return {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/step_time")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    # The repository, wherever the script is started from: Hydra's record goes to its logs/.
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
