"""Sampler efficiency: achieved FLOP/s of batched next-scale sampling (transformer FLOPs counted by
`common.sampler_flops`, checked against torch's FlopCounterMode in tests/test_benchmarks_math.py, over the wall
time of the whole sampler call) vs the FLOP/s of a large fp32 matmul, measured interleaved in the same run.

Batch 32 with CFG (64 rows), top-k 32 / top-p 0.95, decode left out. Worlds: the shipped tiny policy and the small
random 12-scale 256-px model. Goal: >= 50 % of the matmul's FLOP/s at batch 32.
Timed in CPU seconds of this process on one torch thread (common.interleaved: the machine is shared, wall
time would mostly measure the other jobs).

    .venv/bin/python benchmarks/sampler_efficiency.py [--batch 32] [--repeats 3] [--matmul 2048]
"""
from __future__ import annotations

import argparse
import time

import torch
from common import (cpu_threads, fmt, goal_cell, interleaved, md_table, prompts, rate, ratio, sampler_flops, stats,
                    world, write_result)

from policy.sampler import SampleConfig, sample

CFG = SampleConfig(cfg_scale=3.0, top_k=32, top_p=0.95)
GOAL = 0.5
TEXT_LEN = 8


def measure(name: str, batch: int, repeats: int, n: int) -> dict:
    model, vq = world(name)
    text = prompts(batch, length=TEXT_LEN, vocab=model.cfg.text_vocab_size)
    seeds = list(range(batch))
    sample(model, vq, text[:2], seeds[:2], CFG, decode=False)                         # warm-up, small
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = interleaved({
        "sampler": lambda: sample(model, vq, text, seeds, CFG, decode=False),
        "matmul": lambda: [a @ b for _ in range(4)],
    }, repeats, warmup=0, clock=time.process_time)
    flops = {"sampler": sampler_flops(model.cfg, TEXT_LEN, rows=2 * batch), "matmul": 4 * 2 * n**3}
    fps = {k: rate(v, flops[k]) for k, v in times.items()}
    eff = ratio(fps["sampler"], fps["matmul"])
    return {"world": name, "batch": batch, "flops": flops, "seconds": times,
            "gflop_per_s": {k: stats([x / 1e9 for x in v]) for k, v in fps.items()}, "efficiency": eff}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matmul", type=int, default=2048, help="side of the reference n x n x n matmul")
    ap.add_argument("--worlds", nargs="+", default=["tiny", "256"])
    args = ap.parse_args()
    cpu_threads()
    results = [measure(w, args.batch, args.repeats, args.matmul) for w in args.worlds]
    rows = [[r["world"], f"{r['flops']['sampler'] / 1e9:.1f}", fmt(r["gflop_per_s"]["sampler"]),
             fmt(r["gflop_per_s"]["matmul"]), fmt(r["efficiency"], 2),
             goal_cell(100 * r["efficiency"]["median"], 100 * GOAL, unit=" %")]
            for r in results]
    table = md_table([f"world (batch {args.batch}, CFG)", "sampler GFLOP per call", "sampler GFLOP per CPU-s",
                      f"matmul {args.matmul}^3 GFLOP per CPU-s", "fraction of matmul", "goal"], rows)
    write_result("sampler_efficiency", {"goal": GOAL, "results": results}, table)


if __name__ == "__main__":
    main()
