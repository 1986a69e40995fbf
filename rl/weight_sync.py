"""Weights of each new version from the learner to the rollout workers (`rollout.weight_sync`).

- `object_store` (default): learner rank 0 puts its trainable state in Ray's object store once; every worker
  fetches it (`RolloutPool.broadcast`).
- `collective`: learner rank 0 and the workers that are up form a broadcast group (core/collective.py: gloo on
  CPUs, NCCL when the learner and the workers are on GPUs) and the state goes over it, as OpenRLHF and verl do.
  The group is rebuilt whenever the workers change. The object store stays the fallback: a worker that joins later,
  one that is still starting, or one whose receive failed gets the version from there, made only when someone
  needs it. A worker that dies mid-broadcast fails only its own transfer: the others get theirs, the run goes on.
"""
from __future__ import annotations

import time

import ray

from rollout.pool import DEAD, RolloutPool


def sync_backend(learner_on_gpu: bool, gpus_per_worker: float) -> str:
    """NCCL when both ends hold their weights on GPUs; gloo otherwise (the learner sends CPU copies then)."""
    return "nccl" if learner_on_gpu and gpus_per_worker > 0 else "gloo"


class WeightSync:
    def __init__(self, learner, pool: RolloutPool, mode: str = "object_store", timeout_s: float = 60.0,
                 backend: str = "gloo", lazy: bool = True):
        """lazy: the object-store copy is made only when a worker needs it. Only right while the learner stays at
        the pushed version until the next push (the on-policy loop); with the learner stepping during rollouts
        (loop.off_policy_steps) a late copy would hold newer weights, so the copy is made at every push."""
        self.learner, self.pool, self.mode, self.timeout_s, self.backend = learner, pool, mode, timeout_s, backend
        self.lazy = lazy
        self.members: dict[int, int] | None = None  # worker id -> rank in the current group (None: no group)
        self.layout: list | None = None
        self.stats = {"collective_workers": 0, "fallback_workers": 0, "group_builds": 0, "bytes": 0, "seconds": 0.0}

    def push(self) -> None:
        """Hand the learner's current version to every worker; returns once the running workers hold it."""
        t = time.perf_counter()
        version = self.learner.version
        have = self._collective(version) if self.mode == "collective" else set()
        publish = lambda: self.learner.publish()[1]  # noqa: E731  (object store: made at most once per version)
        self.stats["collective_workers"] += len(have)
        self.stats["fallback_workers"] += len(set(self.pool.workers) - have)
        self.pool.broadcast(version, publish if self.lazy else publish(), have=have)
        self.stats["seconds"] += time.perf_counter() - t

    # ------------------------------------------------------------------ the collective path
    def _collective(self, version: int) -> set[int]:
        """Send `version` over the group; the ids of the workers that received it."""
        ready = self.pool.ready_workers()
        if not ready:
            return set()
        if self.members is None or set(self.members) != set(ready):
            self._open(ready)
        if self.members is None:
            return set()
        root = self.learner.actors[0]
        sent = root.send_weights.remote(list(self.members.values()))
        gathers = self._other_ranks_gather()          # ZeRO-3: every rank takes part in the gather
        got = {w: ready[w].receive_weights.remote(version, self.layout) for w in self.members}
        failed_ranks, nbytes = self._get(sent, (list(self.members.values()), 0))
        self._get_all(gathers)
        have = {w for w, ref in got.items()
                if self.members[w] not in failed_ranks and self._get(ref) is not None}
        self.stats["bytes"] += nbytes * len(have)
        if have != set(self.members):
            self.members = None  # someone failed: a new group with the survivors next time
        return have

    def _open(self, ready: dict) -> None:
        """A new group: learner rank 0 is its root (rank 0), the ready workers ranks 1..n."""
        self.members = None
        root = self.learner.actors[0]
        if self.layout is None:
            self.layout = self._get(root.sync_layout.remote())
            self._get_all(self._other_ranks_gather())
            if self.layout is None:
                return
        addr, port = ray.get(root.address.remote())
        world, members = len(ready) + 1, {w: i + 1 for i, w in enumerate(ready)}
        refs = [root.open_sync.remote(addr, port, world, self.timeout_s, self.backend)]
        refs += [ready[w].open_sync.remote(addr, port, world, r, self.timeout_s, self.backend)
                 for w, r in members.items()]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s + 10)
        if len(done) == len(refs) and all(self._get(r) is not None for r in refs):
            self.members = members
            self.stats["group_builds"] += 1

    def _other_ranks_gather(self) -> list:
        """ZeRO-3: ranks 1..N-1 join rank 0's parameter gather (their refs); none otherwise."""
        if self.learner.info["zero_stage"] != 3:
            return []
        return [a.trainable_state.remote() for a in self.learner.actors[1:]]

    def _get_all(self, refs: list) -> None:
        for ref in refs:
            self._get(ref)

    def _get(self, ref, default=None):
        """ray.get that turns a dead worker or a failed transfer into `default` (the caller falls back)."""
        try:
            return ray.get(ref, timeout=self.timeout_s + 10)
        except (*DEAD, ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError):
            return default
