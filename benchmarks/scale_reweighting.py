"""Scale reweighting: with alpha = 0.9 the coarse scales' loss falls faster than with alpha = 0 (same budget).

Two copies of the same tiny transformer (same init, same batches, interleaved step by step in one process) are
trained with k_s for alpha = 0 and alpha = 0.9; the per-scale cross-entropy is measured on one fixed evaluation
batch (no self-correction, no prompt dropout). Writes benchmarks/results/scale_reweighting.{json,md}.

    .venv/bin/python benchmarks/scale_reweighting.py [--vq checkpoints/shapes-tiny/policy/vq] [--steps 150]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import trange

from core.atomic import atomic_write_text
from policy.losses import next_scale_loss
from policy.scales import scale_index_per_token, scale_weights
from policy.scoring import teacher_forced_logits
from policy.stages.common import lr_at, sample_specs, scene_batch, step_rng
from policy.stages.pretrain import Phase, PretrainConfig, build, make_optimizer, make_step_fn

OUT = Path(__file__).parent / "results"


@torch.no_grad()
def per_scale_ce(policy, images, text) -> list[float]:
    enc = policy.vq.encode(images)
    sched = policy.model.schedule
    logits = teacher_forced_logits(policy.model, policy.vq, text, enc.targets, len(sched))
    targets = torch.cat([c.flatten(1) for c in enc.targets], 1)
    _, per_scale = next_scale_loss(logits, targets, scale_index_per_token(sched), scale_weights(sched, 0.0))
    return per_scale.tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vq", default="checkpoints/shapes-tiny/policy/vq")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(2)
    runs = {}
    for alpha in (0.0, 0.9):
        cfg = PretrainConfig(name=f"alpha{alpha}", vq_path=args.vq, batch_size=16, lr=1.5e-3, warmup_steps=20,
                             phases=[Phase(steps=args.steps, alpha=alpha)])
        torch.manual_seed(0)
        policy = build(cfg)
        runs[alpha] = (policy, make_optimizer(cfg, policy.model), make_step_fn(cfg, policy), cfg)
    rng = step_rng(12345, 0, 0)
    images, captions = scene_batch(rng, sample_specs(rng, 64, split="heldout"))
    text = runs[0.0][0].encode_prompts(captions)
    curves = {a: [] for a in runs}

    for step in trange(args.steps, desc="alpha 0 vs 0.9 (interleaved)"):
        for alpha, (policy, opt, step_fn, cfg) in runs.items():
            torch.manual_seed(step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss, _ = step_fn(step)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
            opt.step()
            if (step + 1) % args.eval_every == 0:
                curves[alpha].append((step + 1, per_scale_ce(policy, images, text)))
    num_scales = len(runs[0.0][0].model.schedule)
    coarse = lambda ce: sum(ce[:3]) / 3  # noqa: E731  scales 1..3
    rows = ["| step | coarse CE (scales 1-3), alpha 0 | alpha 0.9 | fine CE (scale 6), alpha 0 | alpha 0.9 |",
            "|---|---|---|---|---|"]
    for (s, a0), (_, a9) in zip(curves[0.0], curves[0.9]):
        rows.append(f"| {s} | {coarse(a0):.3f} | {coarse(a9):.3f} | {a0[num_scales - 1]:.3f} | {a9[num_scales - 1]:.3f} |")
    OUT.mkdir(exist_ok=True)
    atomic_write_text(OUT / "scale_reweighting.json", json.dumps({str(a): c for a, c in curves.items()}, indent=1))
    atomic_write_text(OUT / "scale_reweighting.md", "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
