"""Sample images from a policy for held-out shapes prompts, write a captioned PNG grid and verifier scores.

    python -m policy.demo configs/shapes-sample.yaml [key.sub=value ...]
"""
from __future__ import annotations

import sys

import torch
from pydantic import BaseModel, ConfigDict, Field

from core.cli import parse_config_args
from policy.evaluate import EvalConfig, evaluate, write_report
from policy.io import PolicyConfig, build_policy
from policy.sampler import SampleConfig
from shapes.world import CATEGORIES


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the run config holds more sections than the demo reads
    policy: PolicyConfig = Field(PolicyConfig(), description="the policy (policy.path: a saved one; null: fresh)")
    sample: SampleConfig = Field(SampleConfig(), description="how the images are sampled")
    num_images: int = Field(16, ge=1, description="images sampled (spread over the held-out categories)")
    batch_size: int = Field(8, ge=1, description="images sampled at once")
    seed: int = Field(0, description="seed of the sampling")
    out_dir: str = Field("runs/demo", description="where samples.png and scores.json are written")


def main(argv: list[str]) -> int:
    cfg = parse_config_args(DemoConfig, argv, "python -m policy.demo CONFIG [key.sub=value ...] [--print-config]",
                            __doc__.splitlines()[0])
    if isinstance(cfg, int):
        return cfg
    torch.manual_seed(cfg.seed)
    ecfg = EvalConfig(sample=cfg.sample, images_per_category=max(1, cfg.num_images // len(CATEGORIES)),
                      batch_size=cfg.batch_size, seed=cfg.seed, grid_size=cfg.num_images)
    result, images, labels = evaluate(build_policy(cfg.policy), ecfg, desc="sampling")
    grid = write_report(result, images, labels, cfg.out_dir, ecfg.grid_size)
    print(f"wrote {grid} ({len(images)} images); held-out strict verifier score {result['overall']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
