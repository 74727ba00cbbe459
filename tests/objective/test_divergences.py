"""Divergences and the objective against float64 references written as explicit sums."""

from __future__ import annotations

import math

import pytest
import torch

from distill.config import ConfigError
from distill.objective.divergences import (
    DIVERGENCES,
    HiddenStateLoss,
    jsd,
    next_token_ce,
    temperature_scale,
)
from distill.objective.objective import DistillationObjective

B, T, V = 2, 5, 7


def _softmax64(logits: torch.Tensor, temperature: float) -> list[list[list[float]]]:
    x = logits.double() / temperature
    return torch.softmax(x, -1).tolist()


def _reference(
    name: str,
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    beta: float = 0.5,
    skew: float = 0.1,
) -> float:
    """The divergence as an explicit Python sum over batch, positions and vocabulary, in float64."""
    S, P = _softmax64(s_logits, temperature), _softmax64(t_logits, temperature)
    total, count = 0.0, 0
    for b in range(s_logits.shape[0]):
        for t in range(s_logits.shape[1]):
            if not mask[b, t]:
                continue
            s, p = S[b][t], P[b][t]

            def kl(a: list[float], c: list[float]) -> float:
                return sum(ai * (math.log(ai) - math.log(ci)) for ai, ci in zip(a, c, strict=True) if ai > 0)

            if name == "forward_kl" or (name == "jsd" and beta == 0):
                d = kl(p, s)
            elif name == "reverse_kl" or (name == "jsd" and beta == 1):
                d = kl(s, p)
            elif name == "jsd":
                m = [beta * pi + (1 - beta) * si for pi, si in zip(p, s, strict=True)]
                d = beta * kl(p, m) + (1 - beta) * kl(s, m)
            elif name == "skew_kl":
                d = kl(p, [skew * pi + (1 - skew) * si for pi, si in zip(p, s, strict=True)])
            elif name == "skew_rkl":
                d = kl(s, [skew * si + (1 - skew) * pi for pi, si in zip(p, s, strict=True)])
            elif name == "tvd":
                d = 0.5 * sum(abs(pi - si) for pi, si in zip(p, s, strict=True))
            else:
                raise AssertionError(name)
            total += d
            count += 1
    return total / count


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, V, generator=g) * 2
    t = torch.randn(B, T, V, generator=g) * 2
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False  # padding positions that must not count
    mask[1, 0] = False
    return s, t, mask


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_matches_explicit_sum(name, temperature, logits):
    s, t, mask = logits
    kwargs = {"beta": 0.3} if name == "jsd" else {"skew": 0.2} if name.startswith("skew") else {}
    got = DIVERGENCES[name](s, t, mask, temperature=temperature, **kwargs)
    want = _reference(name, s, t, mask, temperature, beta=kwargs.get("beta", 0.5), skew=kwargs.get("skew", 0.1))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_masked_positions_do_not_count(name, logits):
    s, t, mask = logits
    fn = DIVERGENCES[name]
    garbage_s, garbage_t = s.clone(), t.clone()
    garbage_s[~mask] = 1e4 * torch.randn_like(s[~mask])
    garbage_t[~mask] = -1e4
    assert fn(garbage_s, garbage_t, mask).item() == pytest.approx(fn(s, t, mask).item(), rel=1e-6)
    # averaging is over real tokens: duplicating the batch as padding changes nothing
    padded = torch.cat([mask, torch.zeros_like(mask)])
    assert fn(torch.cat([s, s]), torch.cat([t, t]), padded).item() == pytest.approx(fn(s, t, mask).item(), rel=1e-6)


def test_jsd_over_beta_tends_to_forward_kl_and_reverse_kl_at_the_ends(logits):
    # An independent check of what the endpoints stand for: JSD(β)/β → KL(T‖S) as β → 0 and
    # JSD(β)/(1-β) → KL(S‖T) as β → 1, both compared with the float64 reference sums.
    s, t, mask = logits
    forward, reverse = _reference("forward_kl", s, t, mask, 2.0), _reference("reverse_kl", s, t, mask, 2.0)
    gaps = []
    for eps in (1e-1, 1e-2, 1e-3):
        near0 = jsd(s.double(), t.double(), mask, temperature=2.0, beta=eps).item() / eps
        near1 = jsd(s.double(), t.double(), mask, temperature=2.0, beta=1 - eps).item() / eps
        gaps.append((abs(near0 - forward) / forward, abs(near1 - reverse) / reverse))
    assert gaps[0][0] > gaps[1][0] > gaps[2][0] and gaps[0][1] > gaps[1][1] > gaps[2][1]  # converging
    assert gaps[2][0] < 5e-3 and gaps[2][1] < 5e-3  # the gap is first order in the distance to the end
    # The endpoints follow TRL's convention: exactly forward / reverse KL, a jump from their neighbours
    # (JSD(0.01) is about 1 % of JSD(0)), which the README and conf/distill/default.yaml point out.
    at0 = jsd(s, t, mask, temperature=2.0, beta=0.0).item()
    assert at0 == pytest.approx(forward, rel=1e-5)
    assert jsd(s, t, mask, temperature=2.0, beta=1.0).item() == pytest.approx(reverse, rel=1e-5)
    assert jsd(s, t, mask, temperature=2.0, beta=0.01).item() < 0.02 * at0
    assert 0 < jsd(s, t, mask, beta=0.5).item() < math.log(2)  # JSD(½) is bounded by log 2


@pytest.mark.parametrize("name", [*sorted(DIVERGENCES), "ce"])
def test_nan_and_inf_at_masked_positions_reach_neither_the_loss_nor_its_gradient(name, logits):
    s, t, mask = logits
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    labels[~mask] = -100

    def loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if name == "ce":
            return next_token_ce(student, labels)
        return DIVERGENCES[name](student, teacher, mask, temperature=2.0)

    clean = s.clone().requires_grad_(True)
    want = loss(clean, t)
    want.backward()
    dirty_s, dirty_t = s.clone(), t.clone()
    dirty_s[~mask], dirty_t[~mask] = float("nan"), float("inf")
    dirty_s[0, -1, 0] = float("-inf")
    dirty = dirty_s.requires_grad_(True)
    got = loss(dirty, dirty_t)
    got.backward()
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.isfinite(dirty.grad).all()
    assert torch.equal(dirty.grad[~mask], torch.zeros_like(dirty.grad[~mask]))
    assert torch.allclose(dirty.grad[mask], clean.grad[mask], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_minus_inf_logits_are_zero_probability_tokens_not_nan(name, logits):
    # A vocabulary entry masked to -inf in both models (a banned or padded token id): 0·log 0 = 0, so the
    # loss is that of the vocabulary without it, and the gradient stays finite.
    s, t, mask = logits
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., -1], t_inf[..., -1] = float("-inf"), float("-inf")
    x = s_inf.requires_grad_(True)
    got = DIVERGENCES[name](x, t_inf, mask, temperature=2.0)
    got.backward()
    want = _reference(name, s[..., :-1], t[..., :-1], mask, 2.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert torch.isfinite(x.grad).all()


def test_all_tokens_masked_gives_zero_loss_not_nan(logits):
    s, t, _ = logits
    labels = torch.full((B, T), -100)
    out = DistillationObjective(loss="forward_kl", alpha=0.5)(s.requires_grad_(True), t, labels)
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_temperature_scaling_keeps_the_kd_gradient_size_independent_of_t(name):
    # Measured, not assumed: the gradient of the scaled KD term with respect to the student's logits has
    # the same size at T = 8 and T = 32 (T² for the KL family, T for total variation). With T² for TVD
    # it would grow 4×.
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(64, 50, generator=g), torch.randn(64, 50, generator=g)
    labels = torch.randint(0, 50, (64, 2), generator=g)
    sizes = []
    for temperature in (8.0, 32.0):
        x = torch.stack([s, s], 1).requires_grad_(True)  # (64, 2, 50): position 0 predicts label 1
        obj = DistillationObjective(loss=name, alpha=1.0, temperature=temperature)
        obj(x, torch.stack([t, t], 1), labels)["loss"].backward()
        sizes.append(x.grad.norm().item())
    assert sizes[1] == pytest.approx(sizes[0], rel=0.03)
    assert temperature_scale("tvd", 4.0) == 4.0 and temperature_scale("forward_kl", 4.0) == 16.0


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_bf16_inputs_compute_in_float32(name, logits):
    s, t, mask = logits
    got = DIVERGENCES[name](s.bfloat16(), t.bfloat16(), mask)
    assert got.dtype == torch.float32
    want = DIVERGENCES[name](s.bfloat16().float(), t.bfloat16().float(), mask)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_gradcheck(name):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(1, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True]])
    fn = DIVERGENCES[name]

    # the losses cast to float32 by design; gradcheck needs float64 all the way, so patch the cast
    def f64(x: torch.Tensor) -> torch.Tensor:
        import distill.objective.divergences as L

        orig = L._log_probs
        L._log_probs = lambda logits, temperature: torch.log_softmax(logits / temperature, -1)
        try:
            return fn(x, t, mask, temperature=1.5)
        finally:
            L._log_probs = orig

    # |·| in TVD is not differentiable where probabilities meet; random inputs stay away from that set
    assert torch.autograd.gradcheck(f64, (s,), eps=1e-6, atol=1e-5)


def test_unknown_loss_is_refused():
    with pytest.raises(ConfigError, match=r"distill.objective.loss='kl_forward'.*forward_kl"):
        DistillationObjective(loss="kl_forward")


@pytest.mark.parametrize(
    ("field", "value"), [("alpha", 1.5), ("alpha", -0.1), ("temperature", 0.0), ("temperature", -1.0)]
)
def test_bad_alpha_and_temperature_are_refused(field, value):
    with pytest.raises(ConfigError, match=rf"distill.objective.{field}={value!r}"):
        DistillationObjective(**{field: value})


def test_objective_combines_ce_and_scaled_kd(logits):
    s, t, _ = logits
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    labels[0, 3:] = -100
    obj = DistillationObjective(loss="forward_kl", alpha=0.3, temperature=2.0)
    out = obj(s, t, labels)
    y = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, V).double(), y.reshape(-1), ignore_index=-100)
    kd = _reference("forward_kl", s[:, :-1], t[:, :-1], y != -100, 2.0)
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.7 * ce.item() + 0.3 * 4.0 * kd, rel=1e-5)


def test_hidden_state_loss_mse_cosine_and_projection():
    g = torch.Generator().manual_seed(3)
    student = tuple(torch.randn(2, 4, 6, generator=g) for _ in range(3))  # embeddings + 2 layers
    teacher = tuple(torch.randn(2, 4, 6, generator=g) for _ in range(5))  # embeddings + 4 layers
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss = HiddenStateLoss(6, 6, 2, 4, kind="mse")
    assert loss.layer_map == {1: 2, 2: 4}
    m = mask.bool()
    want = sum(((student[s] - teacher[t]) ** 2).mean(-1)[m].mean() for s, t in loss.layer_map.items()) / 2
    assert loss(student, teacher, mask).item() == pytest.approx(want.item(), rel=1e-6)

    cos = HiddenStateLoss(6, 6, 2, 4, kind="cosine", layer_map={1: 1})
    want = (1 - torch.nn.functional.cosine_similarity(student[1], teacher[1], dim=-1))[m].mean()
    assert cos(student, teacher, mask).item() == pytest.approx(want.item(), rel=1e-6)

    proj = HiddenStateLoss(6, 10, 2, 4)
    wide = tuple(torch.randn(2, 4, 10, generator=g) for _ in range(5))
    out = proj(student, wide, mask)
    out.backward()
    assert proj.proj.weight.grad is not None and proj.proj.weight.grad.abs().sum() > 0

    with pytest.raises(ConfigError, match="layer_map"):
        HiddenStateLoss(6, 6, 2, 4, layer_map={3: 1})
