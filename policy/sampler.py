"""Sampling: the KV-cached next-scale sampler (one forward per scale) and a raster-scan baseline.

The per-scale math is pure (`guided_logits`, `filter_logits`, `sample_scale`); `sample` only moves tensors
between the transformer, the tokenizer and a DynamicCache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from core.settings import SampleConfig  # noqa: F401  (re-exported)
from policy.sequence import attention_mask, block_ranges, left_pad, mask_from_groups, position_ids
from policy.tokenizer import MultiScaleVQ
from policy.transformer import NextScaleLM


def per_scale(value, num_scales: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != num_scales:
            raise ValueError(f"{name}: {len(value)} values for {num_scales} scales")
        return value
    return [value] * num_scales


def guidance_weights(cfg_scale: float, schedule: str, num_scales: int) -> list[float]:
    """w_s per scale: constant w, or linear from 1 (no guidance) at scale 1 to w at the last scale."""
    if schedule == "constant" or num_scales == 1:
        return [cfg_scale] * num_scales
    return [1 + (cfg_scale - 1) * s / (num_scales - 1) for s in range(num_scales)]


# --------------------------------------------------------------------------------------- pure sampling steps
def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, w: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + w (cond - uncond)."""
    return cond if uncond is None else uncond + w * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top_k largest logits and the smallest nucleus of mass >= top_p; others -> -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass strictly before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of probs (..., V) from uniforms u (...) in [0, 1)."""
    cdf = probs.cumsum(-1)
    target = (u.clamp_min(1e-12) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def code_logprobs(cond: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """log pi(code) under the unguided conditional policy: (B, n, V) logits, (B, n) codes -> (B, n)."""
    return cond.float().log_softmax(-1).gather(-1, codes[..., None]).squeeze(-1)


def sample_scale(cond, uncond, w, temperature, top_k, top_p, u, logprobs: str | None = "conditional"):
    """One scale: (B, n, V) logits -> codes (B, n) and their log-prob (scale_logprobs; None for logprobs=None)."""
    logits = guided_logits(cond.float(), uncond, w)  # fp32 (uncond promotes)
    if temperature <= 0:
        codes = logits.argmax(-1)
    else:
        codes = inverse_cdf(filter_logits(logits / temperature, top_k, top_p).softmax(-1), u)
    return codes, scale_logprobs(cond, logits, temperature, codes, logprobs)


def scale_logprobs(cond, guided, temperature, codes, logprobs: str | None) -> torch.Tensor | None:
    """The log-probs a rollout logs: of the unguided conditional policy (`cond` logits), or ("guided") of the
    distribution the codes are drawn from before top-k/top-p, `guided` / T with guided = uncond + w (cond - uncond):
    what loss.score: guided scores."""
    if logprobs is None:
        return None
    if logprobs == "conditional":
        return code_logprobs(cond, codes)
    if temperature <= 0:
        raise ValueError("logprobs: guided log-probs need a temperature > 0 (greedy has no log-prob)")
    return code_logprobs(guided / temperature, codes)


# --------------------------------------------------------------------------------------- next-scale sampler
@dataclass
class SampleOutput:
    codes: list[torch.Tensor]   # per scale (B, h_s, w_s) long
    images: torch.Tensor | None  # (B, 3, P, P) in [0, 1]
    logprobs: torch.Tensor      # (B, tokens of scales 1..m) old log-probs: conditional policy, or guided on request


def _scale_settings(cfg: SampleConfig, num_scales: int) -> list[tuple[float, float, int, float]]:
    """(w, temperature, top_k, top_p) of each scale."""
    return list(zip(guidance_weights(cfg.cfg_scale, cfg.guidance_schedule, num_scales),
                    per_scale(cfg.temperature, num_scales, "temperature"),
                    per_scale(cfg.top_k, num_scales, "top_k"), per_scale(cfg.top_p, num_scales, "top_p")))


def _check_prefix(prefix_codes: list[torch.Tensor], sched, b: int) -> None:
    if len(prefix_codes) > len(sched):
        raise ValueError(f"prefix_codes: {len(prefix_codes)} scales for a schedule of {len(sched)}")
    for s, (c, (h, w)) in enumerate(zip(prefix_codes, sched)):
        if tuple(c.shape) != (b, h, w):
            raise ValueError(f"prefix_codes[{s}]: shape {tuple(c.shape)}, expected {(b, h, w)}")


def _scale_codes(cond, uncond, setting, u, forced: torch.Tensor | None, logprobs: str | None):
    """One scale's codes and log-probs: the given (teacher-forced) codes, or a sample."""
    if forced is None:
        return sample_scale(cond, uncond, *setting, u, logprobs)
    code = forced.to(cond.device, torch.long).reshape(cond.shape[0], -1)
    w, temperature = setting[:2]
    guided = guided_logits(cond.float(), uncond, w)
    return code, scale_logprobs(cond, guided, temperature, code, logprobs)


def _text_batch(model: NextScaleLM, text_ids: list[list[int]], guided: bool):
    rows = list(text_ids) + ([[]] * len(text_ids) if guided else [])  # null prompt = empty text
    ids, tmask = left_pad(rows, model.cfg.pad_token_id)
    dev = model.lm_head.weight.device
    return ids.to(dev), tmask.to(dev)


@torch.no_grad()
def sample(
    model: NextScaleLM,
    vq: MultiScaleVQ,
    text_ids: list[list[int]],
    seeds: list[int],
    cfg: SampleConfig = SampleConfig(),
    m: int | None = None,
    use_cache: bool = True,
    decode: bool = True,
    prefix_codes: list[torch.Tensor] | None = None,
    logprobs: str = "conditional",
) -> SampleOutput:
    """Sample all S scales for each prompt; per-sample seeds make each image independent of its batch.

    `prefix_codes` (per scale (B, h_s, w_s), scales 1..j): teacher-force those scales (their codes are fed, not
    sampled; log-probs are of the given codes) and sample scales j+1..S. A forced scale still draws its uniforms,
    so a continuation with the seed that sampled the prefix reproduces that sample exactly. `logprobs`: of the
    unguided "conditional" policy, or of the "guided" one the codes are drawn from (scale_logprobs).
    """
    sched = model.schedule
    num_scales, b = len(sched), len(text_ids)
    m = num_scales if m is None else m
    settings = _scale_settings(cfg, num_scales)
    forced = list(prefix_codes or [])
    _check_prefix(forced, sched, b)
    guided = cfg.cfg_scale != 1.0
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    ids, tmask = _text_batch(model, text_ids, guided)
    t = ids.shape[1]
    dtype = model.lm_head.weight.dtype
    mask = attention_mask(tmask, sched, num_scales, dtype)
    pos = position_ids(tmask, sched, num_scales)
    blocks = block_ranges(t, sched, num_scales)
    cache = DynamicCache(config=model.text_config) if use_cache else None

    embeds = torch.cat([model.text_embeds(ids), model.boi_embeds(ids.shape[0])], dim=1)
    hidden = model(embeds, mask[..., : t + 1, : t + 1], pos[..., : t + 1], cache)[:, t:]
    codes, logps, scored = [], [], [logprobs] * m + [None] * (num_scales - m)  # log-probs of scales 1..m only
    for s, (h, w) in enumerate(sched):
        logits = model.image_logits(hidden)                                         # (R, n_s, V)
        cond, uncond = (logits[:b], logits[b:]) if guided else (logits, None)
        u = torch.stack([torch.rand(h * w, generator=g) for g in gens]).to(logits.device)
        code, logp = _scale_codes(cond, uncond, settings[s], u, forced[s] if s < len(forced) else None, scored[s])
        codes.append(code.view(b, h, w))
        logps += [logp] if s < m else []
        if s + 1 == num_scales:
            break
        feats = vq.scale_inputs(codes[-1], sched[s + 1]).to(dtype)                  # (B, n_{s+1}, C)
        new = model.image_embeds(feats, s + 2)
        new = torch.cat([new, new]) if guided else new
        start, end = blocks[s + 1]
        if use_cache:
            hidden = model(new, mask[..., start:end, :end], pos[..., start:end], cache)
        else:  # recompute the whole prefix (the baseline the KV cache is measured against)
            embeds = torch.cat([embeds, new], dim=1)
            hidden = model(embeds, mask[..., :end, :end], pos[..., :end])[:, start:end]
    images = vq.decode(codes) if decode else None
    return SampleOutput(codes, images, torch.cat(logps, dim=1))


# --------------------------------------------------------------------------------------- raster-scan baseline
@torch.no_grad()
def sample_raster(
    model: NextScaleLM, vq: MultiScaleVQ, text_ids: list[list[int]], seeds: list[int],
    cfg: SampleConfig = SampleConfig(), decode: bool = True,
) -> torch.Tensor:
    """Token-by-token raster-scan sampling of the final grid with the same backbone (benchmark baseline).

    Returns the final-scale codes (B, H, W) (decoded to images when `decode`).
    """
    big_h, big_w = model.schedule[-1]
    n, b = big_h * big_w, len(text_ids)
    guided = cfg.cfg_scale != 1.0
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    ids, tmask = _text_batch(model, text_ids, guided)
    t = ids.shape[1]
    dtype = model.lm_head.weight.dtype
    mask = mask_from_groups(tmask, torch.arange(t + n, device=ids.device), dtype)           # plain causal
    p = (tmask.long().cumsum(1) - 1).clamp(min=0)
    base = tmask.sum(1, keepdim=True)
    pos = torch.cat([p, base + torch.arange(n, device=ids.device)[None]], 1).float()[None].expand(3, -1, -1)
    cache = DynamicCache(config=model.text_config)
    embeds = torch.cat([model.text_embeds(ids), model.boi_embeds(ids.shape[0])], dim=1)
    hidden = model(embeds, mask[..., : t + 1, : t + 1], pos[..., : t + 1], cache)[:, -1:]
    codes = []
    last = len(model.schedule)
    temp = per_scale(cfg.temperature, last, "temperature")[-1]
    top_k = per_scale(cfg.top_k, last, "top_k")[-1]
    top_p = per_scale(cfg.top_p, last, "top_p")[-1]
    for i in range(n):
        logits = model.image_logits(hidden)
        cond, uncond = (logits[:b], logits[b:]) if guided else (logits, None)
        u = torch.stack([torch.rand(1, generator=g) for g in gens]).to(logits.device)
        code, _ = sample_scale(cond, uncond, cfg.cfg_scale, temp, top_k, top_p, u)
        codes.append(code)
        if i + 1 == n:
            break
        feats = vq.lookup(code.view(b, 1, 1)).flatten(2).transpose(1, 2).to(dtype)           # (B, 1, C)
        new = model.image_embeds(feats, last)
        new = torch.cat([new, new]) if guided else new
        q = t + 1 + i
        hidden = model(new, mask[..., q : q + 1, : q + 1], pos[..., q : q + 1], cache)
    grid = torch.cat(codes, dim=1).view(b, big_h, big_w)
    return vq.decoder(vq.phi(vq.lookup(grid))).clamp(0, 1) if decode else grid
