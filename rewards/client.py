"""The driver's side of the reward service: a Serve handle call with a timeout, bounded retries and backoff.

A call that still fails after the last retry raises RewardServiceError with one line naming the reward and the
cause (`reward 'x': returned 3 scores for 4 images (after 3 attempts)`); a failure never becomes a score.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from rewards.base import Batch
from rewards.combine import Scored
from rewards.config import RewardsConfig

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle


class RewardServiceError(RuntimeError):
    """Scoring failed after every retry."""


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): base * 2**(attempt - 1), capped."""
    return min(base_s * 2 ** (attempt - 1), max_s)


class RewardClient:
    """`RewardClient(start_service(cfg), cfg)`: calls the deployment through its Serve handle."""

    def __init__(self, handle: DeploymentHandle, cfg: RewardsConfig):
        self.handle, self.cfg = handle, cfg.service
        self.name = f"reward service {cfg.service.name!r} ({', '.join(e.label for e in cfg.rewards)})"

    def _receive(self, response, batch: Batch) -> Scored:
        """The answer of one call; raises RewardServiceError with the cause."""
        try:
            out = response.result(timeout_s=self.cfg.timeout_s)
        except TimeoutError:
            response.cancel()
            raise RewardServiceError(f"{self.name}: no answer within {self.cfg.timeout_s:g} s") from None
        except Exception as e:
            lines = str(e).strip().splitlines() or [""]
            raise RewardServiceError(f"{self.name}: {type(e).__name__}: {lines[-1]}") from None
        if "error" in out:
            raise RewardServiceError(out["error"])
        scored = Scored.from_json(out)
        if len(scored) != len(batch):
            raise RewardServiceError(f"{self.name}: answered {len(scored)} rewards for {len(batch)} images")
        return scored

    def submit(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None) -> "PendingScore":
        """Send a request now, wait later: many in flight let the service batch them across its replicas."""
        return PendingScore(self, Batch(images, list(prompts), list(metadata or [])))

    def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None) -> Scored:
        """Rewards for (B, H, W, 3) uint8 images: Scored.total (B,) and every component (B,)."""
        return self.submit(images, prompts, metadata).result()

    def metrics(self) -> dict:
        """Per-reward timings and batch sizes of one replica, and requests merged per batch."""
        return self.handle.metrics.remote().result(timeout_s=self.cfg.timeout_s)


class PendingScore:
    """One reward request in flight. `result()` waits for it; a failed attempt is sent again (bounded retries with
    backoff), and a request that still fails raises RewardServiceError: never a score."""

    def __init__(self, client: RewardClient, batch: Batch):
        self.client, self.batch = client, batch
        self.response = client.handle.score.remote(batch)

    def result(self) -> Scored:
        cfg = self.client.cfg
        attempts = cfg.retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(backoff_delay(attempt, cfg.backoff_s, cfg.backoff_max_s))
                self.response = self.client.handle.score.remote(self.batch)
            try:
                return self.client._receive(self.response, self.batch)
            except RewardServiceError as e:
                cause = str(e)
        raise RewardServiceError(f"{cause} (after {attempts} attempt{'s' if attempts > 1 else ''})")
