"""The end-to-end learning check: with an easy reward (the fraction of red pixels) prefix-GRPO on the shipped
policy must raise the reward clearly within about a minute of RL. A sign or alignment error anywhere between
rollout, reward, advantage and learner cannot hide here behind bit-for-bit comparisons with a reference run.
The same run checks the held-out evaluation between steps (eval.every) and its curve file."""
import json
from pathlib import Path

import numpy as np
import pytest

from rl.config import RunConfig
from rl.driver import Driver
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_red_fraction_rises_within_a_minute(local_ray, tmp_path):
    steps = 12
    cfg = RunConfig(
        name="learn-red", runs_dir=str(tmp_path), seed=0, steps=steps, m=3, group_size=8, prompts_per_step=4,
        policy_path=str(ROOT / "checkpoints" / "shapes-tiny" / "policy"),
        learner={"num_ranks": 1, "lr": 1e-3, "micro_batch_size": 32, "cpus_per_rank": 0.5},
        rollout={"workers": 2, "cpus_per_worker": 0.5,
                 "sample": {"cfg_scale": 3.0, "guidance_schedule": "constant", "top_k": 32, "top_p": 0.95}},
        rewards={"rewards": [{"name": "colour_fraction", "weight": 1.0, "kwargs": {"colour": "red"}}],
                 "service": {"num_cpus": 0.25, "max_batch_size": 32, "port": free_port()}},
        checkpoint={"every": steps, "keep": 1}, logging={"wandb": "disabled", "grid_every": steps},
        eval={"enabled": True, "images_per_category": 2, "every": 6},
    )
    summary = Driver(cfg).run()
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    reward = [r["reward/mean"] for r in rows if "reward/mean" in r]
    first, last = np.mean(reward[:3]), np.mean(reward[-3:])
    assert last > 2 * first and last - first > 0.02, reward
    curve = [json.loads(line) for line in (cfg.run_dir / "eval_curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [0, 6, 12] and [c["tag"] for c in curve] == ["before", "step_6", "after"]
    assert all(c["num_images"] == 10 and "ci" in c for c in curve)
    assert summary["eval_after"]["overall"] == curve[-1]["overall"]
