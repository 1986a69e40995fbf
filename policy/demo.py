"""Sample images from a policy for held-out shapes prompts, write a captioned PNG grid and verifier scores.

    python -m policy.demo configs/shapes-sample.yaml [key.sub=value ...]
"""
from __future__ import annotations

import sys

import torch
from pydantic import BaseModel, ConfigDict

from core.config import ConfigError, load_config
from policy.evaluate import EvalConfig, evaluate, write_report
from policy.io import PolicyConfig, build_policy
from policy.sampler import SampleConfig
from shapes.world import CATEGORIES


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the run config holds more sections than the demo reads
    policy: PolicyConfig = PolicyConfig()
    sample: SampleConfig = SampleConfig()
    num_images: int = 16
    batch_size: int = 8
    seed: int = 0
    out_dir: str = "runs/demo"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip())
        return 2
    try:
        cfg = load_config(DemoConfig, argv[0], argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.seed)
    ecfg = EvalConfig(sample=cfg.sample, images_per_category=max(1, cfg.num_images // len(CATEGORIES)),
                      batch_size=cfg.batch_size, seed=cfg.seed, grid_size=cfg.num_images)
    result, images, labels = evaluate(build_policy(cfg.policy), ecfg, desc="sampling")
    grid = write_report(result, images, labels, cfg.out_dir, ecfg.grid_size)
    print(f"wrote {grid} ({len(images)} images); held-out strict verifier score {result['overall']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
