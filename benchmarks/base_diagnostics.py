"""Why a base policy fails: the README's "The shipped base" figures for one policy folder.

    .venv/bin/python benchmarks/base_diagnostics.py [POLICY_DIR] [--binding]   (default: checkpoints/shapes-tiny/policy)

1. Object count: on the fixed held-out set (policy.evaluate's 480 (prompt, seed) pairs and sampling settings), how
   often the number of blobs the verifier finds equals the number of objects asked, per category, and the
   distribution of drawn - asked.
2. Codebook entropy: distinct codes and the entropy (nats) of their marginal per scale, over 256 held-out scenes.
3. Column turn: the largest rotary angle between two image tokens 7 columns apart on the final grid.
4. Binding (`--binding`): on two-object prompts of the training and the held-out split (192 images each, fixed
   seeds), how often both asked shapes are drawn, both asked colours are drawn (on any shapes), both shape-colour
   pairs are right (the strict verdict's colour check), and the colours are swapped between the two shapes.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policy.evaluate import EvalConfig, EvalItem, eval_items, sample_images, wilson_interval  # noqa: E402
from policy.io import Policy  # noqa: E402
from shapes.verifier import Blob, detect  # noqa: E402
from shapes.world import CATEGORIES, Spec, render, split_prompts  # noqa: E402

BINDING_FLAGS = ("shapes", "colours", "bound", "swapped")


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


def binding_flags(blobs: list[Blob], spec: Spec) -> dict[str, bool]:
    """A two-object scene's binding: both asked shapes drawn ("shapes"), both asked colours drawn on any shapes
    ("colours"), each asked shape drawn in its asked colour ("bound"), each drawn in the other's colour ("swapped")."""
    a, b = spec.objects

    def has(shape: str, colour: str | None) -> bool:
        return any(x.shape == shape and (colour is None or x.colour == colour) for x in blobs)

    return {"shapes": has(a.shape, None) and has(b.shape, None),
            "colours": {a.colour, b.colour} <= {x.colour for x in blobs},
            "bound": has(a.shape, a.colour) and has(b.shape, b.colour),
            "swapped": has(a.shape, b.colour) and has(b.shape, a.colour)}


def binding(policy: Policy, images: int = 192, seed: int = 5000) -> dict[str, dict[str, int]]:
    """split -> how many of `images` two-object images (sampled as policy.evaluate samples, image i with seed + i)
    have each of binding_flags."""
    cfg, splits, out = EvalConfig(), split_prompts(), {}
    for split in ("train", "heldout"):
        group = [s for s in getattr(splits, split) if s.category == "two-object"]
        items = [EvalItem(i, group[i % len(group)], seed + i) for i in range(images)]
        drawn = sample_images(policy, items, cfg, split)
        flags = [binding_flags(detect(img), it.spec) for img, it in zip(drawn, items)]
        out[split] = {k: sum(f[k] for f in flags) for k in BINDING_FLAGS}
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("policy_dir", nargs="?", default=ROOT / "checkpoints" / "shapes-tiny" / "policy", type=Path)
    ap.add_argument("--binding", action="store_true", help="only the two-object binding rates (section 4)")
    args = ap.parse_args(argv)
    policy = Policy.load(args.policy_dir)
    if args.binding:
        n = 192
        for split, hits in binding(policy, images=n).items():
            rates = (f"{k} {v / n:.3f} [{lo:.3f}, {hi:.3f}]"
                     for k, v in hits.items() for lo, hi in [wilson_interval(v, n)])
            print(f"two-object, {split} prompts ({n} images): " + ", ".join(rates))
        return 0
    print(f"column turn over the final grid: {column_turn(policy):.3f} rad")
    for s, (distinct, nats) in enumerate(code_entropy(policy), 1):
        print(f"scale {s}: {distinct} distinct codes, entropy {nats:.2f} nats")
    for cat, (exact, n, hist) in object_counts(policy).items():
        print(f"{cat}: object count right on {exact}/{n}; drawn - asked: {hist}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
