"""Work units: one prompt's group of G samples, with a seed that belongs to the unit (not to a worker).

Because the seeds are derived from (run seed, step, prompt index), a run's samples do not depend on how many
rollout workers it had or which of them died.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


def unit_seed(run_seed: int, step: int, prompt_index: int) -> int:
    """A 63-bit seed from (run seed, step, prompt index), stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{run_seed}/{step}/{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seeds(seed: int, group_size: int) -> list[int]:
    """Per-sample seeds of one unit."""
    return [(seed + 7919 * j) % 2**63 for j in range(group_size)]


def completion_seeds(seed: int, group_size: int, k: int) -> list[int]:
    """Per-sample seeds of completion k (1..K) of a unit's prefixes: k = 1 is the rollout itself (sample_seeds);
    k >= 2 hash (unit seed, sample index, k), so every completion has its own stream."""
    if k == 1:
        return sample_seeds(seed, group_size)
    return [unit_seed(seed, j, k) for j in range(group_size)]


@dataclass(frozen=True)
class WorkUnit:
    uid: str                  # "<step>/<prompt index>"
    step: int
    index: int
    prompt: str
    text_ids: tuple[int, ...]
    seed: int
    group_size: int
    metadata: dict = field(default_factory=dict, compare=False, hash=False)  # e.g. {"spec": "<json>"}


@dataclass
class UnitResult:
    uid: str
    codes: list[np.ndarray]   # per scale (G, h_s, w_s) int64
    images: np.ndarray        # (G, P, P, 3) uint8
    logprobs: np.ndarray      # (G, N_m) float32 old log-probs of scales 1..m
    version: int              # weight version the unit was sampled with
    worker: str               # which worker sampled it (for logs only)
    completions: np.ndarray | None = None  # (G, K - 1, P, P, 3) uint8: completions 2..K of each prefix (VMR)
