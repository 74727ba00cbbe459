"""Generated training rows: on-policy (student) and sequence-level (teacher) continuations."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from distill.config import ConfigError
from distill.data.generation import Generation, Sampling, sample_continuations
from distill.objective.divergences import IGNORE_INDEX
from distill.objective.objective import DistillationObjective
from tests.helpers import read_metrics, series, tiny_llama
from train import train


def _batch(rows: int = 4, width: int = 24, vocab: int = 100) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (rows, width), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class _Teacher:
    """What Generation uses of a live teacher: its model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model


def test_settings_are_checked():
    with pytest.raises(ConfigError, match=r"distill.generation.student_fraction=1.5"):
        Generation(student_fraction=1.5)
    with pytest.raises(ConfigError, match=r"distill.generation.teacher_fraction=0.6.*> 1"):
        Generation(student_fraction=0.5, teacher_fraction=0.6)
    with pytest.raises(ConfigError, match=r"distill.generation.top_p=0"):
        Generation(student_fraction=0.5, top_p=0)
    with pytest.raises(ConfigError, match=r"distill.generation.max_new_tokens=128.*data.block_size=128"):
        Generation(student_fraction=0.5, max_new_tokens=128).check(128, tokenizer=None)


def test_counts_average_to_the_fractions_and_repeat_per_step():
    gen = Generation(student_fraction=0.3, teacher_fraction=0.45, seed=7)
    draws = [gen.counts(4, step, 0, 0) for step in range(4000)]
    assert sum(s for s, _ in draws) / (4 * 4000) == pytest.approx(0.3, abs=0.01)
    assert sum(t for _, t in draws) / (4 * 4000) == pytest.approx(0.45, abs=0.01)
    assert all(s + t <= 4 for s, t in draws)
    assert gen.counts(4, 11, 0, 1) == gen.counts(4, 11, 0, 1)
    assert {gen.counts(4, 11, 0, r) for r in range(20)} != {gen.counts(4, 11, 0, 0)}  # ranks draw their own


def test_sampling_is_seeded_batched_and_leaves_the_global_rng_alone():
    model = tiny_llama(vocab_size=100)
    prompts = [torch.arange(3, 10), torch.arange(20, 25)]  # different lengths: left-padded in one call
    sampling = Sampling(max_new_tokens=6, temperature=1.0, top_p=1.0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = sample_continuations(model, prompts, sampling, pad_id=0, seed=5)
    after = torch.rand(1)
    b = sample_continuations(model, prompts, sampling, pad_id=0, seed=5)
    c = sample_continuations(model, prompts, sampling, pad_id=0, seed=6)
    assert torch.equal(before, after)  # sampling ran on a forked RNG
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert all(1 <= len(x) <= 6 for x in a)
    # The left-padded row continues exactly as it would alone (the batch and the padding change nothing).
    greedy = Sampling(max_new_tokens=6, temperature=0.0, top_p=1.0)
    both = sample_continuations(model, prompts, greedy, pad_id=0, seed=0)
    alone = sample_continuations(model, prompts[1:], greedy, pad_id=0, seed=0)
    assert torch.equal(both[1], alone[0])
    assert model.training  # restored


def test_student_rows_keep_kd_but_not_ce_on_generated_tokens():
    model = tiny_llama(vocab_size=100)
    model.config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.eos_token_id = None
    gen = Generation(student_fraction=0.5, teacher_fraction=0.5, max_new_tokens=8, seed=1)
    batch = _batch()
    out, generated = gen.apply(batch, model, _Teacher(tiny_llama(seed=1, vocab_size=100)), 0, 0, 0, pad_id=0)
    n_s, n_t = gen.counts(4, 0, 0, 0)
    assert n_s + n_t == 4 and generated == 4 * 8
    prompt = 24 - 8
    assert torch.equal(out["input_ids"][:, :prompt], batch["input_ids"][:, :prompt])  # the corpus prefixes
    assert not torch.equal(out["input_ids"][:, prompt:], batch["input_ids"][:, prompt:])
    for i in range(4):
        student_row = i < n_s
        assert (out["labels"][i, prompt:] == IGNORE_INDEX).all() == student_row
        assert torch.equal(out["kd_labels"][i], out["input_ids"][i])
    assert torch.equal(batch["labels"], batch["input_ids"])  # the input batch is not modified


def test_kd_mask_changes_only_the_ce_term_and_chunked_agrees():
    torch.manual_seed(0)
    s, t = torch.randn(2, 10, 50, requires_grad=True), torch.randn(2, 10, 50)
    labels = torch.randint(0, 50, (2, 10))
    ce_labels = labels.clone()
    ce_labels[0, 6:] = IGNORE_INDEX  # a student row's generated tail
    obj = DistillationObjective(alpha=0.5, temperature=1.0, chunked=True, chunk_size=3)
    full = obj(s, t, labels)
    split = obj(s, t, ce_labels, kd_labels=labels)
    assert split["kd"].item() == pytest.approx(full["kd"].item(), rel=1e-6)
    assert split["ce"].item() != pytest.approx(full["ce"].item(), rel=1e-3)
    assert split["ce"].item() == pytest.approx(obj(s, t, ce_labels)["ce"].item(), rel=1e-6)
    # The chunked path, from hidden states and a head, gives the same loss and gradient.
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 10, 16, requires_grad=True)
    t_flat = t[:, :-1].reshape(-1, 50)
    chunked = obj.forward_chunked(hidden, head, lambda a, b: t_flat[a:b], ce_labels, 50, kd_labels=labels)
    plain = obj(head(hidden), t, ce_labels, kd_labels=labels)
    assert chunked["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-5)
    (g1,) = torch.autograd.grad(chunked["loss"], hidden)
    (g2,) = torch.autograd.grad(plain["loss"], hidden)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_prompt_file_rows_are_prompt_then_continuation(tmp_path, tiny_teacher):
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "The module"}\n{"prompt": "A class is"}\n')
    gen = Generation(teacher_fraction=1.0, max_new_tokens=5, prompts=str(file), temperature=0.0)
    gen.check(16, tiny_teacher.tokenizer)
    assert len(gen.prompts) == 2
    tok = tiny_teacher.tokenizer
    batch = _batch(rows=2, width=16, vocab=500)
    out, generated = gen.apply(batch, tiny_teacher.model, tiny_teacher, 0, 0, 0, pad_id=tok.pad_token_id)
    for i in range(2):
        text = tok.decode(out["input_ids"][i][out["attention_mask"][i].bool()])
        assert text.startswith(("The module", "A class is"))
        real = int(out["attention_mask"][i].sum())
        assert (out["labels"][i, real:] == IGNORE_INDEX).all()  # right padding is never a target
    assert 0 < generated <= 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match=r"distill.generation.prompts=.*'prompt' field"):
        Generation(teacher_fraction=1.0, max_new_tokens=5, prompts=str(bad)).check(16, tok)


def test_run_logs_generated_share_and_time(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "distill.generation.student_fraction=0.5",
        "distill.generation.teacher_fraction=0.25",
        "distill.generation.max_new_tokens=16",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
    )
    train(cfg)
    rows = read_metrics(tmp_path)
    share = [v for _, v in series(rows, "train/generated_share")]
    seconds = [v for _, v in series(rows, "train/generation_s")]
    assert len(share) == 6 and len(seconds) == 6
    assert 0 < sum(share) / len(share) < 1 and max(seconds) > 0


def test_teacher_cache_generates_once_and_is_reused(tiny_cfg, tmp_path):
    cache = tmp_path / "seqkd"
    args = [
        "distill.generation.teacher_fraction=1.0",
        "distill.generation.max_new_tokens=8",
        f"distill.generation.teacher_cache={cache}",
        "trainer.max_steps=2",
        "eval.enabled=false",
        "export.enabled=false",
    ]
    _, first = train(tiny_cfg(*args, output_dir=tmp_path / "a"))
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    import datasets

    shards = sorted(folder.glob("shard-*"))
    rows = datasets.concatenate_datasets([datasets.load_from_disk(str(s)) for s in shards])
    assert len(rows) == len(set(rows["key"])) == len(first["module"].generation.cached) > 0
    assert all(1 <= len(c) <= 8 for c in rows["continuation"])
    _, second = train(tiny_cfg(*args, "trainer.max_steps=4", output_dir=tmp_path / "b"))
    kept = second["module"].generation.cached
    # The first run's continuations are reused as written; the longer run added only the prompts it newly drew.
    assert all(torch.equal(kept[k], torch.tensor(c)) for k, c in zip(rows["key"], rows["continuation"], strict=True))
    assert len(sorted(folder.glob("shard-*"))) >= len(shards)


def test_sharded_strategies_and_cached_teachers_refuse_generation(tiny_cfg):
    from distill.recipe.strategies import check_sharded_generation

    with pytest.raises(ConfigError, match=r"distill.generation.student_fraction=0.5: the fsdp strategy"):
        check_sharded_generation({"strategy": "fsdp"}, {"student_fraction": 0.5})
    check_sharded_generation({"strategy": "ddp"}, {"student_fraction": 0.5})  # DDP ranks sample their own rows


@pytest.mark.ddp
@pytest.mark.slow  # ~40 s of 2-rank sampling
def test_ddp_ranks_sample_their_own_rows_and_share_the_teacher_cache(tiny_cfg, tmp_path, cache_dir):
    import datasets

    from distill.config import build
    from distill.data.sampler import StepBatchSampler
    from tests.helpers import run_train_cli

    run, cache = tmp_path / "ddp", tmp_path / "seqkd"
    common = [
        "distill.generation.student_fraction=0.5",
        "distill.generation.teacher_fraction=0.5",
        "distill.generation.max_new_tokens=8",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "data.batch_size=2",
        "eval.enabled=false",
        "export.enabled=false",
    ]
    run_train_cli(
        [
            "experiment=smoke",
            "trainer=ddp_sim",
            *common,
            f"distill.generation.teacher_cache={cache}",
            f"hydra.run.dir={run}",
            "callbacks.progress_bar=null",
        ],
        tmp_path,
        cache_dir,
    )
    share = [v for _, v in series(read_metrics(run), "train/generated_share")]
    assert len(share) >= 4 and max(share) > 0
    # The cache holds exactly the teacher rows both ranks drew, gathered and written once by rank 0.
    cfg = tiny_cfg(*common)
    gen = build(cfg.distill.generation)
    data = build(cfg.data, tokenizer=build(cfg.teacher).tokenizer)
    data.setup("fit")
    expected = set()
    for rank in (0, 1):
        batches = list(StepBatchSampler(len(data.train_set), 2, 4, seed=cfg.data.seed, world_size=2, rank=rank))
        for step, rows in enumerate(batches):
            n_s, n_t = gen.counts(2, step, 0, rank)
            expected |= set(rows[n_s : n_s + n_t])
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    keys = [k for s in sorted(folder.glob("shard-*")) for k in datasets.load_from_disk(str(s))["key"]]
    assert len(keys) == len(set(keys)) and set(keys) == expected and expected


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd"])
def test_every_divergence_takes_the_kd_mask(loss):
    torch.manual_seed(1)
    s, t = torch.randn(2, 8, 30), torch.randn(2, 8, 30)
    labels = torch.randint(0, 30, (2, 8))
    ce_labels = labels.clone()
    ce_labels[1, 4:] = IGNORE_INDEX
    kd_labels = labels.clone()
    kd_labels[0, 6:] = IGNORE_INDEX  # a right-padded row
    obj = DistillationObjective(loss=loss, alpha=0.5, temperature=2.0)
    out = obj(s, t, ce_labels, kd_labels=kd_labels)
    keep = kd_labels[:, 1:] != IGNORE_INDEX
    direct = obj.divergence(s[:, :-1][keep], t[:, :-1][keep], None, temperature=2.0, **obj.kwargs)
    assert out["kd"].item() == pytest.approx(direct.item(), rel=1e-6)


def test_on_policy_rows_with_pruning(tiny_cfg, tmp_path):
    # The student that samples is the one being pruned: generate must follow its changing shapes.
    cfg = tiny_cfg(
        "callbacks=prune",
        "student.num_layers=2",
        "student.num_heads=4",
        "student.num_kv_heads=2",
        "student.intermediate_size=64",
        "callbacks.prune.heads=2",
        "callbacks.prune.channels=0.5",
        "callbacks.prune.end_step=4",
        "callbacks.prune.every_n_steps=2",
        "callbacks.prune.calib_batches=1",
        "distill.generation.student_fraction=0.5",
        "distill.generation.max_new_tokens=8",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "eval.enabled=false",
    )
    _, objects = train(cfg)
    assert [c["kind"] for c in objects["module"].structure].count("prune") >= 1
    share = [v for _, v in series(read_metrics(tmp_path), "train/generated_share")]
    assert len(share) == 6 and sum(share) > 0


def test_cli_refuses_another_tokenizer_without_the_option_with_exit_code_2(tmp_path, cache_dir):
    import subprocess
    import sys

    from tests.conftest import ROOT

    tok_dir = tmp_path / "tok"
    from distill.models.tokenizer import train_tiny_tokenizer

    train_tiny_tokenizer(300, cache_dir).save_pretrained(tok_dir)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=smoke",
            f"student.tokenizer={tok_dir}",
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "differs from teacher tokenizer" in proc.stderr and "cross_tokenizer=align" in proc.stderr


def test_sampling_ignores_the_models_own_generation_settings_and_calibration_hooks():
    from distill.compress.prune.importance import ImportanceAccumulator

    model = tiny_llama(vocab_size=100)
    prompts = [torch.arange(3, 12)]
    greedy = Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0)
    plain = sample_continuations(model, prompts, greedy, pad_id=0, seed=0)
    # A checkpoint's own sampling settings (here an extreme repetition penalty) must not reach the samples.
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    assert torch.equal(sample_continuations(model, prompts, greedy, pad_id=0, seed=0)[0], plain[0])
    assert model.generation_config.repetition_penalty == 50.0  # restored afterwards
    # Pruning importance collecting in the same training step counts none of the sampling forwards.
    acc = ImportanceAccumulator("activation", layers=True, hidden=True)
    acc.attach(model)
    acc.collecting = True
    sample_continuations(model, prompts, greedy, pad_id=0, seed=0)
    assert not acc.sums
    model(torch.arange(3, 12)[None])
    assert acc.sums  # an ordinary forward still counts
    acc.detach()


@pytest.mark.parametrize("scheme", ["gguf_q4_0", "int4_weight_only"])
def test_a_qat_student_rounds_its_weights_once_per_sampling_call(scheme):
    from distill.compress.quant import schemes as quantization
    from distill.compress.quant.qat import fake_quantized, prepare

    model = tiny_llama(vocab_size=128)
    group = None if scheme.startswith("gguf") else 32
    prepare(model, quantization.make_spec(scheme, group, ["*norm*"], modules=["linear", "embedding"]))
    modules = fake_quantized(model)
    assert modules
    calls = {"n": 0}
    (kind,) = {type(m.weight_fake_quantizer) for m in modules.values()}
    rounding = kind.forward

    from distill.compress.quant.row_embedding import RowRoundedEmbedding

    rows = {id(m.weight_fake_quantizer) for m in modules.values() if isinstance(m, RowRoundedEmbedding)}
    assert len(rows) == (scheme == "gguf_q4_0")  # a llama.cpp grid's embedding rounds the rows it looks up

    def counted(self: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
        calls["n"] += id(self) not in rows  # those round a few new rows per token, not the table
        return rounding(self, weight)

    prompts = [torch.arange(3, 12), torch.arange(5, 9)]
    greedy = Sampling(max_new_tokens=6, temperature=0.0, top_p=1.0)
    with mock.patch.object(kind, "forward", counted):
        fast = sample_continuations(model, prompts, greedy, pad_id=0, seed=0)
    assert calls["n"] == len(modules) - len(rows)  # one rounding per quantized weight for the six tokens
    # The same tokens as re-rounding in every forward (what a plain generate does).
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([[0, 0, 0, 0, 0, 5, 6, 7, 8]])
        slow = model.generate(ids, attention_mask=(ids != 0).long(), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert slow[0, 9 : 9 + len(fast[1])].tolist() == fast[1].tolist()
    assert all("forward" not in vars(m.weight_fake_quantizer) for m in modules.values())  # unpatched after


def test_teacher_cache_folder_is_keyed_by_the_teachers_weights_and_dtype(tiny_teacher, tmp_path):
    import copy

    from distill.models.teacher import FrozenTeacher

    gen = Generation(teacher_fraction=0.5, teacher_cache=str(tmp_path))
    same = FrozenTeacher(copy.deepcopy(tiny_teacher.model), tiny_teacher.tokenizer, tiny_teacher.name)
    half = FrozenTeacher(copy.deepcopy(tiny_teacher.model).bfloat16(), tiny_teacher.tokenizer, tiny_teacher.name)
    tuned = FrozenTeacher(copy.deepcopy(tiny_teacher.model), tiny_teacher.tokenizer, tiny_teacher.name)
    with torch.no_grad():  # a fine-tune saved over the same path: same name and tokenizer, other weights
        next(tuned.model.parameters()).add_(1e-3)
    folder = gen.cache_folder(tiny_teacher, "data")
    assert tiny_teacher.identity == half.identity == tuned.identity  # what the folder was keyed by alone
    assert gen.cache_folder(same, "data") == folder  # a reloaded copy of the same teacher reuses its continuations
    assert gen.cache_folder(half, "data") != folder
    assert gen.cache_folder(tuned, "data") != folder
    assert gen.cache_folder(tiny_teacher, "other data") != folder
