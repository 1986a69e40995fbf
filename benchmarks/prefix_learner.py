"""Prefix learner: one learner step (LearnerGroup: a Ray actor with a DeepSpeed engine, forward + backward +
AdamW) on scales 1..m vs on all scales, same batch (same prompts, codes, advantages; old log-probs of the prefix).

The forward covers `text + <boi> + scales 2..m`, so its cost should follow the prefix's token count.
Worlds: the shipped tiny policy (m = 4 of 6 scales, 30 vs 130 tokens) and the small random 12-scale 256-px policy
(m = 8 of 12, 204 vs 900 tokens). Goal: time ratio full / prefix >= 0.8 x token-count ratio.

    .venv/bin/python benchmarks/prefix_learner.py [--batch ROWS] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from common import (cpu_threads, fmt, goal_cell, interleaved, md_table, policy_dir, prompts, ratio, start_ray, stats,
                    write_result)

from policy.io import Policy
from policy.scales import prefix_tokens
from policy.scoring import score_prefix
from rl.grpo import GRPOLossConfig
from rl.learner import LearnerConfig, LearnerGroup, TrainBatch

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


def measure(name: str, root: str, rows: int, repeats: int) -> dict:
    path = policy_dir(name, root)
    policy = Policy.load(path)
    sched = policy.model.schedule
    batch = make_batch(policy, rows)
    ms = {"prefix": WORLD_M[name], "full": len(sched)}
    cfg = LearnerConfig(batch_size=rows, micro_batch_size=rows, cpus_per_rank=2, lr=1e-5)
    groups = {k: LearnerGroup(path, m, 0.7, GRPOLossConfig(), cfg) for k, m in ms.items()}
    try:
        def step(k):
            n = prefix_tokens(sched, ms[k])
            return lambda: groups[k].step(TrainBatch(batch.text_ids, batch.codes, batch.old_logprobs[:, :n],
                                                     batch.advantages))
        times = interleaved({k: step(k) for k in ms}, repeats)
    finally:
        for g in groups.values():
            g.shutdown()
    tokens = {k: prefix_tokens(sched, m) for k, m in ms.items()}
    token_ratio = tokens["full"] / tokens["prefix"]
    time_ratio = ratio(times["full"], times["prefix"])
    return {"world": name, "m": ms, "tokens": tokens, "rows": rows, "seconds": times,
            "step_s": {k: stats(v) for k, v in times.items()}, "time_ratio": time_ratio,
            "token_ratio": token_ratio, "efficiency": time_ratio["median"] / token_ratio}


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
             f"{r['tokens']['prefix']} vs {r['tokens']['full']}", fmt(r["step_s"]["prefix"]),
             fmt(r["step_s"]["full"]), fmt(r["time_ratio"]), f"{r['token_ratio']:.2f}", f"{r['efficiency']:.2f}",
             goal_cell(r["efficiency"], GOAL)] for r in results]
    table = md_table(["world, batch", "image tokens", "prefix step s", "full step s",
                      "time ratio", "token ratio", "time / token ratio", "goal"], rows)
    write_result("prefix_learner", {"goal": GOAL, "results": results}, table)


if __name__ == "__main__":
    main()
