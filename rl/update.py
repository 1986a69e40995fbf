"""One learner update, pure (no Ray, no DeepSpeed engine): the train batch, the scored module, one micro-step.

    logp, entropy = scores(text, codes)                       PrefixScorer: score_prefix over scales 1..m
    loss, metrics = prefix_grpo_loss(logp, old, adv, k, cfg, ref)               (rl/grpo.py)

`micro_step` returns the loss of one micro-batch (a per-row mean, not yet scaled or backpropagated) and its
metrics; the learner actor (rl/learner.py), the benchmarks and the tests all call it, so they train the same way.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from policy.optim import configure_optimizers
from policy.scales import scale_index_per_token, scale_weights
from core.settings import SampleConfig
from policy.scoring import Guidance, guidance_of, score_prefix
from rl.config import GRPOLossConfig
from rl.grpo import per_scale_mean, prefix_grpo_loss
from rl.strategy import LearnerConfig

Scores = Callable[[list[list[int]], list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------------------------------------ the batch
@dataclass
class TrainBatch:
    text_ids: list[list[int]]      # B prompts (token ids, no padding)
    codes: list[torch.Tensor]      # codes of scales 1..m (more are ignored), each (B, h_s, w_s) long
    old_logprobs: torch.Tensor     # (B, N_m) log-probs of the rollouts (unguided conditional policy)
    advantages: torch.Tensor       # (B,)

    def __post_init__(self):
        b = len(self.text_ids)
        lp, adv = tuple(self.old_logprobs.shape), tuple(self.advantages.shape)
        if any(c.shape[0] != b for c in self.codes) or lp[0] != b or adv != (b,):
            raise ValueError(f"batch: {b} prompts, but codes {[tuple(c.shape) for c in self.codes]}, "
                             f"old_logprobs {lp}, advantages {adv}")

    def __len__(self) -> int:
        return len(self.text_ids)

    def rows(self, lo: int, hi: int) -> "TrainBatch":
        return TrainBatch(self.text_ids[lo:hi], [c[lo:hi] for c in self.codes], self.old_logprobs[lo:hi],
                          self.advantages[lo:hi])


def micro_batches(batch: TrainBatch, size: int) -> list[TrainBatch]:
    """Contiguous micro-batches of `size` rows in order (the last one may be smaller)."""
    return [batch.rows(i, i + size) for i in range(0, len(batch), size)]


def split_rows(batch: TrainBatch, parts: int) -> list[TrainBatch]:
    """Contiguous, equal shards in order (rank r gets rows r*B/parts ... (r+1)*B/parts - 1)."""
    if len(batch) % parts:
        raise ValueError(f"batch: {len(batch)} rows do not split evenly into {parts} parts")
    n = len(batch) // parts
    return [batch.rows(i * n, (i + 1) * n) for i in range(parts)]


MAX_KEYS = ("ratio_max", "ratio_first_pass_max_abs_dev", "rollout_logp_max_abs_dev")


def reduce_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """Mean over records (ranks x passes x micro-batches) of each key; maxima for the *max* keys."""
    keys = sorted({k for r in records for k in r})
    out = {}
    for k in keys:
        vals = [r[k] for r in records if k in r]
        out[k] = max(vals) if k in MAX_KEYS else sum(vals) / len(vals)
    return out


def ema_start(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The running average's first value: fp32 copies (a bf16 average could not take steps of (1 - decay) x w)."""
    return {k: v.detach().to(torch.float32, copy=True) for k, v in state.items()}


@torch.no_grad()
def ema_update(average: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> None:
    """In place, every key: average <- decay * average + (1 - decay) * current (learner.ema: the exported policy
    is this running average of the weights after each optimiser step; it starts at the initial weights). `current`
    may be the live parameters on any device and dtype; the average keeps its own."""
    for k, v in current.items():
        average[k].mul_(decay).add_(v.to(average[k].device, average[k].dtype), alpha=1.0 - decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the module
class PrefixScorer(nn.Module):
    """What DeepSpeed wraps: the policy transformer (maybe with LoRA); forward = score_prefix over scales 1..m,
    of the conditional policy or (`guidance`, loss.score: guided) of the CFG-guided sampling distribution.

    The vq is held outside the module tree: frozen, never partitioned, cast or handed to the optimiser.
    """

    def __init__(self, model: nn.Module, vq: nn.Module, m: int, guidance: Guidance | None = None):
        super().__init__()
        self.model = model
        self.__dict__["vq"] = vq
        self.m, self.guidance = m, guidance

    def forward(self, text_ids: list[list[int]], codes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        s = score_prefix(self.model, self.vq, text_ids, codes, self.m, self.guidance)
        return s.logprobs, s.entropy                                           # (B, N_m) each


def loss_guidance(cfg: GRPOLossConfig, sample: SampleConfig | None, schedule: list, m: int) -> Guidance | None:
    """loss.score: guided -> the rollouts' per-token guidance (the rollouts then log guided old log-probs:
    policy.sampler.sample(logprobs="guided")); conditional -> None."""
    if cfg.score != "guided":
        return None
    if sample is None:
        raise ValueError("loss.score: guided scoring needs the rollouts' sampling settings (rollout.sample)")
    return guidance_of(sample, schedule, m)


def base_model(model: nn.Module) -> nn.Module:
    """The NextScaleLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def register_direct_params(scorer: PrefixScorer) -> None:
    """ZeRO-3: parameters that NextScaleLM uses outside their own module's forward (head rows, scale embedding)."""
    from deepspeed.runtime.zero import register_external_parameter

    lm = base_model(scorer.model)
    for p in (lm.lm_head.weight, lm.scale_embed.weight):
        register_external_parameter(scorer, p)


def learner_optimizer(module: nn.Module, cfg: LearnerConfig) -> torch.optim.AdamW:
    """The learner's AdamW (lr, betas, weight decay on dim >= 2 only): policy.optim.configure_optimizers."""
    return configure_optimizers(module, cfg.lr, cfg.betas, cfg.weight_decay)


# ------------------------------------------------------------------------------------------------ one micro-step
@dataclass
class Prefix:
    """Scales 1..m of a schedule, per token: k (N_m,) the scale weight k_s, scale_of_token (N_m,) the scale index."""
    m: int
    k: torch.Tensor
    scale_of_token: torch.Tensor


def prefix_of(schedule: list, m: int, alpha: float, device: torch.device | str | None = None) -> Prefix:
    sched = schedule[:m]
    scale_of_token = scale_index_per_token(sched)
    return Prefix(m, scale_weights(sched, alpha)[scale_of_token].to(device), scale_of_token.to(device))


@torch.no_grad()
def ref_logprobs(ref_scores: Scores, mb: TrainBatch, cfg: GRPOLossConfig) -> torch.Tensor | None:
    """(b, N_m) log-probs of the reference policy for the KL term; None when beta == 0 (no reference needed)."""
    return ref_scores(mb.text_ids, mb.codes)[0] if cfg.beta else None


@torch.no_grad()
def learner_old_logprobs(scores: Scores, mb: TrainBatch) -> tuple[TrainBatch, float]:
    """The micro-batch with its old log-probs recomputed by the learner (before any update), and max |exp(learner
    - rollout) - 1|: how far the rollouts' own log-probs were (a precision or kernel gap, logged, not corrected)."""
    old = scores(mb.text_ids, mb.codes)[0].float()
    gap = (old - mb.old_logprobs.to(old.device).float()).exp().sub(1).abs().max().item()
    return TrainBatch(mb.text_ids, mb.codes, old, mb.advantages), gap


def micro_step(scores: Scores, mb: TrainBatch, prefix: Prefix, cfg: GRPOLossConfig, ref: torch.Tensor | None = None,
               first_pass: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """The prefix-GRPO loss of one micro-batch (per-row mean) and its metrics: the loss terms, ratio statistics,
    per-scale log-prob and entropy; first_pass adds max |rho - 1| (old log-probs = the current policy's)."""
    logp, entropy = scores(mb.text_ids, mb.codes)                                   # (b, N_m) each
    dev = logp.device
    old, adv = mb.old_logprobs.to(dev).float(), mb.advantages.to(dev).float()
    loss, metrics = prefix_grpo_loss(logp, old, adv, prefix.k, cfg, ref)
    metrics["loss"] = loss.item()
    if first_pass:
        metrics["ratio_first_pass_max_abs_dev"] = (logp.detach() - old).exp().sub(1).abs().max().item()
    for name, x in (("logp", logp.detach()), ("entropy", entropy.detach())):
        for s, v in enumerate(per_scale_mean(x, prefix.scale_of_token, prefix.m).tolist()):
            metrics[f"{name}/scale{s + 1}"] = v
    return loss, metrics
