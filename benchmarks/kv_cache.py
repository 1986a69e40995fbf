"""KV cache: the cached next-scale sampler (each scale's block attends to the cached keys/values) vs recomputing
the whole prefix (text + every earlier scale) at each scale (`sample(..., use_cache=False)`; same codes).

Same model, batch and settings; images/s of the token grid. The FLOP ratio of the two (benchmarks/common.py
`sampler_flops`) is the ceiling a compute-bound machine can show. Goal: >= 4x.
Timed in CPU seconds of this process on one torch thread (common.interleaved: the machine is shared, wall
time would mostly measure the other jobs).

    .venv/bin/python benchmarks/kv_cache.py [--batch 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

from common import (cpu_threads, fmt, goal_cell, interleaved, md_table, prompts, rate, ratio, sampler_flops, stats,
                    world, write_result)

from policy.sampler import SampleConfig, sample

CFG = SampleConfig(cfg_scale=3.0, top_k=32, top_p=0.95)
GOAL = 4.0
TEXT_LEN = 8


def measure(name: str, batch: int, repeats: int) -> dict:
    model, vq = world(name)
    text = prompts(batch, length=TEXT_LEN, vocab=model.cfg.text_vocab_size)
    seeds = list(range(batch))
    times = interleaved({
        "cached": lambda: sample(model, vq, text, seeds, CFG, decode=False),
        "recompute": lambda: sample(model, vq, text, seeds, CFG, decode=False, use_cache=False),
    }, repeats, clock=time.process_time)
    rows = 2 * batch  # CFG: conditional + unconditional rows
    flops = {k: sampler_flops(model.cfg, TEXT_LEN, rows, use_cache=k == "cached") for k in times}
    return {"world": name, "scales": len(model.schedule), "batch": batch, "seconds": times, "flops": flops,
            "flop_ratio": flops["recompute"] / flops["cached"],
            "images_per_s": {k: stats(rate(v, batch)) for k, v in times.items()},
            "speedup": ratio(times["recompute"], times["cached"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worlds", nargs="+", default=["tiny", "256"])
    args = ap.parse_args()
    cpu_threads()
    results = [measure(w, args.batch, args.repeats) for w in args.worlds]
    rows = [[f"{r['world']} ({r['scales']} scales)", fmt(r["images_per_s"]["cached"]),
             fmt(r["images_per_s"]["recompute"]), f"{r['flop_ratio']:.2f}", fmt(r["speedup"]),
             goal_cell(r["speedup"]["median"], GOAL)] for r in results]
    table = md_table([f"world (batch {args.batch}, CFG)", "cached images/CPU-s", "recompute images/CPU-s",
                      "FLOP ratio", "speed-up", "goal"], rows)
    write_result("kv_cache", {"goal": GOAL, "results": results}, table)


if __name__ == "__main__":
    main()
