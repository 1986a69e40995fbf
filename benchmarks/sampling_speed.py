"""Sampling speed: next-scale (KV-cached, one forward per scale) vs raster-scan (one forward per token) sampling.

Same backbone, same final token grid, same batch and sampling settings (CFG 3, top-k 32, top-p 0.95); images/s of
the token grid (the tokenizer's decoder is left out of both). Two batch sizes: 8 (throughput) and 1 (the latency
regime of the VAR family's 20x claim: one image, 2 rows with CFG). Two worlds: the shipped tiny shapes policy (6 scales,
8x8 grid) and a small random model on NextFlow's 12-scale 256-px schedule (16x16 grid). Goal: >= 20x at 12 scales.
Timed in CPU seconds of this process on one torch thread (common.interleaved: the machine is shared, wall
time would mostly measure the other jobs).

    .venv/bin/python benchmarks/sampling_speed.py [--batches 1 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

from common import cpu_threads, fmt, goal_cell, interleaved, md_table, prompts, rate, ratio, stats, world, write_result

from policy.sampler import SampleConfig, sample, sample_raster

CFG = SampleConfig(cfg_scale=3.0, top_k=32, top_p=0.95)
GOAL = 20.0


def measure(name: str, batch: int, repeats: int) -> dict:
    model, vq = world(name)
    text = prompts(batch, vocab=model.cfg.text_vocab_size)
    seeds = list(range(batch))
    times = interleaved({
        "next_scale": lambda: sample(model, vq, text, seeds, CFG, decode=False),
        "raster": lambda: sample_raster(model, vq, text, seeds, CFG, decode=False),
    }, repeats, clock=time.process_time)
    per_s = {k: rate(v, batch) for k, v in times.items()}
    grid = model.schedule[-1]
    forwards = {"next_scale": len(model.schedule), "raster": grid[0] * grid[1]}   # text prefill included in both
    return {"world": name, "scales": len(model.schedule), "grid": grid, "batch": batch, "seconds": times,
            "forwards": forwards,
            "images_per_s": {k: stats(v) for k, v in per_s.items()},
            "speedup": ratio(times["raster"], times["next_scale"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worlds", nargs="+", default=["tiny", "256"])
    args = ap.parse_args()
    cpu_threads()
    results = [measure(w, b, args.repeats) for w in args.worlds for b in args.batches]
    rows = [[f"{r['world']} ({r['scales']} scales, {r['grid'][0]}x{r['grid'][1]} grid)", r["batch"],
             fmt(r["images_per_s"]["next_scale"]), fmt(r["images_per_s"]["raster"]),
             f"{r['forwards']['next_scale']} vs {r['forwards']['raster']}", fmt(r["speedup"]),
             goal_cell(r["speedup"]["median"], GOAL) if r["scales"] == 12 else "-"]
            for r in results]
    table = md_table(["world (CFG)", "batch", "next-scale images/CPU-s", "raster images/CPU-s",
                      "forward passes", "speed-up", "goal"], rows)
    write_result("sampling_speed", {"goal": GOAL, "results": results}, table)


if __name__ == "__main__":
    main()
