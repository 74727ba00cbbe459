"""Low-rank factorization: SVD maths, whitening, rank choice, exports, composing with sharing, errors.

Resume after a crash mid-run: tests/test_resume.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from callbacks.lowrank import LowRankFactorization
from distill.compress.lowrank import (
    factorize,
    input_grams,
    max_useful_rank,
    rank_for_energy,
    ranks_for_budget,
    svd_factors,
    target_linears,
)
from distill.compress.share import share_groups, tie_layers
from distill.config import ConfigError
from distill.export.compact import plain_copy, save_compact
from distill.loaders.load_compact import LowRankLinear, load_compact
from students import scratch
from train import train

PROBE = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))


def _student(teacher, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return scratch.build(teacher, hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=1, intermediate_size=48)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_rank_reproduces_w_and_truncation_error_is_the_discarded_spectrum():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    up, down, s = svd_factors(w)
    assert up.shape == (24, 24) and down.shape == (24, 40)
    torch.testing.assert_close(up @ down, w, rtol=0, atol=1e-10)
    for r in (1, 5, 17):
        up, down, s = svd_factors(w, r)
        err = w - up @ down
        # Eckart–Young: the best rank-r error is the discarded singular values, in both norms.
        assert torch.linalg.matrix_norm(err) ** 2 == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-9)
        assert torch.linalg.matrix_norm(err, ord=2) == pytest.approx(float(s[r]), rel=1e-9)


def test_whitening_cuts_the_error_on_the_calibration_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    # Inputs with very uneven feature scales: plain SVD ignores them, whitened SVD does not.
    x = torch.randn(500, 48, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 48, dtype=torch.float64)
    gram = x.T @ x
    up, down, _ = svd_factors(w, None, gram, damping=1e-8)
    torch.testing.assert_close(up @ down, w, rtol=0, atol=1e-7)  # full rank: still exactly W
    for r in (4, 12):
        plain = svd_factors(w, r)
        white = svd_factors(w, r, gram, damping=1e-8)
        err_plain = torch.linalg.matrix_norm(x @ (w - plain[0] @ plain[1]).T)
        err_white = torch.linalg.matrix_norm(x @ (w - white[0] @ white[1]).T)
        assert err_white < 0.7 * err_plain, (r, err_white, err_plain)
        # The whitened error is the discarded spectrum of W·L (up to the tiny damping).
        assert err_white**2 == pytest.approx(float((white[2][r:] ** 2).sum()), rel=1e-4)


def test_rank_choice_by_energy_and_by_budget():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.65) == 2
    assert rank_for_energy(s, 13 / 14) == 2
    assert rank_for_energy(s, 1.0) == 3
    flat, steep = torch.ones(16), torch.tensor([10.0] + [0.1] * 15)
    spectra = {"flat": (flat, 16, 16), "steep": (steep, 16, 16)}
    ranks = ranks_for_budget(spectra, 0.5)
    assert sum(r * 32 for r in ranks.values()) <= 0.5 * 2 * 256
    assert ranks["steep"] == 1 and ranks["flat"] == 7  # the budget goes where the energy is
    assert ranks_for_budget(spectra, 1.0) == {"flat": 7, "steep": 7}  # capped below the break-even rank 7.97
    assert max_useful_rank(16, 16) == 7 and max_useful_rank(32, 96) == 23


def test_bad_settings_are_refused(tiny_teacher):
    student = _student(tiny_teacher)  # projections are 32×32, 16×32, 48×32, 32×48
    with pytest.raises(ConfigError, match=r"lowrank.rank=16: .*k_proj is 16×32, so the rank must be below 16"):
        LowRankFactorization(rank=16).check_rank(target_linears(student, ["q_proj", "k_proj"]))
    LowRankFactorization(rank=15).check_rank(target_linears(student, ["q_proj", "k_proj"]))
    for energy in (0, 0.0, -0.5, 1.01):
        with pytest.raises(ConfigError, match=rf"callbacks.lowrank.energy={energy}: .*must lie in \(0, 1\]"):
            LowRankFactorization(energy=energy)
    LowRankFactorization(energy=1.0)
    with pytest.raises(ConfigError, match=r"callbacks.lowrank.param_budget=1.5"):
        LowRankFactorization(param_budget=1.5)
    with pytest.raises(ConfigError, match=r"callbacks.lowrank=\['rank', 'energy'\]: set exactly one"):
        LowRankFactorization(rank=4, energy=0.9)
    with pytest.raises(ConfigError, match=r"callbacks.lowrank.start_step=3: .*multi-process"):
        LowRankFactorization(rank=4, start_step=3).setup(
            SimpleNamespace(world_size=2), SimpleNamespace(student=student, structure=[]), "fit"
        )


def test_factorize_keeps_sharing_and_both_exports_reproduce_logits(tiny_teacher, tmp_path):
    model = _student(tiny_teacher, layers=4)
    tie_layers(model, share_groups(4, "groups", 2))
    cb = LowRankFactorization(energy=0.6)
    modules = target_linears(model, cb.targets)
    batches = [{"input_ids": PROBE}]
    grams = input_grams(model, modules, batches)
    # Tied linears see different inputs per layer: their Gram is the sum over both uses.
    torch.testing.assert_close(grams["model.layers.0.mlp.down_proj"], grams["model.layers.1.mlp.down_proj"])
    ranks, factors = cb.plan(model, batches)
    assert ranks and all(0 < r < 32 for r in ranks.values())
    dense = sum(p.numel() for p in model.parameters())
    factorize(model, ranks, factors)
    layers = model.model.layers
    assert isinstance(layers[0].mlp.up_proj, LowRankLinear)
    assert layers[0].mlp.up_proj.down.weight is layers[1].mlp.up_proj.down.weight  # the tie survives
    assert layers[0].mlp.up_proj.down.weight is not layers[2].mlp.up_proj.down.weight
    assert sum(p.numel() for p in model.parameters()) < dense
    expected = _logits(model, PROBE)

    plain = plain_copy(model)
    assert type(plain.model.layers[0].mlp.up_proj) is torch.nn.Linear
    plain.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    torch.testing.assert_close(_logits(reloaded, PROBE), expected, rtol=0, atol=1e-5)
    save_compact(model, tiny_teacher.tokenizer, tmp_path / "compact")
    back = load_compact(tmp_path / "compact")
    assert back.model.layers[0].mlp.up_proj.up.weight is back.model.layers[1].mlp.up_proj.up.weight
    torch.testing.assert_close(_logits(back, PROBE), expected, rtol=0, atol=1e-5)


def test_budget_run_with_whitening_after_sharing_factorises_and_exports(tiny_cfg, tmp_path):
    common = (
        "student.num_layers=2",
        "student.intermediate_size=96",
        "callbacks=[share,lowrank]",
        "callbacks.share.pattern=all",
        "callbacks.lowrank.start_step=3",
        "callbacks.lowrank.calibration_batches=2",
        "trainer.max_steps=8",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=0",
        "eval.enabled=false",
    )
    full_dir = tmp_path / "full"
    _, full = train(tiny_cfg(*common, output_dir=full_dir))
    module, student = full["module"], full["student"]
    assert [c["kind"] for c in module.structure] == ["share", "lowrank"]
    lowrank = next(cb for cb in full["trainer"].callbacks if isinstance(cb, LowRankFactorization))
    mods = target_linears(_student_like(student), lowrank.targets)  # the dense shapes, from a fresh copy
    layer0 = [n for n in mods if n.startswith("model.layers.0.")]
    assert set(layer0) <= set(lowrank.ranks)  # under a budget every target is factorised
    dense = sum(mods[n].weight.numel() for n in layer0)
    kept = sum(lowrank.ranks[n] * (mods[n].in_features + mods[n].out_features) for n in layer0)
    assert 0.4 * dense < kept <= 0.5 * dense  # the 50% budget over the (shared, so counted once) projections
    unique = {id(p): p.numel() for n, p in student.named_parameters() if ".layers." in n and "norm" not in n}
    assert sum(unique.values()) == kept
    assert student.model.layers[0].mlp.up_proj.up.weight is student.model.layers[1].mlp.up_proj.up.weight
    expected = _logits(student, PROBE)
    plain = AutoModelForCausalLM.from_pretrained(full["export_dir"])
    torch.testing.assert_close(_logits(plain, PROBE), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(load_compact(full_dir / "student_compact"), PROBE), expected, rtol=0, atol=1e-5)


def _student_like(student):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(student.config)


def test_sharing_applies_first_whatever_the_callback_order(tiny_cfg, tmp_path):
    from callbacks.share import CrossLayerSharing

    cfg = tiny_cfg(
        "student.num_layers=2",
        "callbacks=[lowrank,share]",
        "callbacks.share.pattern=all",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "eval.enabled=false",
        "export.enabled=false",
    )
    _, objects = train(cfg)
    kinds = [type(cb) for cb in objects["trainer"].callbacks]
    # Configured the "wrong" way round; train.py puts compression callbacks in STAGES order.
    assert kinds.index(CrossLayerSharing) < kinds.index(LowRankFactorization)
    assert [c["kind"] for c in objects["module"].structure] == ["share", "lowrank"]
    layers = objects["student"].model.layers
    assert layers[0].mlp.down_proj.up.weight is layers[1].mlp.down_proj.up.weight
