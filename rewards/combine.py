"""Several rewards as one: a weighted sum with every component reported, per-reward timing and batch sizes.

`CombinedReward(entries)(batch) -> Scored` loads each configured reward once and calls each per batch;
`score_many(reward, batches)` merges several requests into one call per image size and splits the result.
Plain Python: the Serve deployment (rewards/service.py) only holds a CombinedReward and calls it.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from rewards.base import Batch, RewardOutput, load_reward, run_reward
from rewards.config import RewardEntry
from rewards.wire import floats_to_json


@dataclass
class Scored:
    total: np.ndarray                                              # (B,) weighted sum
    components: dict[str, np.ndarray] = field(default_factory=dict)  # label and label/sub -> (B,)

    def __len__(self) -> int:
        return len(self.total)

    def take(self, start: int, stop: int) -> "Scored":
        return Scored(self.total[start:stop], {k: v[start:stop] for k, v in self.components.items()})

    @staticmethod
    def concat(parts: list["Scored"]) -> "Scored":
        """The parts one after another (every part has the same components)."""
        keys = list(parts[0].components)
        if any(list(p.components) != keys for p in parts):
            raise ValueError("Scored.concat: the parts have different components")
        return Scored(np.concatenate([p.total for p in parts]),
                      {k: np.concatenate([p.components[k] for p in parts]) for k in keys})

    def to_json(self) -> dict:
        return {"score": floats_to_json(self.total), **{k: floats_to_json(v) for k, v in self.components.items()}}

    @staticmethod
    def from_json(data: dict) -> "Scored":
        cols = {k: np.array(v, dtype=np.float64) for k, v in data.items()}  # null -> NaN
        return Scored(cols.pop("score"), cols)


def weighted_sum(outputs: dict[str, RewardOutput], weights: dict[str, float]) -> Scored:
    """Total = sum_k w_k * score_k; components: each reward's score under its label, sub-scores as label/sub."""
    total = sum(weights[k] * out.score for k, out in outputs.items())
    components = {}
    for label, out in outputs.items():
        components[label] = out.score
        components.update({f"{label}/{sub}": v for sub, v in out.subs.items()})
    return Scored(np.asarray(total, dtype=np.float64), components)


@dataclass
class Metrics:
    """Per-reward call timings and batch sizes (images), and requests merged per service batch."""
    seconds: dict[str, list[float]] = field(default_factory=dict)
    images: dict[str, list[int]] = field(default_factory=dict)
    requests_per_batch: Counter = field(default_factory=Counter)

    def record_call(self, label: str, seconds: float, n: int) -> None:
        self.seconds.setdefault(label, []).append(seconds)
        self.images.setdefault(label, []).append(n)

    def summary(self) -> dict:
        rewards = {k: {"calls": len(s), "mean_ms": 1e3 * float(np.mean(s)), "max_ms": 1e3 * max(s),
                       "mean_batch": float(np.mean(self.images[k])), "max_batch": max(self.images[k])}
                   for k, s in self.seconds.items()}
        per_batch = {str(k): v for k, v in sorted(self.requests_per_batch.items())}
        return {"rewards": rewards, "requests_per_batch": per_batch}


class CombinedReward:
    """The configured rewards, loaded once; called per batch, it returns their weighted sum and components."""

    def __init__(self, entries: list[RewardEntry]):
        self.entries = entries
        self.fns = {e.label: load_reward(e.name, e.kwargs) for e in entries}
        self.metrics = Metrics()

    def __call__(self, batch: Batch) -> Scored:
        outputs = {}
        for e in self.entries:
            t0 = time.perf_counter()
            outputs[e.label] = run_reward(e.label, self.fns[e.label], batch, e.timeout_s)
            self.metrics.record_call(e.label, time.perf_counter() - t0, len(batch))
        return weighted_sum(outputs, {e.label: e.weight for e in self.entries})


def merge(batches: list[Batch]) -> Batch:
    return Batch(np.concatenate([b.images for b in batches]), [p for b in batches for p in b.prompts],
                 [m for b in batches for m in b.metadata])


def score_many(reward: CombinedReward, batches: list[Batch]) -> list[Scored]:
    """Score several requests with one call per distinct image size; one Scored per request, in order."""
    reward.metrics.requests_per_batch[len(batches)] += 1
    results: list[Scored | None] = [None] * len(batches)
    for shape in dict.fromkeys(b.images.shape[1:] for b in batches):
        idx = [i for i, b in enumerate(batches) if b.images.shape[1:] == shape]
        scored, start = reward(merge([batches[i] for i in idx])), 0
        for i in idx:
            n = len(batches[i])
            results[i] = scored.take(start, start + n)
            start += n
    return results
