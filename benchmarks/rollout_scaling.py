"""Rollout scaling: units/s of the elastic rollout pool with 1 vs 2 rollout workers on this machine.

The demo's work: 8 units (one prompt's group of G = 8 each, CFG 3, all 6 scales, decoded images) of the shipped
tiny policy; each worker is a Ray actor with 1 CPU and 1 torch thread (the demo's threads_per_worker). Both pools
are up at once and run the same units alternately. The ceiling the cores set is min(workers, cores) / 1 = 2x on
2 cores, less whatever else runs on the machine (its load average is recorded).

    .venv/bin/python benchmarks/rollout_scaling.py [--units 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os

from common import TINY_POLICY, fmt, interleaved, md_table, prompts, rate, ratio, start_ray, stats, write_result

from policy.sampler import SampleConfig
from rollout.pool import RolloutPool
from rollout.units import WorkUnit
from rollout.worker import RolloutWorker

SAMPLE = SampleConfig(cfg_scale=3.0, guidance_schedule="linear", top_k=32, top_p=0.95).model_dump()


def pool(size: int) -> RolloutPool:
    factory = lambda: RolloutWorker.options(num_cpus=1).remote(str(TINY_POLICY), SAMPLE, 4)  # noqa: E731
    p = RolloutPool(factory, size, min_size=size, max_size=size)
    p._poll_starting(timeout=120)
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    start_ray()
    units = [WorkUnit(f"0/{i}", 0, i, "", tuple(t), 1000 + i, args.group)
             for i, t in enumerate(prompts(args.units, length=6, vocab=24))]
    pools = {"1 worker": pool(1), "2 workers": pool(2)}
    load_before = os.getloadavg()
    try:
        times = interleaved({k: (lambda p=p: p.run(units)) for k, p in pools.items()}, args.repeats)
    finally:
        for p in pools.values():
            p.shutdown()
    per_s = {k: stats(rate(v, args.units)) for k, v in times.items()}
    speedup = ratio(times["1 worker"], times["2 workers"])
    ceiling = min(2, os.cpu_count())
    table = md_table([f"{args.units} units of G = {args.group} (tiny policy)", "1 worker units/s",
                      "2 workers units/s", "speed-up", "ceiling (cores)"],
                     [["rollout pool", fmt(per_s["1 worker"]), fmt(per_s["2 workers"]), fmt(speedup),
                       f"{ceiling}x ({os.cpu_count()} cores)"]])
    write_result("rollout_scaling", {"seconds": times, "units_per_s": per_s, "speedup": speedup,
                                     "ceiling": ceiling, "load_avg_before": load_before, "args": vars(args)}, table)


if __name__ == "__main__":
    main()
