"""rollout/pool.py with real Ray actors: a tiny echo worker that returns its unit's index in every field, so a result
can be checked against its unit (which worker samples it, and when, must not matter)."""
import itertools
import os

import numpy as np
import pytest
import ray

from rollout.pool import RolloutPool
from rollout.units import UnitResult, WorkUnit
from rollout.worker import StaleWeightsError

G = 2


@ray.remote(max_restarts=0, max_task_retries=0)
class EchoWorker:
    """The rollout worker's interface (set_weights, get_version, sample_unit); dies once on `die_on` if asked."""

    def __init__(self, die_on: str | None = None, marker: str | None = None):
        self.version, self.state, self.die_on, self.marker = 0, None, die_on, marker

    def set_weights(self, version: int, state: dict) -> int:
        self.version, self.state = version, state
        return version

    def get_version(self) -> int:
        return self.version

    def sample_unit(self, unit: WorkUnit, min_version: int) -> UnitResult:
        if self.version < min_version:
            raise StaleWeightsError(f"v{self.version} < v{min_version}")
        if unit.uid == self.die_on and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)                                                      # the process dies mid-unit
        i = unit.index
        return UnitResult(unit.uid, [np.full((G, 1, 1), i)], np.full((G, 2, 2, 3), i, np.uint8),
                          np.full((G, 1), i + self.state["w"] if self.state else i, np.float32), self.version,
                          str(os.getpid()))


def units(step: int, n: int) -> list[WorkUnit]:
    return [WorkUnit(f"{step}/{i}", step, i, f"prompt {i}", (i,), 1000 * step + i, G) for i in range(n)]


def check(results: dict[str, UnitResult], us: list[WorkUnit], version: int, offset: float = 0) -> None:
    assert sorted(results) == sorted(u.uid for u in us)
    for u in us:
        r = results[u.uid]
        assert r.uid == u.uid and r.version == version and int(r.codes[0][0, 0, 0]) == u.index
        assert np.all(r.logprobs == u.index + offset)


def test_every_unit_once_weights_before_units_and_resize(local_ray):
    pool = RolloutPool(lambda: EchoWorker.options(num_cpus=0.25).remote(), 1, min_size=1, max_size=4)
    try:
        check(pool.run(units(1, 3)), units(1, 3), version=0)
        assert pool.stats["units"] == 3 and pool.size == 1
        pool.broadcast(1, {"w": 10.0})
        pool.resize(2)                                   # the new worker gets v1 queued before its first unit
        check(pool.run(units(2, 5)), units(2, 5), version=1, offset=10.0)
        assert pool.size == 2 and ray.get([w.get_version.remote() for w in pool.workers.values()]) == [1, 1]
        pool.resize(1)
        assert pool.size == 1 and pool.stats["workers_removed"] == 1
        check(pool.run(units(3, 2)), units(3, 2), version=1, offset=10.0)
        pool.version = 7                                 # a version no worker was sent: an error, not a lost worker
        with pytest.raises(StaleWeightsError):
            pool.run(units(4, 1))
        assert pool.stats["workers_lost"] == 0
    finally:
        pool.shutdown()


def test_a_dead_workers_unit_is_rerun_elsewhere(local_ray, tmp_path):
    marker = str(tmp_path / "died")
    pool = RolloutPool(lambda: EchoWorker.options(num_cpus=0.25).remote("4/1", marker), 1, min_size=1, max_size=4)
    try:
        check(pool.run(units(4, 3)), units(4, 3), version=0)
        assert os.path.exists(marker)
        assert pool.stats["reruns"] == 1 and pool.stats["workers_lost"] == 1 and pool.stats["units"] == 3
        assert pool.size == 1 and pool.stats["workers_added"] == 2   # the lost worker was replaced
    finally:
        pool.shutdown()


def test_desired_size_is_polled_and_unplaceable_workers_get_no_units(local_ray):
    wanted = [1]
    big = itertools.count()                              # the second worker asks for more CPUs than Ray has

    def factory():
        return EchoWorker.options(num_cpus=1000 if next(big) == 1 else 0.25).remote()

    pool = RolloutPool(factory, 1, min_size=1, max_size=2, desired=lambda: wanted[0])
    try:
        wanted[0] = 9                                    # clamped to max_size; the second worker never starts
        check(pool.run(units(5, 3)), units(5, 3), version=0)
        assert pool.target == 2 and pool.size == 2 and len(pool.ready) == 1 and pool.stats["units"] == 3
    finally:
        pool.shutdown()
