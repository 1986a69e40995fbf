"""Teacher-forced scoring: the learner's forward over `text + <boi> + scales 2..k` in one pass.

Because attention is block-causal, the logits of scales 1..m need only the inputs up to scale m: the cost grows
with the prefix, not with the image.

`score_prefix` scores the unguided conditional policy by default. With a `Guidance` it scores the distribution the
sampler draws from under classifier-free guidance, log_softmax((u + w_s (c - u)) / T_s) per token (u: the null
prompt's logits; w_s, T_s: the scale's guidance weight and temperature; top-k / top-p truncation is not scored).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.settings import SampleConfig
from policy.sampler import guidance_weights, guided_logits, per_scale
from policy.scales import scale_index_per_token
from policy.sequence import attention_mask, left_pad, position_ids, same_padding_rows
from policy.tokenizer import MultiScaleVQ
from policy.transformer import NextScaleLM


def teacher_forced_logits(
    model: NextScaleLM, vq: MultiScaleVQ, text_ids: list[list[int]], input_codes: list[torch.Tensor], k: int
) -> torch.Tensor:
    """Image logits (B, tokens of scales 1..k, V) given the input codes of scales 1..k-1 (at least)."""
    sched = model.schedule
    ids, tmask = left_pad(text_ids, model.cfg.pad_token_id)
    dev, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    ids, tmask = ids.to(dev), tmask.to(dev)
    b, t = ids.shape
    parts = [model.text_embeds(ids), model.boi_embeds(b)]
    for s in range(2, k + 1):
        feats = vq.scale_inputs(input_codes[s - 2].to(dev), sched[s - 1]).to(dtype)
        parts.append(model.image_embeds(feats, s))
    embeds, positions = torch.cat(parts, 1), position_ids(tmask, sched, k)
    groups = same_padding_rows(tmask)    # one forward per text length: its rows share one (1, 1, L, L) mask
    if len(groups) == 1:
        return model.image_logits(model(embeds, attention_mask(tmask, sched, k, dtype), positions)[:, t:])
    logits = [model.image_logits(model(embeds[rows], attention_mask(tmask[rows], sched, k, dtype),
                                       positions[:, rows])[:, t:]) for rows in groups]
    order = torch.cat(groups).argsort()
    return torch.cat(logits)[order.to(dev)]                                # <boi> onwards = scales 1..k


@dataclass
class PrefixScores:
    logprobs: torch.Tensor  # (B, N_m) log pi(code) per token of scales 1..m
    entropy: torch.Tensor   # (B, N_m) entropy of pi at each token


@dataclass
class Guidance:
    """Per token of scales 1..m: the guidance weight w_s and temperature T_s of its scale (the rollouts' settings)."""
    weight: torch.Tensor       # (N_m,)
    temperature: torch.Tensor  # (N_m,)

    def to(self, device) -> "Guidance":
        return Guidance(self.weight.to(device), self.temperature.to(device))


def guidance_of(cfg: SampleConfig, schedule: list, m: int) -> Guidance:
    """The sampler's per-scale w_s (guidance_weights) and temperature, spread over the tokens of scales 1..m."""
    temps = per_scale(cfg.temperature, len(schedule), "temperature")
    if cfg.greedy_within(m):
        raise ValueError("loss.score: guided scoring needs a temperature > 0 at scales 1..m (greedy has no log-prob)")
    scale = scale_index_per_token(schedule[:m])
    w = torch.tensor(guidance_weights(cfg.cfg_scale, cfg.guidance_schedule, len(schedule)))
    return Guidance(w[scale], torch.tensor(temps, dtype=torch.float32)[scale])


def guided_prefix_logits(model: NextScaleLM, vq: MultiScaleVQ, text_ids: list[list[int]],
                         codes: list[torch.Tensor], m: int, g: Guidance) -> torch.Tensor:
    """(B, N_m, V) (u + w (c - u)) / T: the conditional rows and the null prompt's (empty text) in one batch."""
    b = len(text_ids)
    both = teacher_forced_logits(model, vq, list(text_ids) + [[]] * b, [torch.cat([c, c]) for c in codes], m).float()
    cond, uncond = both[:b], both[b:]
    g = g.to(cond.device)
    return guided_logits(cond, uncond, g.weight[:, None]) / g.temperature[:, None]


def score_prefix(
    model: NextScaleLM, vq: MultiScaleVQ, text_ids: list[list[int]], codes: list[torch.Tensor], m: int,
    guidance: Guidance | None = None,
) -> PrefixScores:
    """Per-token log-probs of the codes of scales 1..m under the unguided conditional policy, or under the guided
    sampling distribution when `guidance` is given."""
    logits = (teacher_forced_logits(model, vq, text_ids, codes, m).float() if guidance is None
              else guided_prefix_logits(model, vq, text_ids, codes[:m], m, guidance))
    targets = torch.cat([c.flatten(1) for c in codes[:m]], dim=1).to(logits.device)
    logp_all = logits.log_softmax(-1)
    logprobs = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return PrefixScores(logprobs, entropy)
