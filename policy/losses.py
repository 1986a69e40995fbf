"""Pretraining objectives as pure functions on tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def next_scale_loss(
    logits: torch.Tensor, targets: torch.Tensor, scale_of_token: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale-weighted next-scale cross-entropy.

    logits (B, N, V), targets (B, N), scale_of_token (N,) 0-based scale index, weights (S,) k_s normalised so that
    sum_s n_s k_s = sum_s n_s. Returns (loss = mean over tokens of k_s * CE, per-scale mean CE (S,)).
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    k = weights.to(ce.device)[scale_of_token.to(ce.device)]                 # (N,)
    loss = (ce * k).mean()
    num_scales = weights.numel()
    per_scale = torch.zeros(num_scales, device=ce.device).index_add_(0, scale_of_token.to(ce.device), ce.mean(0))
    counts = torch.bincount(scale_of_token.to(ce.device), minlength=num_scales).clamp_min(1)
    return loss, per_scale / counts
