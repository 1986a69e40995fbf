"""Score a policy on held-out shapes prompts with the verifier: overall and per category, plus a PNG grid.

    python -m policy.evaluate POLICY_DIR [key=value ...]     e.g. samples_per_prompt=2 out_dir=runs/eval
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from policy.config import ConfigError, load_config
from policy.images import save_grid, to_uint8
from policy.io import Policy, PolicyConfig, build_policy
from policy.sampler import SampleConfig, sample
from policy.shapes import CATEGORIES, Spec, caption, split_prompts
from rewards.verifier import partial_credit, score


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: PolicyConfig = PolicyConfig()
    sample: SampleConfig = SampleConfig(cfg_scale=3.0, guidance_schedule="linear", top_k=32, top_p=0.95)
    prompts_per_category: int = 24     # held-out prompts per category (fewer if the category has fewer)
    samples_per_prompt: int = 1
    batch_size: int = 32
    seed: int = 1234
    grid_size: int = 20
    out_dir: str = "runs/eval"


def eval_specs(per_category: int) -> list[Spec]:
    held = split_prompts().heldout
    return [s for c in CATEGORIES for s in [x for x in held if x.category == c][:per_category]]


def evaluate(policy: Policy, cfg: EvalConfig, desc: str = "eval") -> tuple[dict, np.ndarray, list[str]]:
    """Verifier scores of samples for held-out prompts: {"overall", "partial", "<category>": strict rate}."""
    specs = [s for s in eval_specs(cfg.prompts_per_category) for _ in range(cfg.samples_per_prompt)]
    images = []
    for i in tqdm(range(0, len(specs), cfg.batch_size), desc=desc, unit="batch"):
        chunk = specs[i : i + cfg.batch_size]
        out = sample(policy.model, policy.vq, policy.encode_prompts([caption(s) for s in chunk]),
                     [cfg.seed + i + j for j in range(len(chunk))], cfg.sample)
        images.append(to_uint8(out.images))
    images = np.concatenate(images)
    checks = [score(img, spec) for img, spec in zip(images, specs)]
    by_cat = defaultdict(list)
    for spec, c in zip(specs, checks):
        by_cat[spec.category].append(c["all"])
    result = {"overall": float(np.mean([c["all"] for c in checks])),
              "partial": float(np.mean([partial_credit(c) for c in checks])),
              **{cat: float(np.mean(v)) for cat, v in by_cat.items()}, "num_images": len(specs)}
    labels = [f"{caption(s)} [{'ok' if c['all'] else 'x'}]" for s, c in zip(specs, checks)]
    return result, images, labels


def write_report(result: dict, images: np.ndarray, labels: list[str], out_dir: str | Path, grid_size: int) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    pick = np.linspace(0, len(images) - 1, min(grid_size, len(images))).round().astype(int)
    return save_grid(images[pick], [labels[i] for i in pick], out / "samples.png", cols=5)


def format_scores(result: dict) -> str:
    cats = " ".join(f"{c}={result[c]:.2f}" for c in CATEGORIES if c in result)
    return f"overall={result['overall']:.3f} partial={result['partial']:.3f} | {cats}"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        cfg = load_config(EvalConfig, None, [f"policy.path={argv[0]}", *argv[1:]])
        policy = build_policy(cfg.policy)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result, images, labels = evaluate(policy, cfg)
    grid = write_report(result, images, labels, cfg.out_dir, cfg.grid_size)
    print(f"held-out verifier score: {format_scores(result)}\nwrote {grid} and {Path(cfg.out_dir) / 'scores.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
