"""VMR, the middle-step value (DESIGN.md, "Prefix-GRPO"): each prefix (scales 1..m of a rollout sample) gets K
completions of scales m+1..S; the reward the advantages see is V_m = eta log mean_k exp(R_k / eta) over them.

Completion 1 is the rollout's own image; completions 2..K come from the rollout workers (UnitResult.completions).
K = 1 is plain prefix-GRPO: the reward batch and the advantages are the same as without this module.
Batch order: sample-major, the K completions of a sample next to each other (row i * K + k - 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rl.config import VMRConfig
from rl.grpo import prefix_values
from rollout.units import UnitResult, WorkUnit


def interleave(own: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
    """own (G, ...) and extra (G, K - 1, ...) -> (G * K, ...) with each sample's completions together."""
    if extra is None:
        return own
    return np.concatenate([own[:, None], extra], axis=1).reshape(-1, *own.shape[1:])


def completion_batch(units: list[WorkUnit], results: dict[str, UnitResult], images: np.ndarray, prompts: list,
                     meta: list, k: int) -> tuple[np.ndarray, list, list]:
    """The reward batch of all B * K completions; for k = 1 exactly (images, prompts, meta)."""
    if k == 1:
        return images, prompts, meta
    batch = np.concatenate([interleave(results[u.uid].images, results[u.uid].completions) for u in units])
    if len(batch) != len(images) * k:
        raise RuntimeError(f"VMR: {len(batch)} completions for {len(images)} samples x K = {k}")
    return batch, [p for p in prompts for _ in range(k)], [m for m in meta for _ in range(k)]


@dataclass
class PrefixScores:
    rewards: torch.Tensor                # (P, G) reward of each rollout image (completion 1)
    completions: torch.Tensor            # (P, G, K) rewards of the K completions of each prefix
    values: torch.Tensor                 # (P, G) the prefix values the advantages are computed from
    components: dict[str, np.ndarray]    # (P * G,) reward components of the rollout images


def prefix_scores(total: np.ndarray, components: dict, p: int, g: int, cfg: VMRConfig) -> PrefixScores:
    """Rewards of the completion batch (P * G * K,) -> per-prefix rewards, completions and values."""
    comp = torch.as_tensor(np.asarray(total), dtype=torch.float64).view(p, g, cfg.k)
    own = {name: np.asarray(v, dtype=np.float64)[:: cfg.k] for name, v in components.items()}
    return PrefixScores(comp[..., 0].contiguous(), comp, prefix_values(comp, cfg.eta), own)


def vmr_metrics(scores: PrefixScores) -> dict[str, float]:
    """What VMR adds to metrics.jsonl (nothing for K = 1)."""
    c = scores.completions
    if c.shape[-1] == 1:
        return {}
    return {"vmr/value_mean": scores.values.mean().item(), "vmr/value_std": scores.values.std().item(),
            "vmr/completion_reward_mean": c.mean().item(), "vmr/completion_reward_max": c.amax(-1).mean().item(),
            "vmr/completion_reward_spread": (c.amax(-1) - c.amin(-1)).mean().item()}
