"""The elastic rollout pool: keeps the wanted number of workers, hands units to live ones, re-runs lost units.

Driver-side object (not an actor). Invariants:
- every unit of a step yields exactly one result: a unit is re-run only when its worker died before returning it;
- a worker samples only after it holds the current weights (actor calls run in order: set_weights is queued
  before any unit, and `sample_unit` re-checks the version);
- the size can change while a run goes on (`desired` is polled between units); new workers get the current
  weights before their first unit;
- units go only to workers that are up: a worker still waiting for resources (or a node) gets none, so a pool
  larger than the cluster can hold never stalls a step.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from rollout.units import UnitResult, WorkUnit

DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


class RolloutPool:
    def __init__(self, factory: Callable[[], "ray.actor.ActorHandle"], size: int, min_size: int = 1,
                 max_size: int = 64, desired: Callable[[], int | None] | None = None):
        self.factory, self.min_size, self.max_size = factory, min_size, max_size
        self.desired = desired or (lambda: None)
        self.workers: dict[int, ray.actor.ActorHandle] = {}
        self.starting: dict[int, ray.ObjectRef] = {}  # worker id -> ref that resolves once the actor is up
        self._ids = itertools.count()
        self.version, self.weights_ref, self._source = 0, None, None
        self.stats = {"units": 0, "reruns": 0, "workers_lost": 0, "workers_added": 0, "workers_removed": 0}
        self.target = self._clamp(size)
        self._apply_size()

    # ------------------------------------------------------------------ membership
    def _clamp(self, n: int) -> int:
        return max(self.min_size, min(self.max_size, int(n)))

    def _add(self) -> int:
        wid = next(self._ids)
        handle = self.factory()
        if self._source is not None:
            handle.set_weights.remote(self.version, self._ref())  # queued before any unit
        self.workers[wid] = handle
        self.starting[wid] = handle.get_version.remote()
        self.stats["workers_added"] += 1
        return wid

    def _remove(self, wid: int) -> None:
        self.starting.pop(wid, None)
        ray.kill(self.workers.pop(wid), no_restart=True)
        self.stats["workers_removed"] += 1

    def _poll_starting(self, timeout: float = 0) -> None:
        """Move workers whose actor is up out of `starting` (and drop those that died while starting)."""
        if not self.starting:
            return
        refs = {ref: wid for wid, ref in self.starting.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            wid = refs[ref]
            del self.starting[wid]
            try:
                ray.get(ref)
            except DEAD:
                self._lost(wid)

    @property
    def ready(self) -> list[int]:
        return [w for w in self.workers if w not in self.starting]

    def _apply_size(self, busy: set[int] = frozenset()) -> None:
        wanted = self.desired()
        if wanted is not None:
            self.target = self._clamp(wanted)
        while len(self.workers) < self.target:
            self._add()
        idle = [w for w in self.workers if w not in busy]
        idle.sort(key=lambda w: w not in self.starting)  # drop workers that are not up yet first
        while len(self.workers) > self.target and idle:
            self._remove(idle.pop(0))

    def resize(self, n: int) -> None:
        self.target = self._clamp(n)
        self._apply_size()

    @property
    def size(self) -> int:
        return len(self.workers)

    # ------------------------------------------------------------------ weights
    def broadcast(self, version: int, state: dict | ray.ObjectRef | Callable[[], ray.ObjectRef],
                  have: set[int] = frozenset()) -> None:
        """Send weights `version` to every worker (one object-store copy); wait until the running ones hold it.

        `state`: the weights, their object ref, or a callable that makes the ref — called only when a worker needs
        it: one not in `have` (the workers that already hold `version`, e.g. from a collective broadcast), or one
        that joins later. A worker that is still starting gets the call queued ahead of any unit.
        """
        self.version, self._source, self.weights_ref = version, state, None
        self._poll_starting()
        calls = {w: h.set_weights.remote(version, self._ref()) for w, h in self.workers.items() if w not in have}
        refs = {w: ref for w, ref in calls.items() if w not in self.starting}
        for wid, ref in refs.items():
            try:
                ray.get(ref)
            except DEAD:
                self._lost(wid)
        self._apply_size()

    def _ref(self) -> ray.ObjectRef:
        if self.weights_ref is None:
            src = self._source
            self.weights_ref = src if isinstance(src, ray.ObjectRef) else src() if callable(src) else ray.put(src)
        return self.weights_ref

    def ready_workers(self) -> dict[int, "ray.actor.ActorHandle"]:
        """The workers that are up (polled now)."""
        self._poll_starting()
        return {w: self.workers[w] for w in self.ready}

    def _lost(self, wid: int) -> None:
        self.workers.pop(wid, None)
        self.starting.pop(wid, None)
        self.stats["workers_lost"] += 1

    # ------------------------------------------------------------------ sampling
    def run(self, units: list[WorkUnit],
            on_result: Callable[[WorkUnit, UnitResult], None] | None = None) -> dict[str, UnitResult]:
        """Sample every unit once on any live worker; units of a dead worker are re-run elsewhere.

        `on_result(unit, result)` is called once per unit as its result arrives (in arrival order)."""
        pending = deque(units)
        inflight: dict[ray.ObjectRef, tuple[int, WorkUnit]] = {}
        results: dict[str, UnitResult] = {}
        while pending or inflight:
            busy = {wid for wid, _ in inflight.values()}
            self._apply_size(busy)
            self._poll_starting()
            for wid in [w for w in self.ready if w not in busy]:
                if not pending:
                    break
                unit = pending.popleft()
                inflight[self.workers[wid].sample_unit.remote(unit, self.version)] = (wid, unit)
            if not self.workers:
                raise RuntimeError("rollout pool: no workers")
            waiting = list(inflight) + list(self.starting.values())
            ready, _ = ray.wait(waiting, num_returns=1)
            if ready[0] not in inflight:
                continue  # a worker came up: hand it a unit on the next turn
            wid, unit = inflight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except DEAD:
                self._lost(wid)
                pending.appendleft(unit)
                self.stats["reruns"] += 1
                continue
            if unit.uid in results:
                raise RuntimeError(f"rollout pool: unit {unit.uid} returned twice")
            if result.version != self.version:
                raise RuntimeError(f"rollout pool: unit {unit.uid} sampled with v{result.version}, "
                                   f"expected v{self.version}")
            results[unit.uid] = result
            self.stats["units"] += 1
            if on_result is not None:
                on_result(unit, result)
        return results

    def shutdown(self) -> None:
        for wid in list(self.workers):
            self._remove(wid)
