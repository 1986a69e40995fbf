"""GRPO math against hand-worked cases, autograd against an analytic gradient, and TRL's formulas."""
import itertools
import math

import pytest
import torch
from trl.trainer.utils import nanstd

from policy.scales import scale_index_per_token, scale_weights, tiny_schedule
from rl.grpo import (
    GRPOLossConfig, clipped_surrogate, group_advantages, kl_estimate, max_variance_subset, per_scale_mean,
    prefix_grpo_loss, soft_value, token_ratio, weight_negative, zero_std_fraction,
)


def test_group_advantages_hand_worked():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(r, eps=0.0 + 1e-12)
    s = math.sqrt(1 / 3)  # Bessel-corrected std of [1, 0, 0, 1]
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s)
    assert torch.equal(adv[1], torch.zeros(4))
    assert torch.allclose(group_advantages(r, normalize_std=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert zero_std_fraction(r) == 0.5


def test_group_advantages_match_trl():
    torch.manual_seed(0)
    r = torch.randn(4, 8)
    ref = (r - r.mean(1, keepdim=True)) / (nanstd(r, dim=1, keepdim=True) + 1e-4)  # TRL's scale_rewards="group"
    assert torch.allclose(group_advantages(r, eps=1e-4), ref, atol=1e-6)


def test_surrogate_and_kl_hand_worked():
    ratio = torch.tensor([0.5, 1.0, 1.5])
    assert torch.allclose(clipped_surrogate(ratio, torch.tensor(1.0), 0.2, 0.2), torch.tensor([0.5, 1.0, 1.2]))
    assert torch.allclose(clipped_surrogate(ratio, torch.tensor(-1.0), 0.2, 0.2), torch.tensor([-0.8, -1.0, -1.5]))
    new, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    d = math.log(0.5)
    assert kl_estimate(new, ref, "k3").item() == pytest.approx(math.exp(d) - d - 1)
    assert kl_estimate(new, ref, "k1").item() == pytest.approx(-d)
    assert token_ratio(new, ref).item() == pytest.approx(2.0)


def test_loss_matches_trl_bnpo_formula_token_level():
    """alpha = 0 (k = 1): our loss is TRL's token-level GRPO loss (loss_type='bnpo') on the same tensors."""
    torch.manual_seed(1)
    b, n = 6, 30
    new = (torch.randn(b, n) * 0.1 - 2).requires_grad_()
    old, ref = new.detach() + torch.randn(b, n) * 0.2, new.detach() + torch.randn(b, n) * 0.2
    adv = torch.randn(b)
    cfg = GRPOLossConfig(eps_lo=0.2, eps_hi=0.28, beta=0.04, kl="k3")
    loss, _ = prefix_grpo_loss(new, old, adv, torch.ones(n), cfg, ref)
    # TRL (grpo_trainer._compute_loss): coef_1 = exp(logp - old); coef_2 = clamp(coef_1, 1-eps_low, 1+eps_high)
    coef_1 = torch.exp(new - old)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    per_token_loss = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    per_token_kl = torch.exp(ref - new) - (ref - new) - 1
    per_token_loss = per_token_loss + 0.04 * per_token_kl
    mask = torch.ones(b, n)
    trl_loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    assert torch.allclose(loss, trl_loss, atol=1e-6)
    g1, = torch.autograd.grad(loss, new, retain_graph=True)
    g2, = torch.autograd.grad(trl_loss, new)
    assert torch.allclose(g1, g2, atol=1e-7)


def test_scale_weighted_loss_and_gradient_hand_worked():
    # 1 sample, 2 tokens with k = [2, 0.5], A = 1, old = new (ratio 1, unclipped): L = -(2 + 0.5) / 2.5 = -1;
    # dL/dlogp_tok = -k_tok * rho * A / sum k = [-0.8, -0.2]
    new = torch.zeros(1, 2, requires_grad=True)
    loss, m = prefix_grpo_loss(new, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([2.0, 0.5]), GRPOLossConfig())
    assert loss.item() == pytest.approx(-1.0) and m["ratio_mean"] == 1.0 and m["clip_frac_high"] == 0.0
    loss.backward()
    assert torch.allclose(new.grad, torch.tensor([[-0.8, -0.2]]))
    # clipped token: rho = 2 > 1 + eps_hi with A > 0 -> no gradient through it
    new2 = torch.tensor([[math.log(2.0), 0.0]], requires_grad=True)
    loss2, m2 = prefix_grpo_loss(new2, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([2.0, 0.5]), GRPOLossConfig())
    loss2.backward()
    assert new2.grad[0, 0] == 0 and m2["clip_frac_high"] == 0.5


def test_loss_with_scale_weights_second_implementation():
    torch.manual_seed(2)
    sched = tiny_schedule()[:4]
    k = scale_weights(sched, 0.7)[scale_index_per_token(sched)]
    b, n = 4, k.numel()
    new, old, adv = torch.randn(b, n) * 0.1, torch.randn(b, n) * 0.1, torch.randn(b)
    loss, _ = prefix_grpo_loss(new, old, adv, k, GRPOLossConfig(eps_lo=0.1, eps_hi=0.3))
    num = den = 0.0
    for i in range(b):
        for t in range(n):
            rho = math.exp(new[i, t] - old[i, t])
            num += k[t].item() * min(rho * adv[i].item(), min(max(rho, 0.9), 1.3) * adv[i].item())
            den += k[t].item()
    assert loss.item() == pytest.approx(-num / den, rel=1e-5)
    with pytest.raises(ValueError, match="beta"):
        prefix_grpo_loss(new, old, adv, k, GRPOLossConfig(beta=0.1))


def test_per_scale_mean_and_soft_value():
    x = torch.tensor([[1.0, 2.0, 4.0], [3.0, 2.0, 0.0]])
    assert per_scale_mean(x, torch.tensor([0, 1, 1]), 2).tolist() == [2.0, 2.0]
    r = torch.tensor([0.0, 1.0])
    assert soft_value(r, 1.0).item() == pytest.approx(math.log((1 + math.e) / 2))
    assert soft_value(r, 1e-3).item() == pytest.approx(1.0 - 1e-3 * math.log(2), abs=1e-6)  # -> max as eta -> 0
    assert soft_value(r, 1e3).item() == pytest.approx(0.5, abs=1e-3)                       # -> mean as eta -> inf


def test_max_variance_subset_hand_worked_and_brute_force():
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.5, 0.0], [0.3, 0.3, 0.3, 0.3, 0.3, 0.3]])
    assert max_variance_subset(r, 2).tolist() == [[0, 2], [0, 1]]       # one lowest + the highest; ties: lowest index
    assert max_variance_subset(r, 4).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]  # {0, 0, 0, 1}: var 3/16 > {0, 0, .5, 1}
    g = torch.Generator().manual_seed(0)
    for keep in (2, 3, 5, 8):        # against every subset of size keep (rewards with ties: strict + partial credit)
        r = torch.randint(0, 2, (6, 8), generator=g) + 0.25 * torch.randint(0, 3, (6, 8), generator=g) / 2
        idx = max_variance_subset(r, keep)
        for row, pick in zip(r, idx):
            best = max(row[list(c)].var(unbiased=False).item() for c in itertools.combinations(range(8), keep))
            assert pick.tolist() == sorted(set(pick.tolist())) and len(pick) == keep
            assert row[pick].var(unbiased=False).item() == pytest.approx(best, abs=1e-9)
    with pytest.raises(ValueError, match="down_sample: 9"):
        max_variance_subset(r, 9)


def test_negative_advantages_weighted_in_the_loss():
    adv = torch.tensor([1.5, -0.5, 0.0, -2.0])
    assert weight_negative(adv, 0.5).tolist() == [1.5, -0.25, 0.0, -1.0]
    assert torch.equal(weight_negative(adv, 1.0), adv)
    lp = torch.zeros(4, 3)
    k = torch.ones(3)
    plain, _ = prefix_grpo_loss(lp, lp, adv, k, GRPOLossConfig())
    half, _ = prefix_grpo_loss(lp, lp, adv, k, GRPOLossConfig(neg_weight=0.5))
    assert plain.item() == pytest.approx(1.0 / 4) and half.item() == pytest.approx(-0.25 / 4)  # -mean(A) at rho = 1
