import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from policy.sampler import (
    SampleConfig, filter_logits, guidance_weights, guided_logits, inverse_cdf, sample, sample_raster, sample_scale,
)
from policy.scales import prefix_tokens
from policy.scoring import guidance_of, score_prefix
from tests.conftest import PROMPTS, SCHED

CFG = SampleConfig(cfg_scale=3.0, guidance_schedule="linear", top_k=20, top_p=0.9, temperature=1.0)


def test_old_logprobs_equal_teacher_forced(model, vq):
    m = 4
    out = sample(model, vq, PROMPTS, [11, 12, 13], CFG, m=m)
    assert out.logprobs.shape == (3, prefix_tokens(SCHED, m))
    with torch.no_grad():
        scores = score_prefix(model, vq, PROMPTS, out.codes, m)
    assert (scores.logprobs - out.logprobs).abs().max() <= 1e-4
    assert scores.entropy.shape == out.logprobs.shape and (scores.entropy >= 0).all()


def test_guided_scores_equal_the_samplers_guided_logprobs(model, vq, monkeypatch):
    """loss.score: guided scores log_softmax((u + w_s (c - u)) / T_s) of each code, checked against the sampler's
    own KV-cached forward (the logits sample_scale draws from, recorded by a spy); with w = 1 and T = 1 it is the
    conditional score."""
    import policy.sampler as sampler

    m, seen, draw = 4, [], sampler.sample_scale

    def spy(cond, uncond, w, temperature, top_k, top_p, u, logprobs="conditional"):
        codes, logp = draw(cond, uncond, w, temperature, top_k, top_p, u, logprobs)
        guided = guided_logits(cond.float(), uncond.float(), w) / temperature
        seen.append(guided.log_softmax(-1).gather(-1, codes[..., None]).squeeze(-1))
        return codes, logp

    monkeypatch.setattr(sampler, "sample_scale", spy)
    cfg = SampleConfig(cfg_scale=3.0, guidance_schedule="linear", temperature=[1.0, 0.9, 1.2, 1.0, 0.8, 1.0])
    out = sample(model, vq, PROMPTS, [21, 22, 23], cfg, m=m)
    with torch.no_grad():
        guided = score_prefix(model, vq, PROMPTS, out.codes, m, guidance_of(cfg, SCHED, m))
    assert (guided.logprobs - torch.cat(seen[:m], dim=1)).abs().max() <= 1e-4
    assert (guided.logprobs - out.logprobs).abs().max() > 1e-2            # not the conditional log-probs
    with torch.no_grad():
        plain = score_prefix(model, vq, PROMPTS, out.codes, m, guidance_of(SampleConfig(), SCHED, m))
    assert (plain.logprobs - out.logprobs).abs().max() <= 1e-4
    logged = sample(model, vq, PROMPTS, [21, 22, 23], cfg, m=m, logprobs="guided")      # what rollouts log for it
    assert all(torch.equal(a, b) for a, b in zip(logged.codes, out.codes))
    assert (guided.logprobs - logged.logprobs).abs().max() <= 1e-4
    forced = sample(model, vq, PROMPTS, [21, 22, 23], cfg, m=m, logprobs="guided", prefix_codes=out.codes[:m])
    assert (forced.logprobs - logged.logprobs).abs().max() <= 1e-5                      # VMR's continuations
    greedy_fine = SampleConfig(cfg_scale=3.0, temperature=[1.0] * m + [0.0] * (len(SCHED) - m))  # unscored: fine
    fine = sample(model, vq, PROMPTS, [1, 2, 3], greedy_fine, m=m, logprobs="guided")
    assert fine.logprobs.shape == out.logprobs.shape


def test_guidance_of_hand_worked():
    """Per token: w_s and T_s of its scale (linear w 3 over 6 scales: 1, 1.4, ...); greedy is refused."""
    g = guidance_of(SampleConfig(cfg_scale=3.0, guidance_schedule="linear", temperature=[1.0, 0.5] + [1.0] * 4),
                    SCHED, 2)
    n1, n2 = SCHED[0][0] * SCHED[0][1], SCHED[1][0] * SCHED[1][1]
    assert g.weight.tolist() == pytest.approx([1.0] * n1 + [1.4] * n2)
    assert g.temperature.tolist() == [1.0] * n1 + [0.5] * n2
    with pytest.raises(ValueError, match="^loss.score: "):
        guidance_of(SampleConfig(temperature=0.0), SCHED, 2)


def test_kv_cache_matches_recompute(model, vq):
    a = sample(model, vq, PROMPTS, [1, 2, 3], CFG, m=6, decode=False)
    b = sample(model, vq, PROMPTS, [1, 2, 3], CFG, m=6, use_cache=False, decode=False)
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes))
    assert (a.logprobs - b.logprobs).abs().max() < 1e-4


def test_per_sample_seeds_independent_of_batch(model, vq):
    full = sample(model, vq, PROMPTS, [5, 6, 7], CFG, m=6)
    alone = sample(model, vq, [PROMPTS[2]], [7], CFG, m=6)
    assert all(torch.equal(x[2:], y) for x, y in zip(full.codes, alone.codes))
    assert (full.images[2:] - alone.images).abs().max() < 1e-4
    again = sample(model, vq, PROMPTS, [5, 6, 99], CFG, m=6)
    assert all(torch.equal(x[:2], y[:2]) for x, y in zip(full.codes, again.codes))
    assert any(not torch.equal(x[2], y[2]) for x, y in zip(full.codes, again.codes))


def test_outputs_shapes_and_range(model, vq):
    out = sample(model, vq, PROMPTS[:2], [0, 1], SampleConfig(top_k=[0, 0, 5, 5, 5, 5], temperature=[1.0] * 6))
    assert [tuple(c.shape) for c in out.codes] == [(2, h, w) for h, w in SCHED]
    assert out.images.shape == (2, 3, 64, 64) and 0 <= out.images.min() and out.images.max() <= 1
    assert all(int(c.max()) < 64 for c in out.codes)


def test_greedy_sampling_is_argmax_of_guided(model, vq):
    cfg = SampleConfig(cfg_scale=2.0, temperature=0.0)
    out = sample(model, vq, PROMPTS, [0, 0, 0], cfg, m=1)
    out2 = sample(model, vq, PROMPTS, [9, 8, 7], cfg, m=1)
    assert all(torch.equal(x, y) for x, y in zip(out.codes, out2.codes))


def test_filter_logits_matches_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    for k, p in [(5, 1.0), (0, 0.8), (10, 0.5), (50, 0.95)]:
        ref = logits.clone()
        if k:
            ref = TopKLogitsWarper(top_k=k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(top_p=p)(None, ref)
        ours = filter_logits(logits, k, p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (k, p)


def test_filter_logits_hand_worked():
    # probs 0.5, 0.3, 0.2: top_p 0.6 keeps the first two, top_p 0.5 keeps only the first
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isinf(filter_logits(logits, 0, 0.6)).tolist() == [[False, False, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [[False, True, True]]
    assert torch.isinf(filter_logits(logits, 1, 1.0)).tolist() == [[False, True, True]]


def test_inverse_cdf_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    idx = inverse_cdf(probs.expand(len(u), -1), u)
    freq = torch.bincount(idx, minlength=4).float() / len(u)
    assert freq[1] == 0 and (freq - probs).abs().max() < 0.01
    assert inverse_cdf(torch.tensor([[0.0, 1.0]]), torch.tensor([0.0])).item() == 1


def test_guidance_hand_worked():
    assert guidance_weights(5.0, "constant", 3) == [5.0, 5.0, 5.0]
    assert guidance_weights(5.0, "linear", 3) == [1.0, 3.0, 5.0]
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert guided_logits(c, u, 3.0).item() == 4.0 and guided_logits(c, None, 3.0).item() == 2.0


def test_sample_scale_logprob_is_unguided_conditional_or_guided():
    cond = torch.tensor([[[2.0, 0.0, 0.0]]])
    uncond = torch.tensor([[[0.0, 0.0, 5.0]]])
    code, logp = sample_scale(cond, uncond, 3.0, 0.0, 0, 1.0, None)  # greedy on guided = [6, 0, -10]
    assert code.item() == 0
    assert torch.allclose(logp, cond.log_softmax(-1)[..., 0])
    with pytest.raises(ValueError, match="^logprobs: "):
        sample_scale(cond, uncond, 3.0, 0.0, 0, 1.0, None, "guided")
    u = torch.tensor([[0.0]])                                         # the first code of the (top-k 2) support
    code, logp = sample_scale(cond, uncond, 3.0, 2.0, 2, 1.0, u, "guided")
    assert code.item() == 0                                           # guided / T = [3, 0, -5], untruncated:
    assert logp.item() == pytest.approx(3 - math.log(math.exp(3) + 1 + math.exp(-5)))


def test_raster_sampler(model, vq):
    codes = sample_raster(model, vq, PROMPTS[:2], [0, 1], CFG, decode=False)
    assert codes.shape == (2, 8, 8) and int(codes.max()) < 64
    imgs = sample_raster(model, vq, PROMPTS[:1], [0], SampleConfig())
    assert imgs.shape == (1, 3, 64, 64)


def test_prefix_of_all_scales_reproduces_the_images(model, vq):
    out = sample(model, vq, PROMPTS, [21, 22, 23], CFG, m=4)
    forced = sample(model, vq, PROMPTS, [7, 8, 9], CFG, m=4, prefix_codes=out.codes)  # other seeds: no effect
    assert all(torch.equal(x, y) for x, y in zip(out.codes, forced.codes))
    assert torch.equal(out.images, forced.images)
    assert (out.logprobs - forced.logprobs).abs().max() <= 1e-5  # log-probs of the given codes


def test_prefix_with_the_rollouts_seed_reproduces_the_rollout(model, vq):
    out = sample(model, vq, PROMPTS, [31, 32, 33], CFG, m=3)
    for j in (1, 3, 5):
        again = sample(model, vq, PROMPTS, [31, 32, 33], CFG, m=3, prefix_codes=out.codes[:j])
        assert all(torch.equal(x, y) for x, y in zip(out.codes, again.codes))
        assert torch.equal(out.images, again.images)


def test_prefix_continuations_keep_the_prefix_and_vary_after_it(model, vq):
    out = sample(model, vq, PROMPTS, [41, 42, 43], CFG, m=3)
    other = sample(model, vq, PROMPTS, [1041, 1042, 1043], CFG, m=3, prefix_codes=out.codes[:3])
    assert all(torch.equal(x, y) for x, y in zip(out.codes[:3], other.codes[:3]))
    assert any(not torch.equal(x, y) for x, y in zip(out.codes[3:], other.codes[3:]))
    # a continuation equals teacher forcing without a KV cache (the whole prefix recomputed)
    nocache = sample(model, vq, PROMPTS, [1041, 1042, 1043], CFG, m=3, prefix_codes=out.codes[:3], use_cache=False)
    assert all(torch.equal(x, y) for x, y in zip(other.codes, nocache.codes))


def test_prefix_codes_are_checked(model, vq):
    out = sample(model, vq, PROMPTS, [1, 2, 3], CFG, decode=False)
    with pytest.raises(ValueError, match=r"prefix_codes\[0\]"):
        sample(model, vq, PROMPTS[:2], [1, 2], CFG, prefix_codes=out.codes[:2])
    with pytest.raises(ValueError, match="prefix_codes: 7 scales"):
        sample(model, vq, PROMPTS, [1, 2, 3], CFG, prefix_codes=out.codes + out.codes[:1])
