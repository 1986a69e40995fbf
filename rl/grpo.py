"""Prefix-GRPO math: pure functions on tensors (DESIGN.md, "Prefix-GRPO").

Shapes: P prompts x G samples = B rows; N = tokens of scales 1..m; k (N,) = k_s of each token's scale.

    A_i = (R_i - mean_G R) / (std_G R + eps)                 (std normalisation switchable; std is Bessel-corrected)
    rho = exp(log pi_theta - log pi_old)                     per token, conditional policy without CFG
    L   = - sum_i sum_tok k min(rho A_i, clip(rho, 1 - eps_lo, 1 + eps_hi) A_i) / sum_i sum_tok k  +  beta KL
          with A_i := w_neg A_i where A_i < 0                (loss.neg_weight; 1: off)
    KL  = sum_i sum_tok k kl_tok / sum_i sum_tok k,  kl_tok = exp(d) - d - 1 (k3) or -d (k1), d = log pi_ref - log pi_theta
    V_m = eta log mean_k exp(R_k / eta)                      VMR: value of a prefix over K completions (R_i := V_m)
    S_p = argmax_{S in G, |S| = keep} Var(R_S)               down-sampling (PODS): the rows a group trains on
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from rl.config import GRPOLossConfig


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages, centred per group (and divided by the group's std)."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return adv


def max_variance_subset(rewards: torch.Tensor, keep: int) -> torch.Tensor:
    """(P, G) rewards -> (P, keep) column indices, ascending: per group, the `keep` samples whose rewards have the
    largest variance (PODS, max-variance down-sampling). The best subset is the i highest and keep - i lowest
    rewards for some i, so keep + 1 candidates per group; ties go to the smallest i (then to the lowest index)."""
    g = rewards.shape[1]
    if not 1 <= keep <= g:
        raise ValueError(f"down_sample: {keep} must lie in 1..{g} (the group size)")
    values, order = torch.sort(rewards, dim=1, stable=True)
    cands = torch.stack([torch.cat([torch.arange(keep - i), torch.arange(g - i, g)]) for i in range(keep + 1)])
    var = torch.stack([values[:, c].var(dim=1, unbiased=False) for c in cands], dim=1)     # (P, keep + 1)
    return order.gather(1, cands[var.argmax(dim=1)]).sort(dim=1).values


def zero_std_fraction(rewards: torch.Tensor) -> float:
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    return (rewards.std(dim=1) == 0).float().mean().item() if rewards.shape[1] > 1 else 1.0


def weight_negative(adv: torch.Tensor, w: float) -> torch.Tensor:
    """The advantages with the negative ones scaled by w (w = 1: unchanged)."""
    return torch.where(adv < 0, w * adv, adv)


def token_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    return torch.exp(logp_new - logp_old)


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps_lo: float, eps_hi: float) -> torch.Tensor:
    """min(rho A, clip(rho, 1 - eps_lo, 1 + eps_hi) A) per token; adv broadcasts (B, 1) over (B, N)."""
    return torch.minimum(ratio * adv, ratio.clamp(1 - eps_lo, 1 + eps_hi) * adv)


def kl_estimate(logp_new: torch.Tensor, logp_ref: torch.Tensor, kind: Literal["k1", "k3"] = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta: k3 = exp(d) - d - 1, k1 = -d."""
    d = logp_ref - logp_new
    return torch.exp(d) - d - 1 if kind == "k3" else -d


def weighted_token_mean(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """sum_i sum_tok k x / sum_i sum_tok k for x (B, N), k (N,)."""
    return (x * k).sum() / (k.sum() * x.shape[0])


def prefix_grpo_loss(
    logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, k: torch.Tensor,
    cfg: GRPOLossConfig, logp_ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The prefix-GRPO loss over (B, N) per-token log-probs of scales 1..m; adv (B,), k (N,)."""
    ratio = token_ratio(logp_new, logp_old)
    a = weight_negative(adv, cfg.neg_weight)[:, None]
    loss = -weighted_token_mean(clipped_surrogate(ratio, a, cfg.eps_lo, cfg.eps_hi), k)
    metrics = {}
    if cfg.beta:
        if logp_ref is None:
            raise ValueError("beta: a KL penalty needs reference log-probs")
        kl = weighted_token_mean(kl_estimate(logp_new, logp_ref, cfg.kl), k)
        loss = loss + cfg.beta * kl
        metrics["kl_ref"] = kl.item()
    with torch.no_grad():
        r = ratio.detach()
        metrics.update({
            "clip_frac_low": ((r < 1 - cfg.eps_lo) & (a < 0)).float().mean().item(),
            "clip_frac_high": ((r > 1 + cfg.eps_hi) & (a > 0)).float().mean().item(),
            "approx_kl": kl_estimate(logp_new.detach(), logp_old, "k3").mean().item(),
            "ratio_mean": r.mean().item(),
            "ratio_max": r.max().item(),
        })
    return loss, metrics


def per_scale_mean(x: torch.Tensor, scale_of_token: torch.Tensor, num_scales: int) -> torch.Tensor:
    """(B, N) per-token values -> (num_scales,) mean per scale (per-scale log-prob and entropy metrics)."""
    sums = torch.zeros(num_scales, dtype=x.dtype, device=x.device).index_add_(0, scale_of_token, x.sum(0))
    counts = torch.bincount(scale_of_token, minlength=num_scales).clamp_min(1) * x.shape[0]
    return sums / counts


def soft_value(rewards: torch.Tensor, eta: float) -> torch.Tensor:
    """V_m = eta log mean_k exp(R_k / eta) over K completions from one prefix (rewards (..., K))."""
    return eta * (torch.logsumexp(rewards / eta, dim=-1) - math.log(rewards.shape[-1]))


def prefix_values(rewards: torch.Tensor, eta: float) -> torch.Tensor:
    """(P, G, K) rewards of K completions per prefix -> (P, G) values: the reward itself for K = 1 (bit for bit),
    else soft_value over the K completions (VMR)."""
    return rewards[..., 0] if rewards.shape[-1] == 1 else soft_value(rewards, eta)
