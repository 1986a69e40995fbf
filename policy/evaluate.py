"""Score a policy on held-out shapes prompts: overall and per category with 95% intervals, plus a PNG grid.

    python -m policy.evaluate POLICY_DIR [key=value ...]     e.g. images_per_category=96 out_dir=runs/eval

Each category gets exactly `images_per_category` images: its held-out prompts, repeated cyclically, image i
sampled with seed `seed + i`. The (prompt, seed) pairs are a pure function of the config, so two evaluations of
one config (before / after training) are paired image by image: `paired_comparison` of their scores.json.
Two judges: the verifier's fill ratio (the training reward) and its stricter template judge (not the reward).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ConfigDict, Field
from tqdm import tqdm

from core.config import Sections, load_config
from policy.images import save_grid, to_uint8
from policy.io import Policy, PolicyConfig, build_policy
from policy.sampler import SampleConfig, sample
from shapes.world import CATEGORIES, Spec, caption, split_prompts
from shapes.verifier import partial_credit, score

Z95 = 1.959963984540054  # two-sided 95% normal quantile


class EvalConfig(Sections):
    model_config = ConfigDict(extra="forbid")
    policy: PolicyConfig = Field(PolicyConfig(), description="the policy to score (policy.path: a saved one)")
    sample: SampleConfig = Field(SampleConfig(cfg_scale=3.0, guidance_schedule="linear", top_k=32, top_p=0.95),
                                 description="how the images are sampled")
    images_per_category: int = Field(96, ge=1, description="held-out prompts repeated cyclically (new seeds) up "
                                                           "to this many")
    batch_size: int = Field(32, ge=1, description="images sampled at once")
    seed: int = Field(1234, description="image i is sampled with seed + i")
    grid_size: int = Field(20, ge=1, description="images in the PNG grid")
    out_dir: str = Field("runs/eval", description="where scores.json and the grid are written")


@dataclass(frozen=True)
class EvalItem:
    index: int
    spec: Spec
    seed: int


# ------------------------------------------------------------------------------------------------ statistics
def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes / n; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values, z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval of a mean: mean +- z * s / sqrt(n), s the sample std (ddof=1); n >= 2."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        raise ValueError(f"mean_interval needs at least 2 values, got {len(x)}")
    half = z * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def paired_difference(before_flags, after_flags, z: float = Z95) -> dict:
    """after - before of paired 0/1 verdicts (same images): the mean difference with a normal-approximation
    interval, diff +- z * sqrt((mean(d^2) - mean(d)^2) / n) for d_i = after_i - before_i (Wald, paired).

    Returns {"diff", "ci": [lo, hi], "n", "gained" (0 -> 1), "lost" (1 -> 0)}. With few discordant pairs the
    interval is too narrow (it is [0, 0] when none); read it with "gained" and "lost".
    """
    b, a = np.asarray(before_flags, dtype=np.float64), np.asarray(after_flags, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError(f"paired_difference needs two equal-length non-empty lists, got {b.shape} and {a.shape}")
    d = a - b
    n, diff = len(d), float(d.mean())
    half = z * math.sqrt(max(0.0, float((d * d).mean()) - diff * diff) / n)
    return {"diff": diff, "ci": [diff - half, diff + half], "n": n,
            "gained": int((d > 0).sum()), "lost": int((d < 0).sum())}


# ------------------------------------------------------------------------------------------------ evaluation
def eval_items(images_per_category: int, seed: int) -> list[EvalItem]:
    """Category-major: each category's held-out prompts (split order) repeated cyclically to images_per_category;
    image i gets seed + i."""
    held = split_prompts().heldout
    specs = []
    for cat in CATEGORIES:
        group = [s for s in held if s.category == cat]
        specs += [group[i % len(group)] for i in range(images_per_category)]
    return [EvalItem(i, s, seed + i) for i, s in enumerate(specs)]


def image_batches(policy: Policy, items: list[EvalItem], cfg: EvalConfig):
    """Yields (b, H, W, 3) uint8 batches: one image per item, sampled with the items' seeds."""
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i : i + cfg.batch_size]
        out = sample(policy.model, policy.vq, policy.encode_prompts([caption(it.spec) for it in chunk]),
                     [it.seed for it in chunk], cfg.sample)
        yield to_uint8(out.images)


def sample_images(policy: Policy, items: list[EvalItem], cfg: EvalConfig, desc: str = "eval") -> np.ndarray:
    """(N, H, W, 3) uint8: one image per item, sampled in batches with the items' seeds."""
    batches = tqdm(image_batches(policy, items, cfg), total=-(-len(items) // cfg.batch_size), desc=desc,
                   unit="batch")
    return np.concatenate(list(batches))


def judge_images(images: np.ndarray, items: list[EvalItem]) -> list[dict]:
    """Per-image verdicts: strict and partial credit of the fill-ratio verifier, strict of the template judge."""
    records = []
    for img, it in zip(images, items):
        fill, tmpl = score(img, it.spec), score(img, it.spec, judge="template")
        records.append({"index": it.index, "prompt": caption(it.spec), "category": it.spec.category,
                        "seed": it.seed, "strict": int(fill["all"]), "partial": float(partial_credit(fill)),
                        "template": int(tmpl["all"])})
    return records


def rates_with_ci(records: list[dict], key: str) -> tuple[dict[str, float], dict[str, list[float]], dict[str, int]]:
    """Rate of the 0/1 verdict `key` overall and per category, each one's Wilson interval, and its image count."""
    groups = {"overall": [r[key] for r in records]}
    groups.update({c: [r[key] for r in records if r["category"] == c] for c in CATEGORIES})
    groups = {k: v for k, v in groups.items() if v}
    rates = {k: float(np.mean(v)) for k, v in groups.items()}
    cis = {k: list(wilson_interval(int(sum(v)), len(v))) for k, v in groups.items()}
    return rates, cis, {k: len(v) for k, v in groups.items()}


def summarize(records: list[dict]) -> dict:
    """{"overall", "partial", "<category>": floats, "num_images", "ci": {name: [lo, hi]}, "counts": {name: images},
    "template": {"overall", "<category>", "ci", "counts"}} (strict rates; template = the template judge's); the
    partial credit's interval is clipped to [0, 1]."""
    rates, ci, counts = rates_with_ci(records, "strict")
    partial = [r["partial"] for r in records]
    partial_ci = [min(1.0, max(0.0, v)) for v in mean_interval(partial)]
    t_rates, t_ci, t_counts = rates_with_ci(records, "template")
    return {"overall": rates.pop("overall"), "partial": float(np.mean(partial)), **rates,
            "num_images": len(records), "ci": {**ci, "partial": partial_ci},
            "counts": {**counts, "partial": len(partial)},
            "template": {**t_rates, "ci": t_ci, "counts": t_counts}}


def evaluate(policy: Policy, cfg: EvalConfig, desc: str = "eval") -> tuple[dict, np.ndarray, list[dict]]:
    """(summary (see `summarize`), images, per-image records (see `judge_images`)) of the held-out evaluation."""
    items = eval_items(cfg.images_per_category, cfg.seed)
    images = sample_images(policy, items, cfg, desc)
    records = judge_images(images, items)
    return summarize(records), images, records


def paired_comparison(before: dict, after: dict, key: str = "strict") -> dict:
    """`paired_difference` of the per-image verdict `key` of two scores.json reports of one eval config."""
    b, a = before["per_image"], after["per_image"]
    if [(r["prompt"], r["seed"]) for r in b] != [(r["prompt"], r["seed"]) for r in a]:
        raise ValueError("the reports judged different (prompt, seed) pairs: compare two evals of one config")
    return paired_difference([r[key] for r in b], [r[key] for r in a])


# ------------------------------------------------------------------------------------------------ reporting
def grid_indices(num_images: int, grid_size: int) -> np.ndarray:
    """Indices of the images shown in the grid: evenly spaced, a function of the counts only."""
    return np.linspace(0, num_images - 1, min(grid_size, num_images)).round().astype(int)


def grid_label(record: dict) -> str:
    mark = {1: "ok", 0: "x"}
    return f"{record['prompt']} [fill {mark[record['strict']]}, tmpl {mark[record['template']]}]"


def write_report(result: dict, images: np.ndarray, records: list[dict], out_dir: str | Path, grid_size: int) -> Path:
    """OUT/scores.json (the summary plus "per_image": records), OUT/grid.npz and OUT/samples.png (the captioned
    grid), each written atomically."""
    import io

    from core.atomic import atomic_write_bytes, atomic_write_text

    out = Path(out_dir)
    atomic_write_text(out / "scores.json", json.dumps({**result, "per_image": records}, indent=1))
    pick = grid_indices(len(images), grid_size)
    labels = [grid_label(records[i]) for i in pick]
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images[pick], labels=np.array(labels))
    atomic_write_bytes(out / "grid.npz", buf.getvalue())
    return save_grid(images[pick], labels, out / "samples.png", cols=5)


def side_by_side(before_dir: str | Path, after_dir: str | Path, out: str | Path, pairs_per_row: int = 4) -> Path:
    """One PNG: each grid image of two reports of one eval config (same prompts and seeds), before | after."""
    b, a = np.load(Path(before_dir) / "grid.npz"), np.load(Path(after_dir) / "grid.npz")
    if b["images"].shape != a["images"].shape:
        raise ValueError("side_by_side: the two reports have different grids: compare two evals of one config")
    images = np.stack([b["images"], a["images"]], axis=1).reshape(-1, *b["images"].shape[1:])
    labels = [f"{tag}: {label}" for pair in zip(b["labels"], a["labels"]) for tag, label in zip(("before", "after"),
                                                                                                pair)]
    return save_grid(images, labels, Path(out), cols=2 * pairs_per_row)


def _with_ci(name: str, value: float, ci: dict, digits: int) -> str:
    if name not in ci:
        return f"{value:.{digits}f}"
    lo, hi = ci[name]
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_scores(result: dict) -> str:
    """One line: overall and partial, per category, and the template judge's (each with its 95% interval)."""
    ci = result.get("ci", {})
    head = " ".join(f"{k}={_with_ci(k, result[k], ci, 3)}" for k in ("overall", "partial"))
    cats = " ".join(f"{c}={_with_ci(c, result[c], ci, 2)}" for c in CATEGORIES if c in result)
    line = f"{head} | {cats}"
    if "template" in result:
        t = result["template"]
        line += " | template " + " ".join(f"{k}={_with_ci(k, t[k], t.get('ci', {}), 2)}"
                                          for k in ("overall", *CATEGORIES) if k in t)
    return line


def main(argv: list[str], prog: str = "python -m policy.evaluate") -> int:
    from core.cli import parse_config_args

    cfg = parse_config_args(EvalConfig, argv, f"{prog} POLICY_DIR [key.sub=value ...] [--print-config]",
                            __doc__.split("\n\n", 2)[-1] + "\nPOLICY_DIR sets policy.path.",
                            load=lambda path, rest: load_config(EvalConfig, None, [f"policy.path={path}", *rest]))
    if isinstance(cfg, int):
        return cfg
    try:
        policy = build_policy(cfg.policy)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result, images, records = evaluate(policy, cfg)
    grid = write_report(result, images, records, cfg.out_dir, cfg.grid_size)
    print(f"held-out verifier score: {format_scores(result)}\nwrote {grid} and {Path(cfg.out_dir) / 'scores.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
