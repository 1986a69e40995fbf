"""rl/update.py, the learner's pure update step, against an independent computation (no Ray, no DeepSpeed)."""
import math
import subprocess
import sys

import pytest
import torch

from policy.optim import configure_optimizers
from policy.scales import scale_index_per_token, scale_weights
from policy.scoring import teacher_forced_logits
from rl.config import GRPOLossConfig
from rl.strategy import LearnerConfig, micro_loss_scale, recomputes_old_logprobs
from rl.update import (PrefixScorer, TrainBatch, ema_start, ema_update, learner_old_logprobs, loss_guidance,
                       micro_batches, micro_step, prefix_of, ref_logprobs)
from tests.conftest import PROMPTS, tiny_model, tiny_vq

M, ALPHA = 3, 0.7


def _batch(vq, rows: int = 6, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    text = [PROMPTS[i % len(PROMPTS)] for i in range(rows)]
    codes = [torch.randint(0, vq.cfg.num_codes, (rows, h, w), generator=g) for h, w in vq.cfg.schedule]
    n = sum(h * w for h, w in vq.cfg.schedule[:M])
    old = -4 + 0.3 * torch.randn(rows, n, generator=g)                  # not the policy's: ratios away from 1
    return TrainBatch(text, codes, old, torch.randn(rows, generator=g))


def _by_hand(model, vq, batch: TrainBatch, cfg: GRPOLossConfig, ref: torch.Tensor | None):
    """The prefix-GRPO loss written out from DESIGN.md, without rl.grpo or policy.scoring.score_prefix."""
    logits = teacher_forced_logits(model, vq, batch.text_ids, batch.codes, M).float()
    targets = torch.cat([c.flatten(1) for c in batch.codes[:M]], 1)
    logp = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)          # (B, N)
    sched = model.schedule[:M]
    k = scale_weights(sched, ALPHA)[scale_index_per_token(sched)]
    rho, a = (logp - batch.old_logprobs).exp(), batch.advantages[:, None]
    surrogate = torch.minimum(rho * a, rho.clamp(1 - cfg.eps_lo, 1 + cfg.eps_hi) * a)
    loss = -(surrogate * k).sum() / (k.sum() * len(batch))
    if cfg.beta:
        d = ref - logp
        loss = loss + cfg.beta * ((d.exp() - d - 1) * k).sum() / (k.sum() * len(batch))
    return loss, logp, rho


def test_micro_step_matches_the_loss_written_out():
    model, vq, cfg = tiny_model(), tiny_vq(), GRPOLossConfig(beta=0.05, eps_lo=0.2, eps_hi=0.28)
    batch, other = _batch(vq), tiny_model(seed=1)
    ref = ref_logprobs(PrefixScorer(other, vq, M), batch, cfg)
    assert not ref.requires_grad
    loss, metrics = micro_step(PrefixScorer(model, vq, M), batch, prefix_of(model.schedule, M, ALPHA), cfg, ref,
                               first_pass=True)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    want, logp, rho = _by_hand(model, vq, batch, cfg, ref)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-7) and metrics["loss"] == loss.item()
    assert all(torch.allclose(g, w, rtol=1e-4, atol=1e-6) for g, w in zip(grads, want_grads))
    rho = rho.detach()
    assert metrics["ratio_max"] == pytest.approx(rho.max().item(), rel=1e-5)
    assert metrics["ratio_first_pass_max_abs_dev"] == pytest.approx((rho - 1).abs().max().item(), rel=1e-5)
    assert metrics["kl_ref"] > 0 and 0 <= metrics["clip_frac_low"] <= 1 and 0 <= metrics["clip_frac_high"] <= 1
    n1 = vq.cfg.schedule[0][0] * vq.cfg.schedule[0][1]
    assert metrics["logp/scale1"] == pytest.approx(logp[:, :n1].mean().item(), rel=1e-5)
    assert {f"entropy/scale{s}" for s in range(1, M + 1)} <= set(metrics)


def test_micro_step_first_pass_on_own_logprobs_and_no_reference():
    model, vq, cfg = tiny_model(), tiny_vq(), GRPOLossConfig()
    scorer, batch = PrefixScorer(model, vq, M), _batch(vq)
    assert ref_logprobs(scorer, batch, cfg) is None                              # beta 0: no reference forward
    with torch.no_grad():
        own = TrainBatch(batch.text_ids, batch.codes, scorer(batch.text_ids, batch.codes)[0], batch.advantages)
    _, metrics = micro_step(scorer, own, prefix_of(model.schedule, M, ALPHA), cfg, first_pass=True)
    assert metrics["ratio_first_pass_max_abs_dev"] <= 1e-5 and "kl_ref" not in metrics
    _, later = micro_step(scorer, own, prefix_of(model.schedule, M, ALPHA), cfg)
    assert "ratio_first_pass_max_abs_dev" not in later
    with pytest.raises(ValueError, match="reference log-probs"):
        micro_step(scorer, own, prefix_of(model.schedule, M, ALPHA), GRPOLossConfig(beta=0.1))


def test_micro_batches_with_loss_scale_give_the_full_batch_gradient():
    """What a rank does (micro-batches of 4 + 2 rows, each loss x micro_loss_scale / gas) = one full-batch step."""
    model, vq, cfg = tiny_model(), tiny_vq(), GRPOLossConfig()
    scorer, batch, prefix = PrefixScorer(model, vq, M), _batch(vq), prefix_of(model.schedule, M, ALPHA)
    full = torch.autograd.grad(micro_step(scorer, batch, prefix, cfg)[0], list(model.parameters()))
    micro = micro_batches(batch, 4)
    acc = [torch.zeros_like(p) for p in model.parameters()]
    for mb in micro:
        loss, _ = micro_step(scorer, mb, prefix, cfg)
        scaled = loss * micro_loss_scale(len(mb), len(batch), len(micro)) / len(micro)   # DeepSpeed divides by gas
        for a, g in zip(acc, torch.autograd.grad(scaled, list(model.parameters()))):
            a += g
    assert all(torch.allclose(a, f, rtol=1e-4, atol=1e-6) for a, f in zip(acc, full))


def test_configure_optimizers_is_the_learners_rule():
    """Decay on dim >= 2 only, frozen parameters left out; one step bit-identical to the learner's former AdamW."""
    a, b = tiny_model(), tiny_model()
    for m in (a, b):
        m.lm_head.requires_grad_(False)
    opt = configure_optimizers(a, 1e-3, (0.9, 0.95), 0.05)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.9, 0.95)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in a.parameters())
    params = [p for p in b.parameters() if p.requires_grad]                        # rl/learner.py's adamw, verbatim
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    old = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-3, betas=(0.9, 0.95))
    vq = tiny_vq()
    batch = _batch(vq)
    for model, o in ((a, opt), (b, old)):
        for _ in range(2):
            loss, _ = micro_step(PrefixScorer(model, vq, M), batch, prefix_of(model.schedule, M, ALPHA),
                                 GRPOLossConfig())
            o.zero_grad()
            loss.backward()
            o.step()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_ema_update_hand_worked_and_closed_form():
    avg = {"w": torch.tensor([1.0, 2.0])}
    ema_update(avg, {"w": torch.tensor([3.0, 6.0])}, 0.75)
    assert torch.equal(avg["w"], torch.tensor([1.5, 3.0]))              # 0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6
    # bf16 weights: the average starts as an fp32 copy and stays fp32, so small steps are not rounded away
    w = torch.full((3,), 1.0, dtype=torch.bfloat16)
    avg = ema_start({"w": w})
    assert avg["w"].dtype == torch.float32 and avg["w"].data_ptr() != w.data_ptr()
    ema_update(avg, {"w": torch.full((3,), 1.0 + 2 ** -7, dtype=torch.bfloat16)}, 0.99)
    assert torch.allclose(avg["w"], torch.full((3,), 1.0 + 0.01 * 2 ** -7), atol=1e-9)   # bf16 would stay at 1.0
    # after T updates: d^T w0 + sum_t (1 - d) d^(T - t) w_t, written out independently
    g = torch.Generator().manual_seed(0)
    ws, d = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(6)], 0.9
    avg = {"w": ws[0].clone()}
    for w in ws[1:]:
        ema_update(avg, {"w": w}, d)
    T = len(ws) - 1
    closed = d ** T * ws[0] + sum((1 - d) * d ** (T - t) * ws[t] for t in range(1, T + 1))
    assert torch.allclose(avg["w"], closed, atol=1e-12)


def test_update_imports_no_ray():
    code = "import sys, rl.update; assert 'ray' not in sys.modules and 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_learner_old_logprobs_replace_the_rollouts_and_report_their_distance():
    batch = TrainBatch([[1], [2]], [torch.zeros(2, 1, 1, dtype=torch.long)], torch.tensor([[-1.0, -2.0], [-0.5, -3.0]]),
                       torch.tensor([1.0, -1.0]))
    learner = torch.tensor([[-1.1, -2.0], [-0.5, -2.5]])
    out, gap = learner_old_logprobs(lambda text, codes: (learner, None), batch)
    assert torch.equal(out.old_logprobs, learner) and out.text_ids == batch.text_ids
    assert torch.equal(out.advantages, batch.advantages) and out.codes is batch.codes
    assert gap == pytest.approx(max(abs(math.exp(-0.1) - 1), abs(math.exp(0.5) - 1)))  # the 0.5 (row 2, token 2)
    cfg = LearnerConfig()
    assert not recomputes_old_logprobs(cfg) and recomputes_old_logprobs(cfg.model_copy(update={"use_gpu": True}))
    assert recomputes_old_logprobs(cfg.model_copy(update={"precision": "bf16"}))
    assert not recomputes_old_logprobs(cfg.model_copy(update={"precision": "bf16", "recompute_old_logprobs": False}))


def test_loss_guidance_and_a_guided_first_pass():
    """loss.score: conditional -> no guidance; guided -> the rollouts' guidance_of (a one-line error without their
    settings). A guided scorer's first pass on learner-recomputed old log-probs has ratio 1, and its log-probs are
    the guided ones, not the conditional ones."""
    from core.settings import SampleConfig
    from policy.scoring import guidance_of

    model, vq = tiny_model(), tiny_vq()
    sample_cfg = SampleConfig(cfg_scale=3.0, guidance_schedule="linear")
    assert loss_guidance(GRPOLossConfig(), sample_cfg, model.schedule, M) is None
    g = loss_guidance(GRPOLossConfig(score="guided"), sample_cfg, model.schedule, M)
    assert torch.equal(g.weight, guidance_of(sample_cfg, model.schedule, M).weight)
    with pytest.raises(ValueError, match="^loss.score: "):
        loss_guidance(GRPOLossConfig(score="guided"), None, model.schedule, M)
    scorer, batch = PrefixScorer(model, vq, M, g), _batch(vq)
    own, _ = learner_old_logprobs(scorer, batch)
    _, metrics = micro_step(scorer, own, prefix_of(model.schedule, M, ALPHA), GRPOLossConfig(), first_pass=True)
    assert metrics["ratio_first_pass_max_abs_dev"] <= 1e-5
    with torch.no_grad():
        conditional = PrefixScorer(model, vq, M)(batch.text_ids, batch.codes)[0]
    assert (conditional - own.old_logprobs).abs().max() > 1e-3
