"""End-to-end step: wall-time breakdown of GRPO steps of the demo config (configs/shapes-tiny.yaml: 2 rollout
workers, Serve reward service, 1-rank DeepSpeed learner; the README's table is of the demo of its day) on a local Ray.

The script drives rl.driver.Driver itself (step, then checkpoint, every step; held-out eval off) and times the
whole iteration from outside; the parts are the driver's own timers (time/rollout, reward, learner, sync,
logging, checkpoint). Driver overhead = iteration time - sum of the parts (prompt/unit set-up, advantages, the
train batch, metrics, wandb logging, the reward curve). The first `--warmup` steps are left out.
Goal: overhead <= 10 % of the step.

    .venv/bin/python benchmarks/step_breakdown.py [--steps 6] [--warmup 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time

from common import ROOT, fmt, goal_cell, md_table, start_ray, stats, write_result

from core.config import load_config
from rl.config import RunConfig
from rl.driver import Driver

PARTS = ["rollout", "reward", "learner", "sync", "checkpoint", "logging"]
GOAL = 0.10


def run_steps(cfg: RunConfig) -> list[dict[str, float]]:
    """Per step: the driver's part timings and the whole iteration (step + checkpoint) timed from outside."""
    driver = Driver(cfg)
    state, ckpt = driver._prepare_run_dir()
    records = []
    try:
        driver._start(state, ckpt)
        for _ in range(cfg.steps):
            t = time.perf_counter()
            driver.step(state)
            driver.checkpoint(state)
            wall = time.perf_counter() - t
            records.append({k: driver.timings[k] for k in PARTS} | {"iteration": wall})
    finally:
        driver.shutdown()
    return records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/shapes-tiny.yaml"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of the run config")
    args = ap.parse_args()
    start_ray()
    with tempfile.TemporaryDirectory() as runs:
        cfg = load_config(RunConfig, args.config, [f"runs_dir={runs}", "name=bench-step",
                                                   f"steps={args.steps + args.warmup}", "eval.enabled=false",
                                                   "checkpoint.every=1", *args.overrides])
        records = run_steps(cfg)[args.warmup:]
    for r in records:
        r["overhead"] = r["iteration"] - sum(r[k] for k in PARTS)
    s = {k: stats([r[k] for r in records]) for k in PARTS + ["overhead", "iteration"]}
    share = {k: stats([r[k] / r["iteration"] for r in records]) for k in PARTS + ["overhead"]}
    rows = [[k, fmt(s[k]), f"{100 * share[k]['median']:.1f} %"] for k in PARTS + ["overhead"]]
    rows.append(["**step (iteration)**", fmt(s["iteration"]), "100 %"])
    over = share["overhead"]["median"]
    table = md_table([f"part (demo config, median of {len(records)} steps)", "seconds", "share"], rows)
    table += f"\nDriver overhead {100 * over:.1f} % of the step: {goal_cell(100 * over, 100 * GOAL, '<=', ' %')}.\n"
    write_result("step_breakdown", {"goal": GOAL, "records": records, "seconds": s, "share": share,
                                    "config": cfg.model_dump(mode="json")}, table)


if __name__ == "__main__":
    main()
