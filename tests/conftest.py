import json
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from policy.io import PolicyConfig, build_policy
from policy.scales import tiny_schedule
from shapes.world import all_specs, render
from policy.tokenizer import MultiScaleVQ, VQConfig
from policy.transformer import BackboneConfig, NextScaleConfig, NextScaleLM

SCHED = tiny_schedule()
# Ray Train's controller polls its workers every 2 s by default: each stage run here would end up to 2 s after its
# last step. Set before any local Ray starts, so its processes (and those of subprocess clusters) inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def shapes_batch(n: int, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    specs = all_specs()
    imgs = np.stack([render(rng.choice(specs), rng) for _ in range(n)])
    return torch.tensor(imgs).permute(0, 3, 1, 2).float() / 255


def tiny_model(seed: int = 0, **backbone) -> NextScaleLM:
    torch.manual_seed(seed)
    cfg = NextScaleConfig(backbone=BackboneConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, **backbone),
                          schedule=SCHED, text_vocab_size=30, num_codes=64, code_dim=16)
    model = NextScaleLM(cfg).eval()
    with torch.no_grad():  # sharpen the random head a little so sampling is not uniform
        model.lm_head.weight.mul_(20)
    return model


def tiny_vq(seed: int = 0, **kw) -> MultiScaleVQ:
    torch.manual_seed(seed)
    return MultiScaleVQ(VQConfig(schedule=SCHED, channels=[16, 16, 16], code_dim=16, num_codes=64, **kw)).eval()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, from 20000-32767: outside Ray's worker ports (10002-19999) and the
    kernel's ephemeral range (32768-60999 here), so no outgoing connection of a busy cluster takes it before the
    test's server binds it (a port from bind(0) can be, and a Serve proxy then fails to bind)."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module (logical CPUs above the 2 cores: actors here are small)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, namespace="nextscale", logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def vq():
    return tiny_vq()


@pytest.fixture(scope="session")
def trained_vq():
    """A tokenizer trained for a few dozen steps on shapes scenes (enough for reconstruction to be meaningful)."""
    torch.manual_seed(0)
    vq = MultiScaleVQ(VQConfig(schedule=SCHED, channels=[16, 16, 16], code_dim=16, num_codes=128))
    data = shapes_batch(256, seed=1)
    opt = torch.optim.Adam(vq.parameters(), 2e-3)
    for step in range(60):
        idx = torch.randint(0, len(data), (16,), generator=torch.Generator().manual_seed(step))
        loss = vq.losses(data[idx])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vq.eval()


PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12]]


# ------------------------------------------------------------------ the RL loop's tiny assets
TINY_POLICY = dict(vq={"channels": [8, 8, 8], "code_dim": 8, "num_codes": 32},
                   backbone={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "num_key_value_heads": 1})


@pytest.fixture(scope="session")
def rl_assets(tmp_path_factory):
    """A tiny random policy saved once. The runs are scored by the verifier and the red-pixel fraction: rewards
    that vary with the image and cost the reward replica no open_clip import (about 5 s of each run's start-up
    here); the CLIP reward through the service is tested in test_reward_service.py."""
    root = tmp_path_factory.mktemp("rl-assets")
    build_policy(PolicyConfig(seed=3, **TINY_POLICY)).save(root / "policy")
    return root


def run_config(assets, tmp_path, name, **over) -> dict:
    cfg = {
        "name": name, "runs_dir": str(tmp_path / "runs"), "seed": 1, "steps": 3,
        "policy_path": str(assets / "policy"), "m": 3, "group_size": 4, "prompts_per_step": 3, "alpha": 0.7,
        # ema: the exported policy is the weights' average, so every kill / resume comparison of final weights
        # also checks that the average survives the checkpoint
        "learner": {"num_ranks": 1, "lr": 3e-3, "micro_batch_size": 6, "cpus_per_rank": 0.5, "ema": 0.9},
        "rollout": {"workers": 2, "min_workers": 1, "max_workers": 3, "cpus_per_worker": 0.5,
                    "sample": {"cfg_scale": 2.0, "top_k": 8}},
        "rewards": {"rewards": [{"name": "verifier", "weight": 1.0},
                                {"name": "colour_fraction", "weight": 1.0}],
                    "service": {"num_cpus": 0.25, "max_batch_size": 4, "port": 8123}},
        "checkpoint": {"every": 1, "keep": 2},
        "logging": {"wandb": "offline", "grid_every": 2},
        "eval": {"enabled": False},
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return cfg


# ------------------------------------------------------------------ the fault-free reference run, once per session
@pytest.fixture(scope="session")
def _reference_cache() -> dict:
    return {}


@pytest.fixture(scope="module")
def reference_run(local_ray, rl_assets, tmp_path_factory, _reference_cache) -> Path:
    """The 3-step run of run_config(), fault-free: computed by the first module that asks (on its Ray), then reused."""
    if "run" not in _reference_cache:
        from rl.config import RunConfig
        from rl.driver import Driver

        cfg = RunConfig(**run_config(rl_assets, tmp_path_factory.mktemp("reference"), "ref"))
        Driver(cfg).run()
        _reference_cache["run"] = cfg.run_dir
    return _reference_cache["run"]


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "final_policy" / "transformer" / "model.safetensors")


def rewards_per_step(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["reward/mean"] for r in rows if "reward/mean" in r]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_run(reference: Path, run_dir: Path) -> None:
    """Bit-identical final weights and the same reward at every step."""
    assert same_weights(final_weights(reference), final_weights(run_dir)), f"{run_dir.name}: weights differ"
    assert rewards_per_step(reference) == rewards_per_step(run_dir), f"{run_dir.name}: rewards differ"
