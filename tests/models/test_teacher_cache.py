"""The offline top-k teacher cache: round trip, resume, mismatch refusal, and training from it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distill.config import ConfigError
from distill.data.datamodule import DistillDataModule
from distill.models.cache_builder import build_cache
from distill.models.teacher import Teacher
from distill.models.teacher_cache import CachedTeacher, reconstruct_logprobs, reconstruction_kl


@pytest.fixture
def dm(tiny_teacher, cache_dir):
    d = DistillDataModule(tiny_teacher.tokenizer, cache_dir=str(cache_dir / "data"), block_size=32)
    d.setup()
    return d


def _reconstruction_kl_reference(logp: torch.Tensor, k: int) -> torch.Tensor:
    """KL(p ‖ top-k reconstruction) per row, written out in plain float64 Python."""
    out = []
    for row in logp.double().exp().tolist():
        top = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        tail = (1.0 - sum(row[i] for i in top)) / (len(row) - k) if len(row) > k else 0.0
        q = [row[i] if i in top else tail for i in range(len(row))]
        out.append(sum(p * math.log(p / qi) for p, qi in zip(row, q, strict=True) if p > 0))
    return torch.tensor(out, dtype=torch.float64)


def test_reconstruction_keeps_topk_and_spreads_tail():
    logp = torch.log_softmax(torch.randn(3, 20) * 3, -1)
    values, indices = logp.topk(5, -1)
    q = reconstruct_logprobs(values, indices, 20)
    torch.testing.assert_close(q.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(q.gather(-1, indices), values)
    tail = torch.ones_like(q, dtype=torch.bool).scatter_(-1, indices, False)
    want_tail = (1 - values.exp().sum(-1)) / 15
    torch.testing.assert_close(q.exp()[tail].view(3, 15), want_tail[:, None].expand(3, 15))
    # KL(p‖q) against an independent float64 computation: sort, keep k, spread the rest, sum p·log(p/q).
    torch.testing.assert_close(
        reconstruction_kl(logp, 5).double(), _reconstruction_kl_reference(logp, 5), rtol=1e-5, atol=1e-6
    )
    assert reconstruction_kl(logp, 20).abs().max() < 1e-6


def test_cache_round_trip_and_manifest(tiny_teacher, dm, tmp_path):
    m = build_cache(tiny_teacher, dm, tmp_path / "c", top_k=16, max_blocks=40, blocks_per_shard=16, progress=False)
    assert m["complete"] and m["splits"]["train"]["blocks"] == 40 and len(m["splits"]["train"]["shards"]) == 3
    assert sorted(m["splits"]) == ["test", "train", "val"] and m["teacher_source"] is None
    # Tokens of text: every training position, and the held-out blocks' real ones (their `length`).
    held = [dm.val_set[:40], dm.test_set[:40]]
    assert m["tokens"] == 40 * 32 + sum(int(rows["length"].sum()) for rows in held)
    # fp16 values, uint16 indices and ids, and an fp32 shift and tail mass at each of the 2 temperatures
    assert m["bytes_per_token_payload"] == 16 * (2 + 2) + 2 + 2 * 8
    assert m["version"] == 2 and m["temperatures"] == [1.0, 2.0] and len(m["weights"]) == 16
    assert m["bytes_per_token"] >= m["bytes_per_token_payload"]
    teacher = CachedTeacher(str(tmp_path / "c"))
    ids = dm.train_set[5:9]["input_ids"]
    full = torch.log_softmax(tiny_teacher(ids).logits.float(), -1)
    cached = teacher(ids).logits
    values, indices = full.topk(16, -1)
    torch.testing.assert_close(cached.gather(-1, indices), values, atol=2e-3, rtol=0)  # fp16 storage
    kl = (full.exp() * (full - cached)).sum(-1).mean().item()
    assert kl == pytest.approx(reconstruction_kl(full, 16).mean().item(), abs=2e-3)
    # The manifest's KL, recomputed independently over every cached position of text (train, val and test).
    blocks = [(dm.train_set[:40]["input_ids"], torch.full((40,), 32)), *((r["input_ids"], r["length"]) for r in held)]
    every = torch.cat(
        [
            torch.log_softmax(tiny_teacher(ids).logits.float(), -1)[torch.arange(32) < length[:, None]]
            for ids, length in blocks
        ]
    )
    assert m["reconstruction_kl"] == pytest.approx(_reconstruction_kl_reference(every, 16).mean().item(), rel=1e-3)
    # the chunked-path rows are the same reconstruction
    rows, _ = teacher.rows(ids, vocab=512)
    torch.testing.assert_close(rows(0, 31), cached[0, :-1])
    assert teacher.vocab_size == 512 and teacher.config.hidden_size == 64


@pytest.fixture
def text_dm(tiny_teacher, tmp_path):
    """A small corpus (12 pydoc topics): 876 training, 52 validation and 104 test blocks of 32 tokens."""
    from pydoc_data.topics import topics

    (tmp_path / "corpus.txt").write_text("\n".join(sorted(topics.values())[:12]))
    files, data = str(tmp_path / "corpus.txt"), str(tmp_path / "data")
    d = DistillDataModule(tiny_teacher.tokenizer, source="text", files=files, cache_dir=data, block_size=32)
    d.setup()
    return d


def test_the_test_split_is_cached_as_packed_and_its_padded_last_block_is_found(tiny_teacher, text_dm, tmp_path):
    m = build_cache(tiny_teacher, text_dm, tmp_path / "c", top_k=16, batch_size=64, progress=False)
    assert {k: v["blocks"] for k, v in m["splits"].items()} == {"train": 876, "val": 52, "test": 104}
    last = text_dm.test_set[-1]
    real = int(last["length"])
    # What the datamodule hands out: a last block padded with its own final token, `length` real ones.
    assert real < 32 and (last["input_ids"][real:] == last["input_ids"][real - 1]).all()
    cached = CachedTeacher(str(tmp_path / "c"))
    ids = last["input_ids"][None]
    full = torch.log_softmax(tiny_teacher(ids).logits.float(), -1)
    values, indices = full.topk(16, -1)
    torch.testing.assert_close(cached(ids).logits.gather(-1, indices), values, atol=2e-3, rtol=0)
    # Every batch the report reads is found in the cache, and so is the padding batch that evens out two ranks.
    from torch.utils.data import DataLoader

    from distill.data.sampler import EvalBatchSampler, PaddedEvalSet

    loaders = [text_dm.heldout_dataloader("test")] + [
        DataLoader(PaddedEvalSet(text_dm.test_set), batch_sampler=sampler, collate_fn=text_dm.collate)
        for sampler in (EvalBatchSampler(104, 8, world_size=2, rank=r) for r in (0, 1))
    ]
    seen = [0, 0, 0]
    for i, loader in enumerate(loaders):
        for batch in loader:
            assert cached(batch["input_ids"]).logits.shape == (*batch["input_ids"].shape, 512)
            seen[i] += int((batch["labels"] != -100).sum())
    lengths = text_dm.test_set[:]["length"]
    assert seen[0] == seen[1] + seen[2] == int(lengths.sum())
    assert cached.holds(ids) and not cached.holds(
        torch.cat([ids, ids.flip(1)])
    )  # other text is not held  # each block's real tokens once, padding none
    # The manifest's statistics count text only: a padded tail is stored but is no token.
    texts = 876 * 32 + int(text_dm.val_set[:]["length"].sum()) + int(lengths.sum())
    assert m["tokens"] == texts
    blocks = text_dm.test_set[:]
    logp = torch.log_softmax(tiny_teacher(blocks["input_ids"]).logits.float(), -1)
    mask = torch.arange(32) < blocks["length"][:, None]
    test_only = build_cache(tiny_teacher, text_dm, tmp_path / "t", top_k=16, splits=("test",), progress=False)
    assert test_only["tokens"] == int(lengths.sum())
    assert test_only["reconstruction_kl"] == pytest.approx(reconstruction_kl(logp[mask], 16).mean().item(), rel=1e-4)
    assert test_only["reconstruction_kl"] != pytest.approx(reconstruction_kl(logp, 16).mean().item(), rel=1e-4)


def test_a_built_cache_gains_the_test_split_without_recomputing_the_others(tiny_teacher, dm, tmp_path, monkeypatch):
    # The default splits were train and val: such a cache is extended by the new default, not refused or rebuilt.
    out = tmp_path / "c"
    settings = {"top_k": 8, "max_blocks": 16, "progress": False}
    build_cache(tiny_teacher, dm, out, splits=("train", "val"), **settings)
    kept = (out / "train-00000.safetensors").stat().st_mtime_ns
    # Training from it is allowed; that the report will stop at the test split is said at start-up.
    with pytest.warns(UserWarning, match=r"holds train \(16 blocks\), val \(16 blocks\): the end-of-run report"):
        CachedTeacher(str(out)).check_data(dm)
    calls = []
    original = type(tiny_teacher).forward
    monkeypatch.setattr(type(tiny_teacher), "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    m = build_cache(tiny_teacher, dm, out, **settings)
    assert len(calls) == 2  # the 16 test blocks at batch size 8, nothing else
    assert m["complete"] and sorted(m["splits"]) == ["test", "train", "val"]
    assert (out / "train-00000.safetensors").stat().st_mtime_ns == kept
    CachedTeacher(str(out))(dm.test_set[:2]["input_ids"])


def _rebuild_recipe(cache_dir) -> dict:
    """The tiny teacher's config node, as conf/teacher/tiny_random.yaml resolves under the tests' cache_dir."""
    return {"_target_": "distill.models.teacher.random_teacher", "cache_dir": str(cache_dir), "seed": 0}


def test_from_teacher_copies_the_teacher_a_cache_was_built_from_then_lets_it_go(
    tiny_teacher, dm, tmp_path, cache_dir, monkeypatch
):
    import gc
    import weakref

    from students import from_teacher

    out = tmp_path / "c"
    m = build_cache(tiny_teacher, dm, out, top_k=8, max_blocks=8, progress=False, source=_rebuild_recipe(cache_dir))
    assert m["teacher_source"] == _rebuild_recipe(cache_dir)
    cached = CachedTeacher(str(out))
    loaded = []
    real_source = CachedTeacher.source_teacher
    monkeypatch.setattr(CachedTeacher, "source_teacher", lambda self: loaded.append(real_source(self)) or loaded[-1])

    def build(teacher, **kwargs):
        student = from_teacher.build(teacher, num_layers=1, **kwargs)
        return student, {k: v.clone() for k, v in student.state_dict().items()}

    _, want = build(tiny_teacher)
    _, got = build(cached)
    assert len(loaded) == 1 and loaded[0] is not tiny_teacher
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    freed = weakref.ref(loaded.pop())
    gc.collect()
    assert freed() is None  # the student holds copies; the loaded teacher is gone
    # Measured layers: the recorded teacher scores them as the live one does.
    measure = {"select": "block_influence", "calibration": dm.train_set, "calibration_batches": 1}
    measured, _ = build(cached, calibration_tokens=32, **measure)
    live, _ = build(tiny_teacher, calibration_tokens=32, **measure)
    assert measured.layer_selection == live.layer_selection
    # A depth the cache's architecture rules out is refused before anything is loaded.
    with pytest.raises(ConfigError, match=r"^student.num_layers=3: from_teacher can copy between 1 and 2"):
        from_teacher.build(cached, num_layers=3)
    assert len(loaded) == 1  # the measured build's only


def test_from_teacher_refuses_a_cache_whose_teacher_changed_or_is_not_recorded(tiny_teacher, dm, tmp_path, cache_dir):
    from students import from_teacher

    out = tmp_path / "c"
    build_cache(tiny_teacher, dm, out, top_k=8, max_blocks=8, progress=False, source=_rebuild_recipe(cache_dir))
    manifest = json.loads((out / "manifest.json").read_text())
    # The recorded source now gives other weights (as a model folder overwritten since the build would).
    other = {**manifest, "teacher_source": {**_rebuild_recipe(cache_dir), "seed": 1}}
    (out / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"^teacher.path=.*: the teacher it was built from .* now has other weights"):
        from_teacher.build(CachedTeacher(str(out)), num_layers=1)
    broken = {**manifest, "teacher_source": {**_rebuild_recipe(cache_dir), "no_such_argument": 1}}
    (out / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match=r"^teacher.path=.*: the teacher the cache was built from cannot be loaded"):
        from_teacher.build(CachedTeacher(str(out)), num_layers=1)
    (out / "manifest.json").write_text(json.dumps({**manifest, "teacher_source": None}))
    with pytest.raises(ConfigError, match=r"^teacher.path=.*: the cache does not record the teacher it was built"):
        from_teacher.build(CachedTeacher(str(out)), num_layers=1)
    # A build resumed without a source keeps the recorded one (the weights hash shows it is the same teacher).
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = build_cache(tiny_teacher, dm, out, top_k=8, max_blocks=8, progress=False)
    assert again["teacher_source"] == _rebuild_recipe(cache_dir)


def test_train_builds_a_measured_copy_of_the_cached_teacher_and_trains_it_from_the_cache(
    tiny_teacher, text_dm, tmp_path, cache_dir
):
    from distill.recipe.setup import build_models, check_settings
    from tests.conftest import compose_cfg

    data = ["data=text", f"data.files={text_dm.files}", "data.block_size=32"]
    cache_cfg = compose_cfg(["teacher=tiny_random", *data], tmp_path, cache_dir)
    build_cache(tiny_teacher, text_dm, tmp_path / "c", top_k=8, batch_size=64, progress=False, source=cache_cfg.teacher)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["teacher_source"] == {
        **_rebuild_recipe(cache_dir),
        "vocab_size": 512,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 128,
        "model_type": "llama",
    }  # the resolved node of conf/teacher/tiny_random.yaml
    overrides = ["teacher=cached", f"teacher.path={tmp_path / 'c'}", "student=from_teacher", "student.num_layers=1"]
    measure = ["student.select=block_influence", "student.calibration_batches=1", "student.calibration_tokens=16"]
    cfg = compose_cfg([*overrides, *measure, *data], tmp_path, cache_dir)
    objects = build_models(cfg, check_settings(cfg))
    assert isinstance(objects["teacher"], CachedTeacher)  # what trains the student
    student = objects["student"]
    assert student.config.num_hidden_layers == 1 and student.layer_selection["kept"] in ([0], [1])
    kept = student.layer_selection["kept"][0]
    torch.testing.assert_close(
        student.model.layers[0].mlp.up_proj.weight, tiny_teacher.model.model.layers[kept].mlp.up_proj.weight
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_kd_is_the_online_kd_over_top_k_plus_one_tail_bucket(tiny_teacher, dm, tmp_path, temperature):
    from distill.objective.objective import DistillationObjective

    build_cache(tiny_teacher, dm, tmp_path / "c", top_k=16, max_blocks=8, progress=False)
    cached = CachedTeacher(str(tmp_path / "c"))
    ids = dm.train_set[0:4]["input_ids"]
    labels = ids.clone()
    student = torch.randn(4, 32, 512, generator=torch.Generator().manual_seed(0)) * 2
    teacher_logits = tiny_teacher(ids).logits.float()
    objective = DistillationObjective(loss="forward_kl", alpha=1.0, temperature=temperature)
    online = objective(student, teacher_logits, labels)["kd"].item()
    got = objective(student, cached.targets(ids, temperature), labels)["kd"].item()

    # Chain rule of KL, computed here from the full distributions: the online KL is the bucket KL plus the
    # tail's mass times the KL between the two tails' conditional distributions.
    p = torch.log_softmax(teacher_logits[:, :-1].double() / temperature, -1)
    q = torch.log_softmax(student[:, :-1].double() / temperature, -1)
    top = p.topk(16, -1).indices
    outside = torch.ones_like(p, dtype=torch.bool).scatter_(-1, top, False)
    p_tail = p.masked_fill(~outside, float("-inf")).logsumexp(-1)
    q_tail = q.masked_fill(~outside, float("-inf")).logsumexp(-1)
    p_cond, q_cond = p - p_tail[..., None], q - q_tail[..., None]
    tail_kl = torch.where(outside, p_cond.exp() * (p_cond - q_cond), 0.0).sum(-1)
    assert online - got == pytest.approx((p_tail.exp() * tail_kl).mean().item(), rel=1e-3, abs=1e-5)
    assert 0 <= got <= online
    # The bound the issue asks for: the gap never exceeds the mean tail mass times the largest tail KL.
    assert online - got <= p_tail.exp().mean().item() * tail_kl.max().item() + 1e-6
    # Tempered consistently: the teacher's buckets are its tempered distribution (top k exact, tail mass exact).
    buckets = cached.targets(ids, temperature)[:, :-1]
    torch.testing.assert_close(buckets.logprobs[..., :-1], p.gather(-1, top).float(), atol=5e-3, rtol=0)
    torch.testing.assert_close(buckets.logprobs[..., -1], p_tail.float(), atol=5e-3, rtol=1e-3)


def test_a_temperature_the_cache_lacks_and_an_old_format_are_refused(tiny_teacher, dm, tmp_path):
    build_cache(tiny_teacher, dm, tmp_path / "c", top_k=8, max_blocks=8, progress=False, temperatures=(1.0, 4.0))
    cached = CachedTeacher(str(tmp_path / "c"))
    ids = dm.train_set[0:2]["input_ids"]
    assert cached.targets(ids, 4.0).logprobs.shape == (2, 32, 9)
    with pytest.raises(
        ConfigError, match=r"^distill.objective.temperature=2.0: the teacher cache holds the temperatures \[1.0, 4.0\]"
    ):
        cached.targets(ids, 2.0)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(ConfigError, match=r"format version 1, this distill reads version 2; rebuild it"):
        CachedTeacher(str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"^cache.temperatures=\[0.0\]: give one or more temperatures > 0"):
        build_cache(tiny_teacher, dm, tmp_path / "d", top_k=8, max_blocks=8, progress=False, temperatures=(0.0,))


def test_interrupted_build_resumes_without_recomputing_done_shards(tiny_teacher, dm, tmp_path, monkeypatch):
    out = tmp_path / "c"
    build_cache(tiny_teacher, dm, out, top_k=8, max_blocks=48, blocks_per_shard=16, splits=("train",), progress=False)
    first = (out / "train-00000.safetensors").stat().st_mtime_ns
    (out / "train-00002.safetensors").unlink()  # as if the build died while writing the last shard
    calls = []
    original = type(tiny_teacher).forward
    monkeypatch.setattr(type(tiny_teacher), "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    m = build_cache(
        tiny_teacher, dm, out, top_k=8, max_blocks=48, blocks_per_shard=16, splits=("train",), progress=False
    )
    assert len(calls) == 2  # 16 blocks of the missing shard at batch size 8
    assert (out / "train-00000.safetensors").stat().st_mtime_ns == first
    assert m["complete"]


def test_mismatches_are_refused(tiny_teacher, dm, tmp_path, cache_dir):
    out = tmp_path / "c"
    build_cache(tiny_teacher, dm, out, top_k=8, max_blocks=16, progress=False)
    with pytest.raises(ConfigError, match=r"cache.dir=.*another top_k"):
        build_cache(tiny_teacher, dm, out, top_k=4, max_blocks=16, progress=False)
    # Same name, other weights (a fine-tune saved over the original): refused by the weights hash.
    with torch.no_grad():
        next(tiny_teacher.model.parameters()).add_(1.0)
    try:
        with pytest.raises(ConfigError, match=r"cache.dir=.*another weights"):
            build_cache(tiny_teacher, dm, out, top_k=8, max_blocks=16, progress=False)
    finally:
        with torch.no_grad():
            next(tiny_teacher.model.parameters()).sub_(1.0)
    teacher = CachedTeacher(str(out))
    other = DistillDataModule(tiny_teacher.tokenizer, cache_dir=str(cache_dir / "data"), block_size=32, seed=99)
    other.setup()
    with pytest.raises(ConfigError, match=r"teacher.path=.*cache was built for data key .* rebuild the cache"):
        teacher.check_data(other)
    with pytest.raises(ConfigError, match="not in the teacher cache"):
        teacher(dm.train_set[100:101]["input_ids"])  # beyond max_blocks: never cached
    with pytest.raises(ConfigError, match="teacher.path=.*no teacher cache here"):
        CachedTeacher(str(tmp_path))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ConfigError, match="incomplete"):
        CachedTeacher(str(out))


def test_live_and_cached_teachers_are_both_teachers(tiny_teacher, dm, tmp_path):
    from types import SimpleNamespace

    build_cache(tiny_teacher, dm, tmp_path / "c", top_k=8, max_blocks=16, progress=False)
    cached = CachedTeacher(str(tmp_path / "c"))
    assert isinstance(tiny_teacher, Teacher) and isinstance(cached, Teacher)
    assert cached.cached and not tiny_teacher.cached
    assert cached.identity == {"name": f"cached:{tiny_teacher.name}", "tokenizer": tiny_teacher.identity["tokenizer"]}
    # check_data is part of the protocol: an object with everything else is not a Teacher.
    members = ("name", "tokenizer", "cached", "config", "vocab_size", "identity", "__call__", "forward", "rows")
    members += ("train",)
    assert not isinstance(SimpleNamespace(**dict.fromkeys(members, print)), Teacher)
    assert isinstance(SimpleNamespace(**dict.fromkeys((*members, "check_data"), print)), Teacher)
    # A live teacher fits every corpus; the cache only the data it was built from, found without tokenising.
    never_read = SimpleNamespace(data_key=lambda: pytest.fail("a live teacher read the data"), block_size=7)
    assert tiny_teacher.check_data(never_read) is None
    cached.check_data(dm)
    mismatch = r"teacher.path=.*\(block_size 32\) but this run's data is .* \(block_size 16\); rebuild the cache"
    with pytest.raises(ConfigError, match=mismatch):
        cached.check_data(SimpleNamespace(data_key=dm.data_key, block_size=16))


def test_train_from_cache_without_the_teacher(tiny_teacher, tiny_cfg, tmp_path):
    from pydoc_data.topics import topics

    from distill.config import build
    from tests.helpers import read_metrics, series
    from train import train

    (tmp_path / "corpus.txt").write_text("\n".join(sorted(topics.values())[:12]))
    data = ("data=text", f"data.files={tmp_path / 'corpus.txt'}")
    cache_cfg = tiny_cfg(*data)
    small = build(cache_cfg.data, tokenizer=tiny_teacher.tokenizer)
    small.setup()
    build_cache(tiny_teacher, small, tmp_path / "c", top_k=32, batch_size=64, progress=False)
    cfg = tiny_cfg(
        *data,
        "teacher=cached",
        f"teacher.path={tmp_path / 'c'}",
        "trainer.max_steps=40",
        "trainer.log_every_n_steps=1",
        "distill.objective.chunked=true",
        # The report's other held-out set (English prose) is in no teacher cache: the report's handling of it is
        # not this test's subject. The test split is scored against the cache, its padded last block included.
        "~eval.heldout.english",
    )
    metrics, objects = train(cfg)
    assert isinstance(objects["teacher"], CachedTeacher)
    losses = [v for _, v in series(read_metrics(tmp_path), "train/loss")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    assert "heldout/student/ppl" in metrics

    from students import from_teacher

    # A cache built without its teacher's source (a library call without `source=`) cannot seed a copy of it.
    refusal = r"^teacher.path=.*: the cache does not record the teacher it was built from, .*; rebuild it with"
    with pytest.raises(ConfigError, match=refusal):
        from_teacher.build(objects["teacher"], num_layers=1)
    with pytest.raises(ConfigError, match="cache was built for data key"):
        train(
            tiny_cfg(
                *data, "teacher=cached", f"teacher.path={tmp_path / 'c'}", "data.seed=5", output_dir=tmp_path / "y"
            )
        )


@pytest.mark.slow  # two builds and three interpreters, about 90 s loaded; build_cache is tested in-process
def test_cli_writes_what_build_cache_writes(tiny_teacher, dm, tmp_path, cache_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[2]
    common = [
        "teacher=tiny_random",
        "data.block_size=32",
        f"paths.cache_dir={cache_dir}",
        f"data.cache_dir={cache_dir}/data",
        f"hydra.run.dir={tmp_path}/run",
    ]
    settings = ["cache.top_k=8", "cache.max_blocks=8", "cache.blocks_per_shard=4", f"cache.dir={tmp_path}/cli"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "distill.models.cache_builder", *args, *common],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(root)},
            text=True,
            capture_output=True,
            timeout=300,
        )

    proc = cli(*settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(f"teacher cache at {tmp_path}/cli: top_k=8 tokens=")
    ref = build_cache(tiny_teacher, dm, tmp_path / "lib", top_k=8, max_blocks=8, blocks_per_shard=4, progress=False)
    made = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert made["complete"] and made["splits"] == ref["splits"] and made["data_key"] == ref["data_key"]
    assert sorted(made["splits"]) == ["test", "train", "val"]
    # The command records the resolved teacher node, so student=from_teacher can load the teacher again.
    assert made["teacher_source"] == {**made["teacher_source"], **_rebuild_recipe(cache_dir)}
    for split in ref["splits"].values():
        for shard in split["shards"]:
            got, want = load_file(tmp_path / "cli" / shard), load_file(tmp_path / "lib" / shard)
            assert got.keys() == want.keys()
            for key in want:
                # The fp32 normalisers may differ in the last bit between processes (thread counts); the
                # stored ids, indices and fp16 log-probabilities are bit-identical.
                exact = key not in ("shift", "tail_logmass")
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0 if exact else 1e-5)
    proc = cli("cache.top_k=0", f"cache.dir={tmp_path}/bad")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: cache.top_k=0: must lie in 1..511 (fewer than the vocabulary's ids)"
    )


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ({"blocks_per_shard": 8}, {"blocks_per_shard": 16}, "cache.blocks_per_shard=16: .* was started with 8; "),
        ({"max_blocks": 8}, {"max_blocks": 16}, "cache.max_blocks=16: .* was started with 8; "),
        ({"max_blocks": 8}, {"max_blocks": None}, "cache.max_blocks=null: .* was started with 8; "),
        ({"splits": ("train",)}, {"splits": ("val",)}, r'cache.splits=\["val"\]: .* was started with \["train"\]; '),
    ],
)
def test_a_build_resumed_with_another_layout_is_refused(first, second, message, tiny_teacher, dm, tmp_path):
    # Before, the resumed build kept the shards of the first layout and wrote the manifest complete: blocks
    # 8..15 of each split were never cached (16 blocks claimed, 8 missing; or the train split dropped), and
    # training died mid-run with "a batch block is not in the teacher cache".
    out = tmp_path / "c"
    settings = {"top_k": 8, "max_blocks": 24, "blocks_per_shard": 8, "progress": False}
    build_cache(tiny_teacher, dm, out, **{**settings, **first})
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))  # as if interrupted
    with pytest.raises(ConfigError, match=f"^{message}rerun with .* or remove {out}"):
        build_cache(tiny_teacher, dm, out, **{**settings, **second})
    assert json.loads((out / "manifest.json").read_text())["complete"] is False  # the partial build is untouched
    assert build_cache(tiny_teacher, dm, out, **{**settings, **first})["complete"]  # its own settings finish it


def test_a_shard_from_an_unrecorded_layout_is_not_kept(tiny_teacher, dm, tmp_path):
    # A partial build whose manifest predates the recorded layout: each kept shard's blocks are checked instead.
    out = tmp_path / "c"
    settings = {"top_k": 8, "max_blocks": 16, "splits": ("train",), "progress": False}
    build_cache(tiny_teacher, dm, out, blocks_per_shard=8, **settings)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["layout"]
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ConfigError, match=r"train-00000.safetensors holds blocks 0..7, but this build puts 0..15"):
        build_cache(tiny_teacher, dm, out, blocks_per_shard=16, **settings)


def test_a_report_against_the_cached_teacher_says_its_numbers_are_of_the_top_k_reconstruction(
    tiny_teacher, dm, tmp_path
):
    import copy

    from distill.eval.assess import Comparison, assess

    build_cache(tiny_teacher, dm, tmp_path / "c", top_k=8, max_blocks=8, splits=("val",), progress=False)
    cached = CachedTeacher(str(tmp_path / "c"))
    student = copy.deepcopy(tiny_teacher.model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from torch.utils.data import DataLoader

    rows = [{"input_ids": dm.val_set[i]["input_ids"]} for i in range(8)]
    batches = DataLoader([DistillDataModule.collate(rows)], batch_size=None)  # one batch of cached blocks
    settings = {
        "max_batches": 1,
        "tasks": [],
        "fidelity_prompts": 1,
        "new_tokens": 2,
        "speed_runs": 0,
        "prompt_tokens": 8,
    }
    reports = {
        name: assess(Comparison(student, teacher, tiny_teacher.tokenizer, batches, 512), settings, tmp_path / name)
        for name, teacher in (("live", tiny_teacher), ("cached", cached))
    }
    live, top_k = (reports[n]["metrics"] for n in ("live", "cached"))
    # What the note says: the teacher's perplexity and the KL are the reconstruction's (a random teacher is near
    # uniform, so near the truth: 513 vs 518 here), top-1 agreement is exact.
    assert top_k["teacher"]["heldout/ppl"] != pytest.approx(live["teacher"]["heldout/ppl"], rel=1e-4)
    assert top_k["student"]["heldout/kl_to_teacher"] != pytest.approx(
        live["student"]["heldout/kl_to_teacher"], rel=0.01
    )
    assert top_k["student"]["heldout/top1_agreement"] == live["student"]["heldout/top1_agreement"] < 1
    note = next(n for n in reports["cached"]["notes"] if n.startswith("teacher (top-8 cache): teacher=cached"))
    assert "not against the teacher itself" in note and "top-1 agreement and the teacher's accuracy are exact" in note
    assert note in (tmp_path / "cached" / "report.md").read_text()
    assert not any("top-8 cache" in n for n in reports["live"]["notes"])
