"""Weights over a collective (gloo) group between learner rank 0 and the rollout workers (rl/weight_sync.py,
core/collective.py): the pure flattening, then real Ray actors — a real DeepSpeed learner and real rollout workers."""
import os
import signal
import threading
import time

import pytest
import ray
import torch

from core.collective import buffer_sizes, flatten_state, state_layout, unflatten_state
from policy.io import Policy
from rl.config import GRPOLossConfig
from rl.grpo import group_advantages
from rl.learner import LearnerGroup
from rl.strategy import LearnerConfig
from rl.update import TrainBatch
from rl.weight_sync import WeightSync, sync_backend
from rollout.pool import RolloutPool
from rollout.units import WorkUnit
from rollout.worker import RolloutWorker

M, G = 3, 2
CAPTIONS = ["a red circle", "two blue squares below a green triangle"]


def test_flat_buffers_round_trip_bit_for_bit():
    state = {"b.w": torch.randn(3, 4), "a.w": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).view(2, 3)}
    layout = state_layout(state)
    assert [name for name, _, _ in layout] == ["a.w", "b.w", "c"]
    buffers = flatten_state(state, layout)
    assert buffer_sizes(layout) == {"bfloat16": 5, "float32": 12, "int64": 6}
    assert {k: v.numel() for k, v in buffers.items()} == buffer_sizes(layout)
    back = unflatten_state(buffers, layout)
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    with pytest.raises(ValueError, match=r"^weights: b.w is \(4, 3\)"):
        flatten_state(state | {"b.w": torch.randn(4, 3)}, layout)


def test_nccl_only_when_both_ends_are_on_gpus():
    assert sync_backend(True, 0.25) == "nccl"
    assert sync_backend(True, 0.0) == sync_backend(False, 1.0) == sync_backend(False, 0.0) == "gloo"


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def learner_step(learner: LearnerGroup, pool: RolloutPool, policy: Policy, step: int) -> None:
    """One real step: the pool samples two units, the learner trains on them (the weights move)."""
    units = [WorkUnit(f"{step}/{i}", step, i, c, tuple(ids), 10 * step + i, G)
             for i, (c, ids) in enumerate(zip(CAPTIONS, policy.encode_prompts(CAPTIONS)))]
    results = pool.run(units)
    rs = [results[u.uid] for u in units]
    learner.step(TrainBatch([list(u.text_ids) for u in units for _ in range(G)],
                            [torch.cat([torch.from_numpy(r.codes[s]) for r in rs]) for s in range(M)],
                            torch.cat([torch.from_numpy(r.logprobs) for r in rs]),
                            group_advantages(torch.tensor([[1.0, 0.0], [0.2, 0.9]])).flatten()))


def worker_states(pool: RolloutPool) -> list[dict]:
    return ray.get([h.trainable_state.remote() for h in pool.workers.values()])


@pytest.mark.slow
def test_collective_sync_elastic_join_and_a_worker_killed_mid_broadcast(local_ray, rl_assets):
    path = rl_assets / "policy"
    policy = Policy.load(path)
    learner = LearnerGroup(path, M, 0.7, GRPOLossConfig(), LearnerConfig(batch_size=4, micro_batch_size=4, lr=1e-2))
    pool = RolloutPool(lambda: RolloutWorker.options(num_cpus=0.25).remote(str(path), {"cfg_scale": 1.0}, M), 2,
                       min_size=1, max_size=3)
    sync = WeightSync(learner, pool, "collective", timeout_s=30)
    try:
        before = worker_states(pool)[0]
        learner_step(learner, pool, policy, 1)
        sync.push()                                  # a group of learner rank 0 + 2 workers, weights v1 over gloo
        want = learner.trainable_state()
        assert all(same(s, want) for s in worker_states(pool)) and not same(want, before)
        assert before.keys() == want.keys()
        assert sync.stats["collective_workers"] == 2 and sync.stats["fallback_workers"] == 0
        assert sync.stats["bytes"] == 2 * sum(v.numel() * v.element_size() for v in want.values())

        pool.resize(3)                               # joins mid-run: v1 from the object store, before any unit
        assert ray.get([h.get_version.remote() for h in pool.workers.values()]) == [1, 1, 1]
        learner_step(learner, pool, policy, 2)       # ... and samples step 2 with it
        sync.push()                                  # v2: a new group of 3
        assert sync.stats["group_builds"] == 2 and sync.stats["collective_workers"] == 5
        assert all(same(s, learner.trainable_state()) for s in worker_states(pool))

        learner_step(learner, pool, policy, 3)
        victim = next(iter(pool.workers.values()))
        pid = ray.get(victim.pid.remote())
        killer = threading.Thread(target=os.kill, args=(pid, signal.SIGKILL))
        t = time.perf_counter()
        killer.start()                               # SIGKILL while v3 goes out
        sync.push()
        killer.join()
        took = time.perf_counter() - t
        survivors = {w: h for w, h in pool.workers.items() if h != victim}
        want = learner.trainable_state()
        assert all(same(s, want) for s in ray.get([h.trainable_state.remote() for h in survivors.values()]))
        assert took < sync.timeout_s, f"the push waited {took:.1f} s for a dead worker"
        learner_step(learner, pool, policy, 4)       # the run goes on: the dead worker's units run elsewhere
        sync.push()
        assert all(same(s, learner.trainable_state()) for s in worker_states(pool))
        assert pool.stats["workers_lost"] >= 1 and sync.stats["group_builds"] >= 3
    finally:
        pool.shutdown()
        learner.shutdown()
