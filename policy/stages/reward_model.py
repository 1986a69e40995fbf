"""Stage: a tiny open_clip CLIP trained contrastively on shapes scenes and their captions (the learned reward).

    python -m policy.stages.reward_model configs/stages/shapes-clip.yaml [key=value ...]

The artefact is an open_clip `local-dir:` folder (open_clip_config.json + open_clip_model.safetensors):
`open_clip.create_model("local-dir:PATH")` and `open_clip.get_tokenizer("local-dir:PATH")` load it offline.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import torch
from pydantic import Field
from safetensors.torch import save_file

import policy.teacher  # noqa: F401  (registers the shapes-world open_clip configs)
from policy.optim import configure_optimizers
from policy.stages.common import StageConfig, device_of, main, sample_specs, scene_batch, step_rng, train_steps, world


class RewardModelConfig(StageConfig):
    model: str = Field("shapes-clip-tiny", description="open_clip model config to train from scratch")


def unique_specs(rng, n: int):
    """n specs with distinct captions (duplicates would be false negatives in the contrastive loss)."""
    seen, out = set(), []
    while len(out) < n:
        spec = sample_specs(rng, 1, split="all")[0]
        if spec not in seen:
            seen.add(spec)
            out.append(spec)
    return out


def save_open_clip(model, model_name: str, path: Path) -> None:
    from core.atomic import atomic_dir

    cfg = {"model_cfg": open_clip.get_model_config(model_name),
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    with atomic_dir(path) as tmp:  # written aside, swapped in whole
        (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "open_clip_model.safetensors")


def train_fn(config: dict) -> None:
    cfg = RewardModelConfig(**config)
    rank, size = world()
    torch.manual_seed(cfg.seed)
    model = open_clip.create_model(cfg.model)
    model.output_dict = True
    tokenizer = open_clip.get_tokenizer(cfg.model)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    loss_fn = open_clip.ClipLoss(rank=rank, world_size=size, local_loss=True, gather_with_grad=True)
    opt = configure_optimizers(model, cfg.lr, weight_decay=cfg.weight_decay)

    def step_fn(step: int):
        rng = step_rng(cfg.seed, step, rank)
        images, captions = scene_batch(rng, unique_specs(rng, cfg.batch_size))
        device = device_of(model)
        out = model((images.to(device) - mean.to(device)) / std.to(device), tokenizer(captions).to(device))
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        with torch.no_grad():
            sims = out["image_features"] @ out["text_features"].t()
            acc = (sims.argmax(1) == torch.arange(len(captions), device=device)).float().mean()
        return loss, {"i2t_acc": acc, "logit_scale": out["logit_scale"].detach()}

    train_steps(cfg, {"clip": model}, opt, step_fn, export=lambda d: save_open_clip(model, cfg.model, d))


if __name__ == "__main__":
    sys.exit(main(RewardModelConfig, train_fn, sys.argv[1:]))
