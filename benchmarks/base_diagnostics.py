"""Why a base policy fails: the README's "The shipped base" figures for one policy folder.

    .venv/bin/python benchmarks/base_diagnostics.py [POLICY_DIR]      (default: checkpoints/shapes-tiny/policy)

1. Object count: on the fixed held-out set (policy.evaluate's 480 (prompt, seed) pairs and sampling settings), how
   often the number of blobs the verifier finds equals the number of objects asked, per category, and the
   distribution of drawn - asked.
2. Codebook entropy: distinct codes and the entropy (nats) of their marginal per scale, over 256 held-out scenes.
3. Column turn: the largest rotary angle between two image tokens 7 columns apart on the final grid.
"""
from __future__ import annotations

import collections
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policy.evaluate import EvalConfig, eval_items, sample_images  # noqa: E402
from policy.io import Policy  # noqa: E402
from shapes.verifier import detect  # noqa: E402
from shapes.world import CATEGORIES, render, split_prompts  # noqa: E402


def object_counts(policy: Policy) -> dict[str, tuple[int, int, dict[int, int]]]:
    """category -> (images whose blob count equals the objects asked, images, {drawn - asked: images})."""
    cfg = EvalConfig()
    items = eval_items(cfg.images_per_category, cfg.seed)
    out: dict[str, tuple[int, int, collections.Counter]] = {c: (0, 0, collections.Counter()) for c in CATEGORIES}
    for img, it in zip(sample_images(policy, items, cfg), items):
        diff = len(detect(img)) - sum(o.count for o in it.spec.objects)
        exact, n, hist = out[it.spec.category]
        hist[diff] += 1
        out[it.spec.category] = (exact + (diff == 0), n + 1, hist)
    return {c: (e, n, dict(sorted(h.items()))) for c, (e, n, h) in out.items()}


def code_entropy(policy: Policy, scenes: int = 256, seed: int = 5) -> list[tuple[int, float]]:
    """Per scale: (distinct codes, entropy in nats of the code marginal) over held-out scenes."""
    rng, held = random.Random(seed), split_prompts().heldout
    images = np.stack([render(rng.choice(held), rng) for _ in range(scenes)])
    with torch.no_grad():
        enc = policy.vq.encode(torch.tensor(images).permute(0, 3, 1, 2).float() / 255)
    rows = []
    for codes in enc.targets:
        p = np.array(list(collections.Counter(codes.flatten().tolist()).values()), dtype=float) / codes.numel()
        rows.append((len(p), float(-(p * np.log(p)).sum())))
    return rows


def column_turn(policy: Policy) -> float:
    """Largest angle (rad) between the rotary embeddings of two image tokens at the final grid's first and last
    column (same scale and row)."""
    width = policy.model.schedule[-1][1]
    pos = torch.tensor([[5.0, 5.0], [6.0, 6.0], [6.0, 6.0 + width - 1]])[:, None]
    cos, sin = policy.model.backbone.rotary_emb(torch.zeros(1), pos)
    turn = torch.atan2(sin[0, 1] * cos[0, 0] - cos[0, 1] * sin[0, 0], cos[0, 0] * cos[0, 1] + sin[0, 0] * sin[0, 1])
    return float(turn.abs().max())


def main(argv: list[str]) -> int:
    policy = Policy.load(argv[0] if argv else ROOT / "checkpoints" / "shapes-tiny" / "policy")
    print(f"column turn over the final grid: {column_turn(policy):.3f} rad")
    for s, (distinct, nats) in enumerate(code_entropy(policy), 1):
        print(f"scale {s}: {distinct} distinct codes, entropy {nats:.2f} nats")
    for cat, (exact, n, hist) in object_counts(policy).items():
        print(f"{cat}: object count right on {exact}/{n}; drawn - asked: {hist}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
