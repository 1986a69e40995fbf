"""The run's named control actor: how a live run is reached from outside (`python -m rl scale RUN ...`)."""
from __future__ import annotations

import time

import ray

NAMESPACE = "nextscale"


def control_name(run: str) -> str:
    return f"control:{run}"


@ray.remote(num_cpus=0)
class RunControl:
    def __init__(self, workers: int, min_workers: int, max_workers: int):
        self.bounds = (min_workers, max_workers)
        self.workers = workers

    def set_rollout_workers(self, n: int) -> int:
        """Clamp to the run's min/max and return the number the pool will keep."""
        self.workers = max(self.bounds[0], min(self.bounds[1], int(n)))
        return self.workers

    def rollout_workers(self) -> int:
        return self.workers


def start_control(run: str, workers: int, min_workers: int, max_workers: int, wait_s: float = 30.0):
    """Create the run's control actor. A name still held by the actor of a driver that just died (Ray frees it
    once it notices) is waited for; one that stays taken means another live driver runs this run."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return RunControl.options(name=control_name(run), namespace=NAMESPACE).remote(
                workers, min_workers, max_workers)
        except ValueError:
            if time.monotonic() > deadline:
                raise ValueError(f"name: run {run!r} already has a live driver on this cluster") from None
            time.sleep(0.5)


def scale(run: str, workers: int, address: str = "auto") -> int:
    """Ask a live run (on the cluster at `address`) to keep `workers` rollout workers."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR")
    try:
        actor = ray.get_actor(control_name(run), namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"run {run!r}: no live run of that name on this cluster") from None
    return ray.get(actor.set_rollout_workers.remote(workers))
