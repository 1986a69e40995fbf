"""Prefix learner: one learner step (LearnerGroup: a Ray actor with a DeepSpeed engine, forward + backward +
AdamW) on scales 1..m vs on all scales, same batch (same prompts, codes, advantages; old log-probs of the prefix).

The forward covers `text + <boi> + scales 2..m`, so its cost should follow the prefix's token count.
Worlds: the shipped tiny policy (m = 4 of 6 scales, 30 vs 130 tokens) and the small random 12-scale 256-px policy
(m = 8 of 12, 204 vs 900 tokens). Goal: time ratio full / prefix >= 0.8 x token-count ratio.

Two clocks, A/B interleaved: wall time of LearnerGroup.step on the driver, and the step's CPU seconds = the sum over
ranks of the actor process's time.process_time() delta around the step (LearnerActor.cpu_seconds). The CPU-second
ratio is the headline (the machine is shared: wall time carries the other jobs' load). Each rank gets 1 CPU, so
Ray sets OMP_NUM_THREADS=1 and the actor runs one torch thread (checked, `actor_torch_threads` in the JSON).

    .venv/bin/python benchmarks/prefix_learner.py [--batch ROWS] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import ray
import torch
from common import cpu_threads, fmt, goal_cell, md_table, policy_dir, prompts, ratio, start_ray, stats, write_result

from policy.io import Policy
from policy.scales import prefix_tokens
from policy.scoring import score_prefix
from rl.config import GRPOLossConfig
from rl.learner import LearnerGroup
from rl.strategy import LearnerConfig
from rl.update import TrainBatch

GOAL = 0.8
WORLD_M = {"tiny": 4, "256": 8}
WORLD_ROWS = {"tiny": 64, "256": 8}   # the demo's batch (8 prompts x G = 8); 8 rows at 256 px to stay short


def make_batch(policy: Policy, rows: int) -> TrainBatch:
    """Random codes of every scale, their log-probs under the policy as the old log-probs, +-1 advantages."""
    g = torch.Generator().manual_seed(0)
    model = policy.model
    text = prompts(rows, vocab=model.cfg.text_vocab_size)
    codes = [torch.randint(0, model.cfg.num_codes, (rows, h, w), generator=g) for h, w in model.schedule]
    with torch.no_grad():
        old = score_prefix(model, policy.vq, text, codes, len(model.schedule)).logprobs    # (B, N_S)
    adv = torch.tensor([1.0, -1.0]).repeat(rows // 2)
    return TrainBatch(text, codes, old, adv)


def timed_steps(groups: dict[str, LearnerGroup], batches: dict[str, TrainBatch], repeats: int, warmup: int = 1,
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall s, CPU s) per step of each group, A, B, A, B, ... `repeats` times after `warmup` untimed rounds.
    CPU s = sum over the group's ranks of the actor process's CPU-time delta around the step."""
    def cpu(g: LearnerGroup) -> list[float]:
        return ray.get([a.cpu_seconds.remote() for a in g.actors])

    for _ in range(warmup):
        for k, g in groups.items():
            g.step(batches[k])
    wall: dict[str, list[float]] = {k: [] for k in groups}
    cpu_s: dict[str, list[float]] = {k: [] for k in groups}
    for _ in range(repeats):
        for k, g in groups.items():
            before = cpu(g)
            t = time.perf_counter()
            g.step(batches[k])
            wall[k].append(time.perf_counter() - t)
            cpu_s[k].append(sum(a - b for a, b in zip(cpu(g), before)))
    return wall, cpu_s


def measure(name: str, root: str, rows: int, repeats: int) -> dict:
    path = policy_dir(name, root)
    policy = Policy.load(path)
    sched = policy.model.schedule
    batch = make_batch(policy, rows)
    ms = {"prefix": WORLD_M[name], "full": len(sched)}
    tokens = {k: prefix_tokens(sched, m) for k, m in ms.items()}
    cfg = LearnerConfig(batch_size=rows, micro_batch_size=rows, cpus_per_rank=1, lr=1e-5)
    groups = {k: LearnerGroup(path, m, 0.7, GRPOLossConfig(), cfg) for k, m in ms.items()}
    try:
        threads = {k: ray.get(g.actors[0].__ray_call__.remote(lambda self: torch.get_num_threads()))
                   for k, g in groups.items()}
        batches = {k: TrainBatch(batch.text_ids, batch.codes, batch.old_logprobs[:, :tokens[k]], batch.advantages)
                   for k in ms}
        wall, cpu_s = timed_steps(groups, batches, repeats)
    finally:
        for g in groups.values():
            g.shutdown()
    token_ratio = tokens["full"] / tokens["prefix"]
    wall_ratio, cpu_ratio = ratio(wall["full"], wall["prefix"]), ratio(cpu_s["full"], cpu_s["prefix"])
    return {"world": name, "m": ms, "tokens": tokens, "rows": rows, "ranks": cfg.num_ranks,
            "actor_torch_threads": threads, "seconds": wall, "cpu_seconds": cpu_s,
            "step_s": {k: stats(v) for k, v in wall.items()}, "step_cpu_s": {k: stats(v) for k, v in cpu_s.items()},
            "time_ratio": wall_ratio, "cpu_ratio": cpu_ratio, "token_ratio": token_ratio,
            "efficiency": cpu_ratio["median"] / token_ratio, "wall_efficiency": wall_ratio["median"] / token_ratio}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=None, help=f"rows per step (default {WORLD_ROWS})")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worlds", nargs="+", default=["tiny", "256"])
    args = ap.parse_args()
    cpu_threads()
    start_ray()
    with tempfile.TemporaryDirectory() as root:
        results = [measure(w, root, args.batch or WORLD_ROWS[w], args.repeats) for w in args.worlds]
    rows = [[f"{r['world']}: m = {r['m']['prefix']} vs {r['m']['full']}, {r['rows']} rows",
             f"{r['tokens']['prefix']} vs {r['tokens']['full']}", f"{r['token_ratio']:.2f}",
             fmt(r["step_cpu_s"]["prefix"]), fmt(r["step_cpu_s"]["full"]), fmt(r["cpu_ratio"]),
             f"{r['efficiency']:.2f}", goal_cell(r["efficiency"], GOAL),
             fmt(r["step_s"]["prefix"]), fmt(r["step_s"]["full"]), fmt(r["time_ratio"]), f"{r['wall_efficiency']:.2f}"]
            for r in results]
    table = md_table(["world, batch", "image tokens", "token ratio", "prefix step CPU-s", "full step CPU-s",
                      "CPU-s ratio", "CPU-s / token ratio", "goal", "prefix step wall s", "full step wall s",
                      "wall ratio", "wall / token ratio"], rows)
    write_result("prefix_learner", {"goal": GOAL, "results": results}, table)


if __name__ == "__main__":
    main()
