"""Sample images from a policy for held-out shapes prompts, write a captioned PNG grid and verifier scores.

    python -m policy.demo configs/shapes-sample.yaml [key.sub=value ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from policy.config import ConfigError, load_config
from policy.images import save_grid, to_uint8
from policy.io import PolicyConfig, build_policy
from policy.sampler import SampleConfig, sample
from policy.shapes import caption, split_prompts
from rewards.verifier import score


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
    policy = build_policy(cfg.policy)
    specs = split_prompts().heldout[: cfg.num_images]
    prompts = [caption(s) for s in specs]
    images, checks = [], []
    for i in tqdm(range(0, len(prompts), cfg.batch_size), desc="sampling", unit="batch"):
        chunk = prompts[i : i + cfg.batch_size]
        seeds = [cfg.seed * 100_003 + i + j for j in range(len(chunk))]
        out = sample(policy.model, policy.vq, policy.encode_prompts(chunk), seeds, cfg.sample)
        images.append(to_uint8(out.images))
    import numpy as np

    images = np.concatenate(images)
    checks = [score(img, spec) for img, spec in zip(images, specs)]
    out_dir = Path(cfg.out_dir)
    grid = save_grid(images, [f"{p} [{'ok' if c['all'] else 'x'}]" for p, c in zip(prompts, checks)],
                     out_dir / "samples.png")
    strict = sum(c["all"] for c in checks) / len(checks)
    (out_dir / "scores.json").write_text(json.dumps({"strict": strict, "checks": checks}, indent=1))
    print(f"wrote {grid} ({len(images)} images); held-out strict verifier score {strict:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
