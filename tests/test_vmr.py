"""VMR, the middle-step value: the formula against a by-hand numpy computation, K = 1 against the plain reward,
the workers' completions against the sampler, and a short real run with K = 2."""
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from policy.sampler import SampleConfig, sample
from rl.grpo import group_advantages, prefix_values, soft_value
from rl.config import VMRConfig
from rl.vmr import completion_batch, interleave, prefix_scores, vmr_metrics
from rollout.units import UnitResult, WorkUnit, completion_seeds, sample_seeds, unit_seed
from tests.conftest import free_port, run_config


def soft_value_by_hand(r: np.ndarray, eta: float) -> float:
    """eta log (1/K sum_k exp(R_k / eta)), shifted by the max for stability: an independent computation."""
    z = r / eta
    top = z.max()
    return float(eta * (top + math.log(sum(math.exp(x - top) for x in z) / len(z))))


def test_soft_value_matches_the_formula_by_hand():
    rng = np.random.default_rng(0)
    for eta in (0.05, 0.5, 1.0, 3.0):
        r = rng.normal(size=(4, 5, 3)) * 2
        got = soft_value(torch.from_numpy(r), eta).numpy()
        want = np.array([[soft_value_by_hand(r[p, g], eta) for g in range(5)] for p in range(4)])
        assert np.allclose(got, want, rtol=0, atol=1e-12)
    assert soft_value(torch.tensor([1000.0, 1000.0]), 0.01).item() == pytest.approx(1000.0)  # no overflow


def test_prefix_scores_value_of_the_completions():
    p, g, k, eta = 2, 3, 3, 0.7
    total = np.arange(p * g * k, dtype=np.float64) * 0.37 % 1.9  # row i * K + (k - 1): completion k of sample i
    comps = {"verifier": total * 2}
    s = prefix_scores(total, comps, p, g, VMRConfig(k=k, eta=eta))
    rows = total.reshape(p * g, k)
    assert np.array_equal(s.completions.reshape(-1, k).numpy(), rows)
    assert np.array_equal(s.rewards.reshape(-1).numpy(), rows[:, 0])              # completion 1 = the rollout
    assert np.array_equal(s.components["verifier"], comps["verifier"][::k])
    want = np.array([soft_value_by_hand(r, eta) for r in rows]).reshape(p, g)
    assert np.allclose(s.values.numpy(), want, atol=1e-12)
    m = vmr_metrics(s)
    assert m["vmr/completion_reward_max"] == pytest.approx(rows.max(1).mean())
    assert m["vmr/value_mean"] == pytest.approx(want.mean())


def test_k1_is_the_plain_reward_bit_for_bit():
    rng = np.random.default_rng(1)
    p, g = 3, 4
    total = rng.normal(size=p * g)
    for eta in (0.3, 1.0, 7.0):
        s = prefix_scores(total, {"x": total}, p, g, VMRConfig(k=1, eta=eta))
        plain = torch.as_tensor(total, dtype=torch.float64).view(p, g)  # the driver's reward before VMR
        assert torch.equal(s.values, plain) and torch.equal(s.rewards, plain)
        assert torch.equal(group_advantages(s.values), group_advantages(plain))
        assert vmr_metrics(s) == {}
    assert torch.equal(prefix_values(torch.ones(2, 3, 1) * 0.3, 0.3), torch.ones(2, 3) * 0.3)
    images, prompts, meta = np.zeros((4, 2, 2, 3), np.uint8), list("abcd"), [{}] * 4
    assert completion_batch([], {}, images, prompts, meta, 1) == (images, prompts, meta)


def test_completion_batch_order():
    own = np.arange(2)[:, None] * np.ones((2, 3))                   # G = 2 samples
    extra = 10 + np.arange(4).reshape(2, 2)[..., None] * np.ones((2, 2, 3))  # K - 1 = 2 completions each
    assert interleave(own, extra)[:, 0].tolist() == [0, 10, 11, 1, 12, 13]
    unit = WorkUnit("1/0", 1, 0, "p", (1,), 5, 2)
    res = UnitResult("1/0", [], own, np.zeros((2, 1)), 0, "w", extra)
    batch, prompts, meta = completion_batch([unit], {"1/0": res}, own, ["a", "b"], [{"i": 0}, {"i": 1}], 3)
    assert batch[:, 0].tolist() == [0, 10, 11, 1, 12, 13] and prompts == list("aaabbb") and meta[3] == {"i": 1}


def test_config_and_seeds():
    assert VMRConfig() == VMRConfig(k=1, eta=1.0)
    for bad in ({"k": 0}, {"eta": 0.0}, {"eta": -1.0}, {"kk": 2}):
        with pytest.raises(ValidationError):
            VMRConfig(**bad)
    seed = unit_seed(3, 2, 1)
    assert completion_seeds(seed, 4, 1) == sample_seeds(seed, 4)
    k2, k3 = completion_seeds(seed, 4, 2), completion_seeds(seed, 4, 3)
    assert k2 == completion_seeds(seed, 4, 2) and len(set(k2 + k3 + sample_seeds(seed, 4))) == 12
    assert all(0 <= s < 2**63 for s in k2 + k3)


def test_worker_completions_continue_the_prefix(rl_assets):
    from policy.images import to_uint8
    from policy.io import Policy
    from rollout.worker import RolloutWorkerImpl

    cfg = {"cfg_scale": 2.0, "top_k": 8}
    unit = WorkUnit("1/0", 1, 0, "a red circle", (3, 4, 5), unit_seed(1, 1, 0), 2)
    plain = RolloutWorkerImpl(str(rl_assets / "policy"), cfg, 3).sample_unit(unit, 0)
    res = RolloutWorkerImpl(str(rl_assets / "policy"), cfg, 3, completions=3).sample_unit(unit, 0)
    assert plain.completions is None and np.array_equal(plain.images, res.images)
    assert res.completions.shape == (2, 2, *res.images.shape[1:])
    policy = Policy.load(rl_assets / "policy")
    for k in (2, 3):  # completion k of sample j: the prefix of sample j continued with completion_seeds(..., k)[j]
        out = sample(policy.model, policy.vq, [[3, 4, 5]] * 2, completion_seeds(unit.seed, 2, k), SampleConfig(**cfg),
                     m=3, prefix_codes=[torch.from_numpy(c) for c in res.codes[:3]])
        assert np.array_equal(to_uint8(out.images), res.completions[:, k - 2])


@pytest.mark.slow
def test_vmr_in_the_loop(local_ray, rl_assets, tmp_path):
    from rl.config import RunConfig
    from rl.driver import Driver

    cfg = RunConfig(**run_config(rl_assets, tmp_path, "vmr", steps=2, group_size=3, prompts_per_step=2,
                                 vmr={"k": 2, "eta": 0.5}, **{"rollout.workers": 1, "checkpoint.every": 2,
                                                                      "rewards.service.port": free_port()}))
    Driver(cfg).run()
    table = pq.read_table(cfg.run_dir / "rollouts").to_pandas()
    assert len(table) == 2 * 2 * 3
    comp = np.stack(table["completion_rewards"].to_numpy())
    assert comp.shape == (12, 2) and np.array_equal(comp[:, 0], table["reward"].to_numpy())
    assert not np.array_equal(comp[:, 0], comp[:, 1])  # the second completion is another image
    assert np.allclose(table["value"], soft_value(torch.from_numpy(comp), 0.5).numpy(), atol=1e-12)
    seeds = np.stack(table["completion_seeds"].to_numpy()).astype(np.uint64)
    assert np.array_equal(seeds[:, 0], table["seed"].to_numpy())
    for (_, uid), group in table.groupby(["step", "uid"]):  # advantages are computed from the values
        adv = group_advantages(torch.tensor(group["value"].to_numpy())[None], cfg.normalize_std, cfg.adv_eps)[0]
        assert np.allclose(group["advantage"], adv.numpy(), atol=1e-12)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("vmr/value_mean" in r and "vmr/completion_reward_max" in r for r in rows if "reward/mean" in r)


def test_rollout_record_columns():
    from rollout.record import rollout_table

    unit = WorkUnit("1/0", 1, 0, "p", (1,), 5, 2)
    res = UnitResult("1/0", [np.zeros((2, 1, 1), np.int64)], np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 1)), 0, "w")
    r, adv = np.array([0.25, 0.75]), np.array([-1.0, 1.0])
    plain = rollout_table(1, [unit], {"1/0": res}, r, {}, adv).to_pydict()  # K = 1: value = reward
    assert plain["value"] == [0.25, 0.75] and plain["completion_rewards"] == [[0.25], [0.75]]
    assert plain["completion_seeds"] == [[s] for s in plain["seed"]]
    comp = np.array([[0.25, 0.5], [0.75, 0.0]])
    vmr = rollout_table(1, [unit], {"1/0": res}, r, {}, adv, np.array([0.4, 0.4]), comp).to_pydict()
    assert vmr["completion_rewards"] == comp.tolist() and vmr["value"] == [0.4, 0.4]
    assert [s[1] for s in vmr["completion_seeds"]] == completion_seeds(5, 2, 2)
