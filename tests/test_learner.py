"""The learner: pure parts (weights, DeepSpeed config) without Ray; then real Ray actors with real DeepSpeed engines
(gloo on CPU) training a tiny policy on a batch whose old log-probs come from the CFG sampler."""
import math

import pytest
import ray
import torch
from pydantic import ValidationError

from core.config import format_validation_error
from policy.io import Policy, PolicyConfig, build_policy
from policy.sampler import SampleConfig, sample
from policy.scoring import guidance_of, score_prefix
from rl.config import GRPOLossConfig
from rl.grpo import group_advantages
from policy.weights import (
    LoraSettings, apply_lora, export_policy, has_lora, load_trainable_state, state_bytes, trainable_state,
)
from rl.learner import LearnerGroup
from rl.strategy import LearnerConfig, deepspeed_config, merge_dicts, micro_loss_scale
from rl.update import (
    PrefixScorer, TrainBatch, micro_batches, micro_step, prefix_of, reduce_metrics, ref_logprobs, split_rows,
)
from tests.conftest import PROMPTS, tiny_model, tiny_vq

M = 3  # prefix scales (1 + 4 + 9 = 14 tokens)
TINY_POLICY = PolicyConfig(vq=dict(channels=[8, 8, 8], code_dim=8, num_codes=32),
                           backbone=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
CAPTIONS = ["a red circle", "two blue squares below a green triangle"]
G = 2


# ================================================================================= pure: policy/weights.py
def _logits(model, vq):
    with torch.no_grad():
        return score_prefix(model, vq, PROMPTS, _codes(vq), 4)


def _codes(vq):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vq.cfg.num_codes, (len(PROMPTS), h, w), generator=g) for h, w in vq.cfg.schedule]


def test_trainable_state_full_roundtrip():
    a, b, vq = tiny_model(seed=0), tiny_model(seed=1), tiny_vq()
    state = trainable_state(a)
    assert set(state) == set(a.state_dict()) and all(t.device.type == "cpu" for t in state.values())
    assert state_bytes(state) == sum(p.numel() * 4 for p in a.state_dict().values())
    load_trainable_state(b, state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(_logits(a, vq).logprobs, _logits(b, vq).logprobs)
    state["lm_head.weight"].zero_()  # a copy: the source model is untouched
    assert a.lm_head.weight.abs().sum() > 0


def test_load_trainable_state_is_strict_and_atomic():
    model = tiny_model()
    good = trainable_state(tiny_model(seed=1))
    before = trainable_state(model)
    missing = dict(good)
    del missing["in_proj.bias"]
    with pytest.raises(ValueError, match="missing tensor in_proj.bias"):
        load_trainable_state(model, missing)
    with pytest.raises(ValueError, match="unexpected tensor extra.weight"):
        load_trainable_state(model, good | {"extra.weight": torch.zeros(1)})
    bad = good | {"scale_embed.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"tensor scale_embed.weight has shape \(3, 3\)"):
        load_trainable_state(model, bad)
    assert all(torch.equal(before[k], v) for k, v in trainable_state(model).items())  # nothing half-loaded


def test_lora_adapters_only_identity_at_init_and_transfer():
    vq, settings = tiny_vq(), LoraSettings(r=2, alpha=4)
    base = _logits(tiny_model(), vq)
    lm = apply_lora(tiny_model(), settings)
    assert has_lora(lm) and not has_lora(tiny_model())
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    state = trainable_state(lm)
    assert set(state) == trainable and all("lora_" in k for k in state) and len(state) == 2 * 7 * 2  # A,B x 7 x layers
    assert (_logits(lm, vq).logprobs - base.logprobs).abs().max() < 1e-5          # lora_B = 0: identity
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    other = apply_lora(tiny_model(), settings)
    load_trainable_state(other, trainable_state(lm))
    assert torch.equal(_logits(other, vq).logprobs, _logits(lm, vq).logprobs)
    assert (_logits(other, vq).logprobs - base.logprobs).abs().max() > 1e-3
    with other.disable_adapter():
        assert (_logits(other, vq).logprobs - base.logprobs).abs().max() < 1e-5
    with pytest.raises(ValueError, match="missing tensor base_model.model.backbone"):
        load_trainable_state(other, trainable_state(tiny_model()))


def test_export_policy_writes_a_plain_policy(tmp_path):
    settings = LoraSettings(r=1, alpha=2)
    trained = apply_lora(build_policy(TINY_POLICY).model, settings)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    policy = build_policy(TINY_POLICY)
    out = export_policy(policy, trainable_state(trained), settings, tmp_path / "final")
    loaded = Policy.load(out)
    assert not has_lora(loaded.model) and not (tmp_path / ".final.tmp").exists()
    codes = _codes(loaded.vq)
    with torch.no_grad():
        want = score_prefix(trained, loaded.vq, PROMPTS, codes, M).logprobs
        assert (score_prefix(loaded.model, loaded.vq, PROMPTS, codes, M).logprobs - want).abs().max() < 1e-5
    other = build_policy(TINY_POLICY.model_copy(update={"seed": 1})).model           # full weights, no LoRA
    export_policy(build_policy(TINY_POLICY), trainable_state(other), None, tmp_path / "final")
    assert not _changed(trainable_state(other), trainable_state(Policy.load(tmp_path / "final").model))


# ================================================================================= pure: config, batch, metrics
def test_deepspeed_config_defaults_and_merge():
    ds = deepspeed_config(LearnerConfig(num_ranks=2, batch_size=8, micro_batch_size=2, grad_clip=0.5))
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 0} and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": False} and ds["zero_allow_untested_optimizer"]
    assert deepspeed_config(LearnerConfig(batch_size=4))["train_micro_batch_size_per_gpu"] == 4  # capped at rows/rank
    ds = deepspeed_config(LearnerConfig(num_ranks=2, batch_size=10, micro_batch_size=2))          # 5 rows: 2 + 2 + 1
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    scales = [micro_loss_scale(n, 5, 3) for n in (2, 2, 1)]
    losses = torch.tensor([0.3, -1.0, 2.0])                            # per-row means of micro-batches of 2, 2, 1 rows
    assert math.isclose(sum(s * x / 3 for s, x in zip(scales, losses.tolist())), (0.6 - 2.0 + 2.0) / 5, rel_tol=1e-6)
    assert deepspeed_config(LearnerConfig(use_gpu=True, batch_size=8))["bf16"] == {"enabled": True}
    with pytest.raises(ValueError, match="batch_size: not set"):
        deepspeed_config(LearnerConfig())                                   # the run sets it (prompts x G)
    user = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "bf16": {"enabled": False},
            "gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 1}
    ds = deepspeed_config(LearnerConfig(use_gpu=True, num_ranks=2, batch_size=8, deepspeed=user))
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert ds["bf16"] == {"enabled": False} and ds["gradient_accumulation_steps"] == 4
    assert merge_dicts({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}, "d": 1}


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_ranks=0), "num_ranks"),
    (dict(lr=-1.0), "lr"),
    (dict(betas=(0.9, 1.5)), "betas"),
    (dict(lora={"r": 0}), "lora.r"),
    (dict(ema=1.0), "ema"),
    (dict(ema=0.9, deepspeed={"zero_optimization": {"stage": 3}}), "ema"),
    (dict(unknown=1), "unknown"),
    (dict(num_ranks=3, batch_size=8), "batch_size"),
    (dict(batch_size=8, deepspeed={"train_batch_size": 16}), "deepspeed.train_batch_size"),
    (dict(batch_size=8, deepspeed={"gradient_accumulation_steps": 3}), "deepspeed.gradient_accumulation_steps"),
    (dict(deepspeed={"optimizer": {"type": "Adam"}}), "deepspeed.optimizer"),
    (dict(deepspeed={"zero_optimization": {"stage": 4}}), "deepspeed.zero_optimization.stage"),
])
def test_learner_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as e:
        LearnerConfig(**kwargs)
    msg = format_validation_error(e.value)
    assert "\n" not in msg and field in msg, msg


def test_train_batch_checks_split_and_metrics():
    b = TrainBatch([[1], [2], [3], [4]], [torch.zeros(4, 1, 1, dtype=torch.long)], torch.arange(8.).view(4, 2),
                   torch.arange(4.))
    halves = split_rows(b, 2)
    assert [h.text_ids for h in halves] == [[[1], [2]], [[3], [4]]] and torch.equal(halves[1].advantages,
                                                                                     torch.tensor([2., 3.]))
    with pytest.raises(ValueError, match="do not split evenly"):
        split_rows(b, 3)
    assert [len(x) for x in micro_batches(b, 3)] == [3, 1] and micro_batches(b, 3)[1].text_ids == [[4]]
    with pytest.raises(ValueError, match="advantages"):
        TrainBatch([[1], [2]], [torch.zeros(2, 1, 1)], torch.zeros(2, 1), torch.zeros(3))
    out = reduce_metrics([{"loss": 1.0, "ratio_max": 1.5, "ratio_first_pass_max_abs_dev": 0.0},
                          {"loss": 3.0, "ratio_max": 1.2}, {"grad_norm": 2.0}])
    assert out == {"loss": 2.0, "ratio_max": 1.5, "ratio_first_pass_max_abs_dev": 0.0, "grad_norm": 2.0}


# ================================================================================= real Ray actors, real DeepSpeed
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random policy saved to disk, and a 2-prompt x G=2 batch sampled from it with CFG 3."""
    policy = build_policy(TINY_POLICY)
    path = policy.save(tmp_path_factory.mktemp("learner") / "policy")
    text = policy.encode_prompts([c for c in CAPTIONS for _ in range(G)])
    out = sample(policy.model, policy.vq, text, [11, 12, 13, 14], SampleConfig(cfg_scale=3.0), m=M, decode=False)
    adv = group_advantages(torch.tensor([[1.0, 0.0], [0.2, 0.9]])).flatten()
    return policy, path, TrainBatch(text, out.codes, out.logprobs, adv)


@pytest.fixture(scope="module")
def full_batch_grad_norm(world) -> float:
    """Pre-clipping gradient norm of the whole batch's first-step loss (beta 0.01, alpha 0.8), computed in this
    process with rl.update and no DeepSpeed: any sharding or micro-batching of the batch must give the same."""
    _, path, batch = world
    policy = Policy.load(path)
    policy.vq.requires_grad_(False)
    scorer, cfg = PrefixScorer(policy.model, policy.vq, M).train(), GRPOLossConfig(beta=0.01)
    ref = ref_logprobs(scorer, batch, cfg)                        # reference = the initial weights
    loss, _ = micro_step(scorer, batch, prefix_of(policy.model.schedule, M, 0.8), cfg, ref, first_pass=True)
    loss.backward()
    return torch.stack([p.grad.pow(2).sum() for p in scorer.parameters() if p.grad is not None]).sum().sqrt().item()


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def _check_step(metrics: dict) -> None:
    assert metrics["ratio_first_pass_max_abs_dev"] <= 1e-4, metrics
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["grad_norm"] > 0 and metrics["version"] == 1
    assert {f"logp/scale{s}" for s in range(1, M + 1)} <= set(metrics) and "entropy/scale1" in metrics


@pytest.mark.slow
def test_one_rank_step_and_checkpoint(local_ray, world, full_batch_grad_norm, tmp_path):
    policy, path, batch = world
    # micro-batches of 3 + 1 rows; DeepSpeed's WarmupCosineLR through `deepspeed` (its warm-up schedulers spend the
    # first optimiser step at lr 0): lr x 0 at step 1, x 0.5 at step 2 (the warm-up floor), x 1 at step 3
    sched = {"type": "WarmupCosineLR", "params": {"total_num_steps": 4, "warmup_num_steps": 2,
                                                  "warmup_min_ratio": 0.5, "cos_min_ratio": 0.1}}
    cfg = LearnerConfig(batch_size=4, micro_batch_size=3, lr=1e-3, deepspeed={"scheduler": sched}, ema=0.5)
    group = LearnerGroup(path, M, 0.8, GRPOLossConfig(beta=0.01), cfg)

    def exported_is_average_of(a: dict, b: dict) -> bool:  # learner.ema 0.5: the export is 0.5 a + 0.5 b
        state = Policy.load(group.export(tmp_path / "export")).model.state_dict()
        return all(torch.allclose(state[k], 0.5 * a[k] + 0.5 * b[k], atol=1e-7) for k in a)

    try:
        before = group.trainable_state()
        assert set(before) == set(policy.model.state_dict())
        metrics = group.step(batch)
        _check_step(metrics)
        assert metrics["kl_ref"] <= 1e-8                             # reference = initial weights = first pass
        assert math.isclose(metrics["grad_norm"], full_batch_grad_norm, rel_tol=1e-4)  # micro-batches of 3 + 1
        assert metrics["lr"] == 0.0
        after = group.trainable_state()
        assert not _changed(before, after)                                # lr 0: Adam and weight decay do nothing
        ref = group.score(batch.text_ids, batch.codes, reference=True)    # frozen copy of the initial policy
        assert (ref.logprobs - batch.old_logprobs).abs().max() <= 1e-4
        group.save(tmp_path / "ckpt")
        assert math.isclose(group.step(batch)["lr"], 5e-4)
        second = group.trainable_state()
        assert group.version == 2 and _changed(after, second)
        assert exported_is_average_of(after, second)                    # the average starts at the initial weights
        group.load(tmp_path / "ckpt")
        assert group.version == 1 and not _changed(after, group.trainable_state())
        assert math.isclose(group.step(batch)["lr"], 5e-4)              # the scheduler's state is restored too
        assert not _changed(second, group.trainable_state())            # and Adam's moments: the same step 2
        assert exported_is_average_of(after, second)                    # and the average (from the checkpoint)
        assert math.isclose(group.step(batch)["lr"], 1e-3)
    finally:
        group.shutdown()


@pytest.mark.slow
def test_two_rank_zero2_step(local_ray, world, full_batch_grad_norm):
    policy, path, batch = world
    cfg = LearnerConfig(num_ranks=2, batch_size=4, micro_batch_size=2, lr=1e-3,
                        deepspeed={"zero_optimization": {"stage": 2}})
    group = LearnerGroup(path, M, 0.8, GRPOLossConfig(beta=0.01), cfg)
    try:
        assert group.info["zero_stage"] == 2
        before = group.trainable_state()
        metrics = group.step(batch)
        _check_step(metrics)
        assert math.isclose(metrics["grad_norm"], full_batch_grad_norm, rel_tol=1e-4)  # 2 ranks x 2 rows: same grad
        r0, r1 = group.rank_states()
        assert _changed(before, r0) and not _changed(r0, r1)           # identical weights on both ranks
    finally:
        group.shutdown()


@pytest.mark.slow
def test_lora_learner_sends_adapters_only(local_ray, world, tmp_path):
    policy, path, batch = world
    settings = LoraSettings(r=1, alpha=2)
    cfg = LearnerConfig(micro_batch_size=4, passes=2, lr=1e-2, lora=settings)
    group = LearnerGroup(path, M, 0.8, GRPOLossConfig(beta=0.01), cfg, seed=0, batch_size=len(batch))
    try:
        metrics = group.step(batch)
        _check_step(metrics)
        assert metrics["ratio_max"] > 1 + 1e-6  # the second pass runs on the updated adapters
        version, ref = group.publish()
        state = ray.get(ref)
        learner = group.score(batch.text_ids, batch.codes)
        reference = group.score(batch.text_ids, batch.codes, reference=True)
        exported = group.export(tmp_path / "final")             # written by rank 0, adapters merged
    finally:
        group.shutdown()
    full = state_bytes(trainable_state(policy.model))
    assert version == 1 and all("lora_" in k for k in state) and state_bytes(state) <= 0.03 * full
    fresh = Policy.load(path)                                  # what a rollout worker does with each version
    base = score_prefix(fresh.model, fresh.vq, batch.text_ids, batch.codes, M)
    worker = apply_lora(fresh.model, settings)
    load_trainable_state(worker, state)
    with torch.no_grad():
        mine = score_prefix(worker, fresh.vq, batch.text_ids, batch.codes, M)
    assert (mine.logprobs - learner.logprobs).abs().max() <= 1e-5
    assert (mine.entropy - learner.entropy).abs().max() <= 1e-5
    assert (learner.logprobs - base.logprobs).abs().max() > 1e-5  # the adapters did move
    assert (reference.logprobs - base.logprobs.detach()).abs().max() <= 1e-5
    plain = Policy.load(exported)
    assert exported == tmp_path / "final" and not has_lora(plain.model)
    with torch.no_grad():
        merged = score_prefix(plain.model, plain.vq, batch.text_ids, batch.codes, M)
    assert (merged.logprobs - learner.logprobs).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("precision, bound, score", [("bf16", 1e-2, "conditional"), ("fp32", 1e-5, "conditional"),
                                                     ("fp32", 1e-5, "guided")])
def test_one_precision_on_both_sides_keeps_the_first_pass_ratio_near_1(local_ray, world, precision, bound, score):
    """A rollout worker and a learner in the same precision (bf16 runs on the CPU too): the rollouts' log-probs
    stay within `bound` of the learner's (exp(new - old) - 1). In fp32 the learner takes the rollouts' as the old
    log-probs (first-pass ratio); in bf16 it recomputes them by default, reports the rollouts' distance as
    rollout_logp_max_abs_dev, and its own first pass matches its recomputed ones. With loss.score: guided the
    learner scores the rollouts' CFG distribution (as score_prefix with their guidance), and the rollouts log the
    same guided log-probs (so their first-pass ratio, and off-policy staleness, stay corrected)."""
    from rollout.units import WorkUnit
    from rollout.worker import RolloutWorkerImpl

    policy, path, _ = world
    worker = RolloutWorkerImpl(str(path), {"cfg_scale": 3.0}, M, precision=precision, logprobs=score)
    assert next(worker.policy.model.parameters()).dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    units = [WorkUnit(f"1/{i}", 1, i, c, tuple(ids), 100 + i, G)
             for i, (c, ids) in enumerate(zip(CAPTIONS, policy.encode_prompts(CAPTIONS)))]
    results = [worker.sample_unit(u, 0) for u in units]
    batch = TrainBatch([list(u.text_ids) for u in units for _ in range(G)],
                       [torch.cat([torch.from_numpy(r.codes[s]) for r in results]) for s in range(M)],
                       torch.cat([torch.from_numpy(r.logprobs) for r in results]),
                       group_advantages(torch.tensor([[1.0, 0.0], [0.2, 0.9]])).flatten())
    group = LearnerGroup(path, M, 0.8, GRPOLossConfig(score=score),
                         LearnerConfig(batch_size=4, micro_batch_size=4, lr=1e-3, precision=precision),
                         sample=SampleConfig(cfg_scale=3.0))
    try:
        scored = group.score(batch.text_ids, batch.codes)
        metrics = group.step(batch)
    finally:
        group.shutdown()
    guidance = guidance_of(SampleConfig(cfg_scale=3.0), policy.model.schedule, M) if score == "guided" else None
    with torch.no_grad():
        mine = score_prefix(policy.model, policy.vq, batch.text_ids, batch.codes, M, guidance)
    assert precision == "bf16" or (scored.logprobs - mine.logprobs).abs().max() <= bound
    first = metrics["ratio_first_pass_max_abs_dev"]
    rollout = metrics.get("rollout_logp_max_abs_dev", first)
    print(f"{precision} {score}: rollouts' log-probs max |exp(diff) - 1| {rollout:.2e}, first pass {first:.2e}")
    assert rollout <= bound and first <= (1e-6 if precision == "bf16" else bound)
    assert ("rollout_logp_max_abs_dev" in metrics) == (precision == "bf16")


def test_rollout_and_learner_precisions_must_agree(tmp_path):
    from rl.config import RunConfig
    from tests.conftest import run_config

    def validate(**over):
        cfg = run_config(tmp_path, tmp_path, "p")
        cfg["learner"] |= over.pop("learner", {})
        cfg["rollout"] |= over.pop("rollout", {})
        try:
            return RunConfig.model_validate(cfg | over, context={"check_paths": False})
        except ValidationError as e:
            raise ValueError(format_validation_error(e)) from None

    assert validate().rollout.precision == "fp32"                                    # null: the learner's
    assert validate(learner={"precision": "bf16"}).rollout.precision == "bf16"
    with pytest.raises(ValueError, match=r"^rollout.precision: fp32, but the learner computes in bf16"):
        validate(learner={"precision": "bf16"}, rollout={"precision": "fp32"})
    mixed = validate(learner={"precision": "bf16"}, rollout={"precision": "fp32"}, allow_precision_mismatch=True)
    assert mixed.rollout.precision == "fp32"
    assert deepspeed_config(mixed.learner.model_copy(update={"batch_size": 4}))["bf16"] == {"enabled": True}
