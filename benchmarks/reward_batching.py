"""Reward batching: the Serve reward service with `serve.batch` (up to 32 requests merged into one reward call) vs
the same service scoring one request per call (max_batch_size 1), under the same concurrent clients.

Same reward as the demo (shapes verifier + 0.2 x tiny CLIP score), one replica each (1 CPU), both deployed at once;
`--clients` threads send single-image requests through RewardClient (the driver's Serve-handle client) until
`--requests` images are scored. Throughput in images/s. Goal: batched >= 5x.

    .venv/bin/python benchmarks/reward_batching.py [--clients 32] [--requests 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from common import ROOT, fmt, goal_cell, interleaved, md_table, rate, ratio, start_ray, stats, write_result

from policy.shapes import all_specs, caption, render
from rewards.builtin import shapes_metadata
from rewards.client import RewardClient
from rewards.config import RewardsConfig
from rewards.service import start_service

GOAL = 5.0
REWARDS = [{"name": "verifier", "weight": 1.0, "kwargs": {"mode": "partial"}},
           {"name": "clip_score", "weight": 0.2,
            "kwargs": {"model": f"local-dir:{ROOT / 'checkpoints/shapes-tiny/clip'}"}}]


def service(name: str, max_batch: int, clients: int) -> RewardClient:
    cfg = RewardsConfig.model_validate({"rewards": REWARDS, "service": {
        "name": name, "route_prefix": f"/{name}", "num_cpus": 1, "max_batch_size": max_batch,
        "batch_wait_timeout_s": 0.01, "max_ongoing_requests": max(clients, max_batch), "port": 8127}})
    return RewardClient(start_service(cfg), cfg)


def requests(n: int) -> list[tuple[np.ndarray, list[str], list[dict]]]:
    """n single-image requests: rendered shapes scenes with their captions and specs."""
    rng = random.Random(0)
    specs = [rng.choice(all_specs()) for _ in range(n)]
    return [(render(s, rng)[None], [caption(s)], shapes_metadata([s])) for s in specs]


def flood(client: RewardClient, reqs: list, clients: int) -> None:
    """Score every request with `clients` concurrent callers."""
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda r: client.score(*r), reqs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from ray import serve

    start_ray()
    try:
        sides = {"batched": service("rewards-batched", args.max_batch, args.clients),
                 "one_per_call": service("rewards-single", 1, args.clients)}
        reqs = requests(args.requests)
        times = interleaved({k: (lambda c=c: flood(c, reqs, args.clients)) for k, c in sides.items()}, args.repeats)
        merged = sides["batched"].metrics()
    finally:
        serve.shutdown()
    per_s = {k: stats(rate(v, args.requests)) for k, v in times.items()}
    speedup = ratio(times["one_per_call"], times["batched"])
    table = md_table(
        [f"{args.clients} concurrent clients, {args.requests} single-image requests", "batched images/s",
         "one per call images/s", "throughput ratio", "goal"],
        [[f"verifier + CLIP, max batch {args.max_batch}", fmt(per_s["batched"]), fmt(per_s["one_per_call"]),
          fmt(speedup), goal_cell(speedup["median"], GOAL)]])
    write_result("reward_batching", {"goal": GOAL, "seconds": times, "images_per_s": per_s, "speedup": speedup,
                                     "batched_service_metrics": merged, "args": vars(args)}, table)


if __name__ == "__main__":
    main()
