"""Reward batching: the Serve reward service with `serve.batch` (up to 32 requests merged into one reward call) vs
the same service scoring one request per call (max_batch_size 1), under the same concurrent clients.

Two rewards, each the same on both sides: the demo's (shapes verifier + 0.2 x tiny CLIP score; the verifier
analyses one image at a time) and the tiny CLIP score alone (one batched forward). One replica each (1 CPU), both
sides deployed at once; `--clients` threads send single-image requests through RewardClient (the driver's
Serve-handle client) until `--requests` images are scored. Throughput in images/s. Goal: batched >= 5x.

    .venv/bin/python benchmarks/reward_batching.py [--clients 32] [--requests 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from common import ROOT, fmt, goal_cell, interleaved, md_table, rate, ratio, start_ray, stats, write_result

from shapes.world import all_specs, caption, render
from rewards.builtin import shapes_metadata
from rewards.client import RewardClient
from rewards.config import RewardsConfig
from rewards.service import start_service

GOAL = 5.0
CLIP = {"name": "clip_score", "weight": 0.2, "kwargs": {"model": f"local-dir:{ROOT / 'checkpoints/shapes-tiny/clip'}"}}
REWARDS = {"verifier + CLIP (demo)": [{"name": "verifier", "weight": 1.0, "kwargs": {"mode": "partial"}}, CLIP],
           "CLIP only": [CLIP]}


def service(name: str, rewards: list[dict], max_batch: int, clients: int) -> RewardClient:
    cfg = RewardsConfig.model_validate({"rewards": rewards, "service": {
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


def measure(label: str, rewards: list[dict], reqs: list, args) -> dict:
    """Both sides of one reward deployed at once, flooded alternately; the apps are deleted afterwards."""
    from ray import serve

    names = {"batched": f"rw{len(rewards)}-batched", "one_per_call": f"rw{len(rewards)}-single"}
    try:
        sides = {"batched": service(names["batched"], rewards, args.max_batch, args.clients),
                 "one_per_call": service(names["one_per_call"], rewards, 1, args.clients)}
        times = interleaved({k: (lambda c=c: flood(c, reqs, args.clients)) for k, c in sides.items()}, args.repeats)
        merged = sides["batched"].metrics()
    finally:
        for name in names.values():
            serve.delete(name)
    return {"reward": label, "seconds": times, "images_per_s": {k: stats(rate(v, len(reqs))) for k, v in times.items()},
            "speedup": ratio(times["one_per_call"], times["batched"]), "batched_service_metrics": merged}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from ray import serve

    start_ray()
    reqs = requests(args.requests)
    try:
        results = [measure(label, rewards, reqs, args) for label, rewards in REWARDS.items()]
    finally:
        serve.shutdown()
    rows = [[f"{r['reward']}, max batch {args.max_batch}", fmt(r["images_per_s"]["batched"]),
             fmt(r["images_per_s"]["one_per_call"]), fmt(r["speedup"]),
             f"{mean_batch(r['batched_service_metrics']):.1f}", goal_cell(r["speedup"]["median"], GOAL)]
            for r in results]
    table = md_table([f"{args.clients} concurrent clients, {args.requests} single-image requests",
                      "batched images/s", "one per call images/s", "throughput ratio", "mean batch", "goal"], rows)
    write_result("reward_batching", {"goal": GOAL, "results": results, "args": vars(args)}, table)


def mean_batch(metrics: dict) -> float:
    """Requests merged per reward call in the batched service."""
    hist = {int(k): v for k, v in metrics["requests_per_batch"].items()}
    return sum(k * v for k, v in hist.items()) / max(1, sum(hist.values()))


if __name__ == "__main__":
    main()
