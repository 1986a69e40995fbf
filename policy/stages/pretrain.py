"""Stage: alignment -> progressive pretraining of the next-scale transformer (and SFT, with a curated subset).

    python -m policy.stages.pretrain configs/stages/shapes-pretrain.yaml [key=value ...]

Next-scale cross-entropy with scale weights k_s (alpha per phase), self-correction on the inputs, prompt dropout
for classifier-free guidance, and a resolution curriculum: each phase trains the first `scales` scales (the tiny
analogue of NextFlow's 256 -> 512 -> 1024 px). `freeze_backbone` trains only the new image parts (alignment).
"""
from __future__ import annotations

import sys

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.config import absolute_path
from policy.io import Policy
from policy.losses import next_scale_loss
from policy.optim import configure_optimizers
from policy.scales import scale_index_per_token, scale_weights
from policy.scoring import teacher_forced_logits
from policy.stages.common import StageConfig, device_of, main, sample_specs, scene_batch, step_rng, train_steps, world
from policy.text_tokenizer import encode_prompts, shapes_tokenizer
from policy.tokenizer import MultiScaleVQ
from policy.transformer import BackboneConfig, NextScaleConfig, NextScaleLM


class Phase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(description="steps of this phase")
    scales: int | None = Field(None, description="train scales 1..scales (null: all)")
    alpha: float = Field(0.0, description="scale-weight exponent (NextFlow: 0.9 from its second resolution stage)")
    freeze_backbone: bool = Field(False, description="alignment: train only image inputs, scale embeddings and "
                                                     "the head")


class PretrainConfig(StageConfig):
    vq_path: str | None = Field(None, description="the tokenizer stage's output (ignored when policy_path is set)")
    policy_path: str | None = Field(None, description="continue from a saved policy (SFT)")
    init_from: str | None = Field(None, description="a Hugging Face Qwen2 / Qwen2.5 directory to initialise the "
                                                    "backbone")
    backbone: BackboneConfig = Field(BackboneConfig(), description="the transformer of a new policy")
    phases: list[Phase] = Field([Phase(steps=100)], description="training phases in order; steps is their sum")
    self_correct: float = Field(0.6, description="fraction of input tokens per scale drawn from the top-k nearest "
                                                 "codes")
    self_correct_topk: int = Field(4, description="k of self_correct")
    prompt_dropout: float = Field(0.1, description="probability of training on the null (empty) prompt")
    categories: list[str] | None = Field(None, description="restrict the prompts (SFT's curated subset)")

    @model_validator(mode="after")
    def _steps_from_phases(self):
        self.vq_path, self.policy_path, self.init_from = map(absolute_path, (self.vq_path, self.policy_path,
                                                                            self.init_from))
        self.steps = sum(p.steps for p in self.phases)
        if self.policy_path is None and self.vq_path is None:
            raise ValueError("vq_path: needed to pretrain a new policy (or set policy_path)")
        return self


def build(cfg: PretrainConfig) -> Policy:
    if cfg.policy_path:
        policy = Policy.load(cfg.policy_path)
        policy.model.train()
        return policy
    vq = MultiScaleVQ.from_pretrained(cfg.vq_path)
    tok = shapes_tokenizer()
    if cfg.init_from:
        model = NextScaleLM.from_qwen2(cfg.init_from, vq.schedule, vq.cfg.num_codes, vq.cfg.code_dim)
    else:
        model = NextScaleLM(NextScaleConfig(backbone=cfg.backbone, schedule=vq.schedule, text_vocab_size=len(tok),
                                            num_codes=vq.cfg.num_codes, code_dim=vq.cfg.code_dim,
                                            pad_token_id=tok.pad_token_id))
    return Policy(model.train(), vq, tok)


def phase_at(phases: list[Phase], step: int) -> Phase:
    for p in phases:
        if step < p.steps:
            return p
        step -= p.steps
    return phases[-1]


def set_trainable(model: NextScaleLM, freeze_backbone: bool) -> None:
    model.requires_grad_(True)
    if freeze_backbone:
        model.backbone.layers.requires_grad_(False)
        model.backbone.norm.requires_grad_(False)


def make_step_fn(cfg: PretrainConfig, policy: Policy, rank: int = 0):
    """step -> (loss, metrics) for one worker: a batch that is a pure function of (seed, step, rank)."""
    model, vq = policy.model, policy.vq.requires_grad_(False).eval()
    sched = model.schedule

    def step_fn(step: int):
        phase = phase_at(cfg.phases, step)
        set_trainable(model, phase.freeze_backbone)
        k = phase.scales or len(sched)
        rng, device = step_rng(cfg.seed, step, rank), device_of(model)
        images, captions = scene_batch(rng, sample_specs(rng, cfg.batch_size, cfg.categories))
        text = [[] if rng.random() < cfg.prompt_dropout else ids for ids in encode_prompts(policy.tokenizer, captions)]
        with torch.no_grad():
            enc = vq.encode(images.to(device), cfg.self_correct, cfg.self_correct_topk,
                            torch.Generator(device).manual_seed(rng.randrange(2**31)))
        logits = teacher_forced_logits(model, vq, text, enc.inputs, k)
        targets = torch.cat([c.flatten(1) for c in enc.targets[:k]], dim=1)
        loss, per_scale = next_scale_loss(logits, targets, scale_index_per_token(sched[:k]),
                                          scale_weights(sched[:k], phase.alpha))
        metrics = {f"ce/scale{s + 1}": v for s, v in enumerate(per_scale.detach())}
        metrics["scales"] = k
        return loss, metrics

    return step_fn


def make_optimizer(cfg: PretrainConfig, model: NextScaleLM) -> torch.optim.Optimizer:
    return configure_optimizers(model, cfg.lr, (0.9, 0.95), cfg.weight_decay)


def train_fn(config: dict) -> None:
    cfg = PretrainConfig(**config)
    rank, _ = world()
    torch.manual_seed(cfg.seed)
    policy = build(cfg)
    train_steps(cfg, {"model": policy.model}, make_optimizer(cfg, policy.model), make_step_fn(cfg, policy, rank),
                export=policy.save, frozen={"vq": policy.vq})


if __name__ == "__main__":
    sys.exit(main(PretrainConfig, train_fn, sys.argv[1:]))
