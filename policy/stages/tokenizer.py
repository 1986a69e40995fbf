"""Stage: train the multi-scale VQ tokenizer on shapes scenes (pixel branch; joint semantic branch with a teacher).

    python -m policy.stages.tokenizer configs/stages/shapes-tokenizer.yaml [key=value ...]

Reports reconstruction PSNR and per-scale code usage.
"""
from __future__ import annotations

import sys

import torch
from pydantic import Field

from policy.optim import configure_optimizers
from policy.scales import tiny_schedule
from policy.stages.common import StageConfig, device_of, main, sample_specs, scene_batch, step_rng, train_steps, world
from policy.tokenizer import MultiScaleVQ, VQConfig


class TokenizerStageConfig(StageConfig):
    vq: VQConfig = Field(VQConfig(schedule=tiny_schedule()), description="the tokenizer's architecture")
    beta: float = Field(0.25, description="commitment weight")
    fg_weight: float = Field(4.0, description="extra reconstruction weight on non-background pixels")
    restart_every: int = Field(25, description="steps between dead-code restarts (0: never)")
    semantic_weight: float = Field(1.0, description="weight of the semantic (teacher) loss")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio (dB) of images in [0, 1]."""
    return -10 * torch.log10(torch.mean((x - y) ** 2).clamp_min(1e-10))


def recon_pass_rate(vq: MultiScaleVQ, n: int = 480, seed: int = 7) -> float:
    """Fraction of held-out scenes (category-balanced) whose reconstruction passes the strict verifier."""
    from shapes.verifier import score

    rng = step_rng(seed, 0, 0)
    specs = sample_specs(rng, n, split="heldout")
    passed = 0
    with torch.no_grad():
        for i in range(0, n, 64):
            images, _ = scene_batch(rng, specs[i : i + 64])
            recon = vq.decode(vq.encode(images.to(device_of(vq))).targets)
            recon = (recon * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            passed += sum(score(img, spec)["all"] for img, spec in zip(recon, specs[i : i + 64]))
    return passed / n


def restart_codes(vq: MultiScaleVQ, images: torch.Tensor, step: int) -> int:
    """Dead-code restart on rank 0, then the codebook is broadcast so every rank holds the same one."""
    import torch.distributed as dist

    rank, size = world()
    n = 0
    if rank == 0:
        with torch.no_grad():
            n = vq.restart_dead_codes(vq.encode(images), torch.Generator().manual_seed(step))
    else:
        vq.usage.zero_()
    if size > 1:
        dist.broadcast(vq.pix_codebook.weight.data, src=0)
    return n


def train_fn(config: dict) -> None:
    cfg = TokenizerStageConfig(**config)
    rank, _ = world()
    torch.manual_seed(cfg.seed)
    vq = MultiScaleVQ(cfg.vq)
    modules: dict[str, torch.nn.Module] = {"vq": vq}
    teacher = head = None
    if cfg.vq.sem_dim and cfg.vq.teacher:
        from policy.teacher import SemanticTeacher

        teacher = SemanticTeacher(cfg.vq.teacher, cfg.vq.teacher_pretrained, grid=cfg.vq.grid)
        head = torch.nn.Conv2d(cfg.vq.sem_dim, teacher.dim, 1)
        modules["sem_head"] = head
    opt = configure_optimizers(torch.nn.ModuleDict(modules), cfg.lr, weight_decay=cfg.weight_decay)

    def step_fn(step: int):
        rng = step_rng(cfg.seed, step, rank)
        images, _ = scene_batch(rng, sample_specs(step_rng(cfg.seed, step, rank), cfg.batch_size, split="all"))
        images = images.to(device_of(vq))
        feats = teacher(images) if teacher is not None else None
        losses = vq.losses(images, beta=cfg.beta, teacher_feats=feats, sem_head=head, fg_weight=cfg.fg_weight)
        loss = losses["recon"] + losses["vq"] + cfg.semantic_weight * (losses.get("semantic", 0) + losses.get("sem_commit", 0))
        metrics = {k: v.detach() for k, v in losses.items() if k != "loss"}
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0:
            metrics["restarted_codes"] = restart_codes(vq, images, step)
        if (step + 1) % cfg.log_every == 0:
            with torch.no_grad():
                enc = vq.encode(images)
                metrics["psnr"] = psnr(vq.decode(enc.targets), images)
                for s, codes in enumerate(enc.targets, start=1):
                    metrics[f"usage/scale{s}"] = torch.unique(codes).numel() / cfg.vq.num_codes
        if rank == 0 and (step + 1 == cfg.steps or (step + 1) % cfg.checkpoint_every == 0):
            metrics["recon_pass"] = recon_pass_rate(vq.eval())
            vq.train()
        return loss, metrics

    train_steps(cfg, modules, opt, step_fn, export=lambda d: vq.save_pretrained(d),
                frozen={"teacher": teacher} if teacher is not None else None)


if __name__ == "__main__":
    sys.exit(main(TokenizerStageConfig, train_fn, sys.argv[1:]))
