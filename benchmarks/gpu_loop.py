"""The GPU check's loop rows: 3 steps of the real RL loop (rollout workers, the Serve reward service, the DeepSpeed
learner, the driver) on the shipped tiny shapes policy, every actor on the one GPU (fractions of it), bf16 on both
sides of the ratio. `benchmarks/gpu_nextflow.py` runs it first; with --smoke the same code runs on the CPU.

It fails (the row says so, the script exits 1) when a step's first-pass ratio deviates from 1 by more than
MAX_FIRST_PASS_DEV: old and new log-probs must come from one precision policy on one device. In bf16 the learner
recomputes the old log-probs (learner.recompute_old_logprobs); how far the rollouts' own were is reported beside.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from common import TINY_POLICY

MAX_FIRST_PASS_DEV = 1e-2
STEPS = 3
GPU_SHARE = 0.25  # learner rank, 2 rollout workers, reward replica: 4 x 0.25 = one GPU


def loop_config(runs_dir: str, gpu: bool, port: int) -> dict:
    share = GPU_SHARE if gpu else 0.0
    return dict(
        name="gpu-check", runs_dir=runs_dir, seed=0, steps=STEPS, m=4, group_size=8, prompts_per_step=4,
        policy_path=str(TINY_POLICY),
        learner={"num_ranks": 1, "use_gpu": gpu, "gpus_per_rank": GPU_SHARE, "precision": "bf16",
                 "cpus_per_rank": 0.5, "lr": 1e-4, "micro_batch_size": 32},
        rollout={"workers": 2, "cpus_per_worker": 0.5, "gpus_per_worker": share},   # precision: the learner's
        rewards={"rewards": [{"name": "verifier", "weight": 1.0, "kwargs": {"mode": "strict"}}],
                 "service": {"num_cpus": 0.25, "num_gpus": share, "port": port}},
        checkpoint={"every": STEPS, "keep": 1}, logging={"wandb": "disabled", "grid_every": STEPS},
        eval={"enabled": False},
    )


def loop_rows(gpu: bool) -> tuple[list, dict]:
    """Run the loop; one table row with s/step, the reward and the largest first-pass deviation over the steps."""
    import ray

    from rl.config import RunConfig
    from rl.driver import Driver
    from core.collective import free_port

    if not ray.is_initialized():
        ray.init(log_to_driver=False)  # joins RAY_ADDRESS if set, else starts a local Ray
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(**loop_config(tmp, gpu, free_port()))
        t = time.perf_counter()
        Driver(cfg).run()
        wall = time.perf_counter() - t
        rows = [json.loads(line) for line in (Path(tmp) / cfg.name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "learner/ratio_first_pass_max_abs_dev" in r]
    dev = max(r["learner/ratio_first_pass_max_abs_dev"] for r in rows)
    gap = max(r["learner/rollout_logp_max_abs_dev"] for r in rows)     # bf16: the learner recomputes old log-probs
    data = {"steps": len(rows), "wall_s": wall, "first_pass_max_abs_dev": dev, "rollout_logp_max_abs_dev": gap,
            "reward_mean": [r["reward/mean"] for r in rows], "step_s": [r["time/step"] for r in rows]}
    if len(rows) != STEPS or dev > MAX_FIRST_PASS_DEV:
        raise RuntimeError(f"RL loop: {len(rows)} of {STEPS} steps, first-pass |ratio - 1| up to {dev:.3g} "
                           f"(allowed {MAX_FIRST_PASS_DEV:g})")
    where = f"one GPU shared {GPU_SHARE:g} per actor" if gpu else "CPU"
    return [[f"RL loop on the tiny world, {STEPS} steps, bf16 rollouts + learner ({where})",
             f"{wall / STEPS:.3g} s per step (incl. start-up)", f"{dev:.2g}",
             f"first-pass max |ratio - 1| (goal <= {MAX_FIRST_PASS_DEV:g}); the rollouts' own log-probs were up to "
             f"{gap:.2g} off (the learner recomputes them in bf16)"]], data
