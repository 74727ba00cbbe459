"""Cross-layer sharing: real ties, init values, LoRA relaxation, both exports, errors.

Resume after a crash mid-run: tests/test_resume.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from callbacks.share import CrossLayerSharing
from distill.compress.share import add_lora, share_groups, tie_layers
from distill.config import ConfigError
from distill.export.compact import plain_copy, save_compact
from distill.loaders.load_compact import load_compact
from students import scratch
from train import train


def _student(teacher, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return scratch.build(teacher, hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=1, intermediate_size=48)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


PROBE = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))


def test_patterns():
    assert share_groups(6, "all") == [[0, 1, 2, 3, 4, 5]]
    assert share_groups(6, "groups", 2) == [[0, 1], [2, 3], [4, 5]]
    assert share_groups(6, "cycle", 2) == [[0, 2, 4], [1, 3, 5]]
    assert share_groups(6, [[4, 1], [2]]) == [[1, 4]]  # singleton groups are no sharing


def test_all_sharing_is_one_block_and_a_step_moves_every_member_identically(tiny_teacher):
    model = _student(tiny_teacher)
    layers = model.model.layers
    per_layer = sum(p.numel() for p in layers[0].parameters())
    n_before = len(list(model.parameters()))
    tie_layers(model, share_groups(4, "all"), init="first")

    unique_layer_params = {id(p): p.numel() for layer in layers for p in layer.parameters()}
    assert sum(unique_layer_params.values()) == per_layer
    assert len(list(model.parameters())) == n_before - 3 * len(list(layers[0].parameters()))
    assert all(layers[i].mlp.up_proj.weight is layers[0].mlp.up_proj.weight for i in range(4))
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]  # per-layer cache slots kept

    # The shared gradient is the sum of the per-use gradients: compare with an untied copy of equal values.
    untied = plain_copy(model)
    assert untied.model.layers[1].mlp.up_proj.weight is not untied.model.layers[0].mlp.up_proj.weight
    model.train(), untied.train()
    model(input_ids=PROBE, labels=PROBE).loss.backward()
    untied(input_ids=PROBE, labels=PROBE).loss.backward()
    summed = sum(untied.model.layers[i].mlp.up_proj.weight.grad for i in range(4))
    torch.testing.assert_close(layers[0].mlp.up_proj.weight.grad, summed, rtol=1e-5, atol=1e-7)

    before = layers[0].self_attn.q_proj.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    opt.step()
    assert not torch.equal(layers[0].self_attn.q_proj.weight, before)
    for i in range(1, 4):
        for (name, p), q in zip(layers[0].named_parameters(), layers[i].parameters(), strict=True):
            assert torch.equal(p, q), (i, name)

    # Incremental decoding with the KV cache equals the full forward: each layer still has its own slot.
    with torch.no_grad():
        model.eval()
        full = model(input_ids=PROBE).logits
        out = model(input_ids=PROBE[:, :6], use_cache=True)
        step = model(input_ids=PROBE[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 6:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("init", "pick"), [("mean", None), ("first", 0), (1, 1)])
def test_init_values(tiny_teacher, init, pick):
    model = _student(tiny_teacher)
    layers = model.model.layers
    orig = [{k: v.detach().clone() for k, v in layer.named_parameters()} for layer in layers]
    tie_layers(model, share_groups(4, "cycle", 2), init=init)  # groups [0, 2] and [1, 3]
    for group in ([0, 2], [1, 3]):
        for name, p in layers[group[0]].named_parameters():
            want = (orig[group[0]][name] + orig[group[1]][name]) / 2 if pick is None else orig[group[pick]][name]
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7)
            assert layers[group[1]].get_parameter(name) is p


def test_lora_relaxation_and_both_exports_reproduce_logits(tiny_teacher, tmp_path):
    model = _student(tiny_teacher)
    tie_layers(model, share_groups(4, "groups", 2), init="mean")
    tied_only = sum(p.numel() for p in model.parameters())
    names = add_lora(model, [[0, 1], [2, 3]], rank=2, alpha=4.0, targets=["q_proj", "down_proj"])
    assert len(names) == 8
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.base_layer.weight is layers[1].self_attn.q_proj.base_layer.weight
    assert layers[0].self_attn.q_proj.base_layer.weight.requires_grad  # peft froze it; sharing keeps it trainable
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_params == 4 * (2 * (32 + 32) + 2 * (48 + 32))
    assert sum(p.numel() for p in model.parameters()) == tied_only + lora_params
    with torch.no_grad():  # make the deltas non-zero (peft initialises B to 0), so tied layers now differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    expected = _logits(model, PROBE)

    plain = plain_copy(model)
    assert plain.model.layers[0].self_attn.q_proj.weight is not plain.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(plain.model.layers[0].self_attn.q_proj.weight, plain.model.layers[1].self_attn.q_proj.weight)
    plain.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    torch.testing.assert_close(_logits(reloaded, PROBE), expected, rtol=0, atol=1e-5)

    save_compact(model, tiny_teacher.tokenizer, tmp_path / "compact")
    torch.testing.assert_close(_logits(load_compact(tmp_path / "compact"), PROBE), expected, rtol=0, atol=1e-5)


def _tensor_bytes(path: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


def test_svd_lora_init_is_the_best_rank_r_fit_of_each_layers_residual(tiny_teacher):
    model = _student(tiny_teacher)
    layers = model.model.layers
    orig = {
        i: {n: m.weight.detach().clone() for n, m in layers[i].named_modules() if n.endswith("_proj")} for i in (0, 1)
    }
    expected = _logits(model, PROBE)
    cb = CrossLayerSharing(pattern=[[0, 1]], lora_rank=16, lora_targets=["q_proj", "k_proj", "v_proj"], lora_init="svd")
    cb.compress(model)
    for i in (0, 1):
        shared = layers[i].self_attn.q_proj.get_base_layer().weight
        assert shared is layers[1 - i].self_attn.q_proj.get_base_layer().weight
        for proj in ("q_proj", "k_proj", "v_proj"):
            layer = getattr(layers[i].self_attn, proj)
            effective = shared if proj == "q_proj" else layer.get_base_layer().weight
            effective = effective + layer.get_delta_weight("default")
            residual = orig[i][f"self_attn.{proj}"] - layer.get_base_layer().weight
            s = torch.linalg.svdvals(residual.double())
            err = torch.linalg.matrix_norm((orig[i][f"self_attn.{proj}"] - effective).detach().double()) ** 2
            # Eckart–Young on the residual: rank 16 keeps all of k/v (16×32), the top half of q (32×32).
            assert float(err) == pytest.approx(float((s[16:] ** 2).sum()), rel=1e-3, abs=1e-9), (i, proj)
    # At full rank on every projection the relaxed model is the untied one again (fresh norms are all ones).
    full = _student(tiny_teacher)
    CrossLayerSharing(pattern="all", lora_rank=32, lora_init="svd").compress(full)
    assert (
        full.model.layers[0].mlp.up_proj.get_base_layer().weight is full.model.layers[3].mlp.up_proj.base_layer.weight
    )
    torch.testing.assert_close(_logits(full, PROBE), expected, rtol=0, atol=1e-4)

    # The member whose weight became the shared one has no residual: it keeps peft's init (A random, B 0),
    # because A = B = 0 would get no gradient and never train.
    first = _student(tiny_teacher)
    CrossLayerSharing(pattern=[[0, 1]], init="first", lora_rank=4, lora_targets=["q_proj"], lora_init="svd").compress(
        first
    )
    q0, q1 = first.model.layers[0].self_attn.q_proj, first.model.layers[1].self_attn.q_proj
    assert q0.lora_A["default"].weight.abs().sum() > 0 and q0.lora_B["default"].weight.abs().sum() == 0
    assert q1.lora_B["default"].weight.abs().sum() > 0


def test_compact_export_stores_shared_tensors_once_and_loads_without_this_package(tiny_teacher, tmp_path):
    model = _student(tiny_teacher, layers=6)
    tie_layers(model, share_groups(6, "all"), init="mean")
    expected = _logits(model, PROBE)
    save_compact(model, tiny_teacher.tokenizer, tmp_path / "compact")
    plain_copy(model).save_pretrained(tmp_path / "plain")
    compact_bytes = _tensor_bytes(tmp_path / "compact" / "model.safetensors")
    plain_bytes = _tensor_bytes(tmp_path / "plain" / "model.safetensors")
    layer_bytes = 4 * sum(p.numel() for p in model.model.layers[0].parameters())
    assert plain_bytes - compact_bytes == 5 * layer_bytes  # 5 of the 6 layers are not stored again

    torch.save(PROBE, tmp_path / "probe.pt")
    script = textwrap.dedent(f"""
        import sys
        for blocked in ("distill", "callbacks", "students"):
            sys.modules[blocked] = None  # any import of this repository's packages fails
        sys.path.insert(0, {str(tmp_path / "compact")!r})
        import torch
        from load_compact import load_compact
        m = load_compact({str(tmp_path / "compact")!r})
        layers = m.model.layers
        assert all(l.mlp.up_proj.weight is layers[0].mlp.up_proj.weight for l in layers)
        with torch.no_grad():
            torch.save(m(input_ids=torch.load({str(tmp_path / "probe.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=1e-5)


def test_bad_settings_are_refused(tiny_teacher):
    with pytest.raises(ConfigError, match=r"callbacks.share.group_size=4: .*divisor of the student's 6 layers"):
        share_groups(6, "groups", 4)
    with pytest.raises(ConfigError, match=r"callbacks.share.group_size=4"):
        share_groups(6, "cycle", 4)
    with pytest.raises(ConfigError, match=r"callbacks.share.pattern=\[\[0, 1\], \[1, 2\]\]: .*disjoint"):
        share_groups(6, [[0, 1], [1, 2]])
    with pytest.raises(ConfigError, match=r"callbacks.share.pattern='pairs'"):
        CrossLayerSharing(pattern="pairs")
    with pytest.raises(ConfigError, match=r"callbacks.share.init=5: .*\[0, 2\)"):
        tie_layers(_student(tiny_teacher), [[0, 1], [2, 3]], init=5)
    student = _student(tiny_teacher, layers=3)
    module = SimpleNamespace(student=student, structure=[])
    with pytest.raises(ConfigError, match=r"callbacks.share.group_size=2: .*3 layers"):
        CrossLayerSharing(group_size=2).setup(SimpleNamespace(world_size=1), module, "fit")
    with pytest.raises(ConfigError, match=r"callbacks.share.start_step=5: .*multi-process.*start_step=0"):
        CrossLayerSharing(pattern="all", start_step=5).setup(SimpleNamespace(world_size=2), module, "fit")


def test_mid_run_sharing_with_lora_ties_and_exports(tiny_cfg, tmp_path):
    common = (
        "student.num_layers=4",
        "callbacks=share",
        "callbacks.share.start_step=3",
        "callbacks.share.lora_rank=2",
        "trainer.max_steps=8",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=0",
        "eval.enabled=false",
    )
    full_dir = tmp_path / "full"
    _, full = train(tiny_cfg(*common, output_dir=full_dir))
    student, trainer = full["student"], full["trainer"]
    layers = student.model.layers
    assert layers[0].mlp.up_proj.base_layer.weight is layers[1].mlp.up_proj.base_layer.weight
    assert layers[1].mlp.up_proj.base_layer.weight is not layers[2].mlp.up_proj.base_layer.weight
    opt_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert len(opt_params) == len({id(p) for p in opt_params}) == len(full["module"].trainable_parameters())
    assert full["module"].structure[0]["kind"] == "share"

    # Both exports of the finished run reproduce the live student.
    expected = _logits(student, PROBE)
    plain = AutoModelForCausalLM.from_pretrained(full["export_dir"])
    torch.testing.assert_close(_logits(plain, PROBE), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(load_compact(full_dir / "student_compact"), PROBE), expected, rtol=0, atol=1e-5)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_sim_ties_before_wrapping_and_exports(tmp_path, cache_dir):
    import os

    root = Path(__file__).resolve().parents[2]
    args = [
        "experiment=smoke",
        "trainer=ddp_sim",
        "callbacks=[share,lowrank]",
        "student.num_layers=2",
        "callbacks.share.pattern=all",
        "callbacks.lowrank.calibration_batches=2",
        f"hydra.run.dir={tmp_path}/run",
        f"paths.cache_dir={cache_dir}",
        f"data.cache_dir={cache_dir}/data",
        "callbacks.progress_bar=null",
        "eval.enabled=false",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, str(root / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "All distributed processes registered" in out
    logs = "".join(p.read_text() for p in (tmp_path / "run").glob("train*.log"))
    assert logs.count("shared layers [[0, 1]] at step 0") == 2  # both ranks tied before DDP wrapped the model
    ranks = [line.split("(ranks ")[1].split(")")[0] for line in logs.splitlines() if "factorised" in line]
    assert len(ranks) == 2 and ranks[0] == ranks[1]  # both ranks chose the same shapes
    student = load_compact(tmp_path / "run" / "student_compact")
    assert student.model.layers[0].mlp.up_proj.up.weight is student.model.layers[1].mlp.up_proj.up.weight
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
