"""Row alignment of a step (rl/driver.py assemble_step / step_table): every sample's text, codes, old log-probs,
reward, value and advantage stay together, whatever order the rollouts come back in and whatever order the units
(prompts) are in. Every field of sample (i, j) and completion k encodes (i, j, k), so a misaligned row shows."""
import math
import random

import numpy as np
import pytest
import torch

from rewards.combine import Scored
from rl.config import VMRConfig
from rl.step import assemble_step, step_table
from rl.grpo import soft_value
from rollout.units import UnitResult, WorkUnit

P, G, M, EPS = 4, 3, 2, 1e-4


def reward_of(i: int, j: int, k: int) -> float:
    return math.sin(7 * i + 3 * j + k) + 0.1 * k


def make_units() -> list[WorkUnit]:
    return [WorkUnit(f"1/{i}", 1, i, f"prompt {i}", (i, i + 1), 100 + i, G, {"i": i}) for i in range(P)]


def make_results(units: list[WorkUnit], k: int) -> dict[str, UnitResult]:
    out = {}
    for u in units:
        i = u.index
        img = np.zeros((G, 2, 2, 3), np.uint8)
        img[:, 0, 0, 0], img[:, 0, 0, 1] = i, np.arange(G)
        extra = None
        if k > 1:
            extra = np.repeat(img[:, None], k - 1, axis=1)
            extra[:, :, 0, 0, 2] = np.arange(1, k)                      # completion index 1..K-1
        codes = [np.full((G, h, h), 0) + 10 * i + np.arange(G)[:, None, None] for h in (1, 2)]
        logp = (10 * i + np.arange(G, dtype=np.float32))[:, None].repeat(5, 1)
        out[u.uid] = UnitResult(u.uid, codes, img, logp, 0, "w", extra)
    return out


def score(images: np.ndarray, prompts: list[str], meta: list[dict]) -> Scored:
    """A reward that reads (i, j, k) off the image and checks the prompt and metadata it was paired with."""
    i, j, k = (images[:, 0, 0, c].astype(int) for c in range(3))
    match = np.array([p == f"prompt {a}" and m["i"] == a for p, m, a in zip(prompts, meta, i)], dtype=float)
    total = np.array([reward_of(*t) for t in zip(i, j, k)])
    return Scored(total, {"match": match})


@pytest.mark.parametrize("k", [1, 3])
def test_rows_follow_their_sample_in_any_order(k):
    vmr = VMRConfig(k=k, eta=0.5)
    base = make_units()
    for seed in range(3):
        rng = random.Random(seed)
        units = base[:]
        rng.shuffle(units)                                   # prompt order
        results = make_results(units, k)
        back = list(results.items())
        rng.shuffle(back)                                    # the order the rollouts came back in
        rows = assemble_step(units, dict(back), score, M, vmr, True, EPS)
        assert np.all(rows.prefix.components["match"] == 1)
        rewards, adv, values = (x.reshape(-1) for x in (rows.prefix.rewards, rows.advantages, rows.prefix.values))
        for r in range(P * G):
            u, j = units[r // G], r % G
            i = u.index
            own = torch.tensor([[reward_of(i, jj, 0) for jj in range(G)]], dtype=torch.float64)
            if k > 1:
                own = soft_value(torch.tensor([[reward_of(i, jj, kk) for kk in range(k)] for jj in range(G)],
                                              dtype=torch.float64), vmr.eta)[None]
            assert rows.prompts[r] == f"prompt {i}" and rows.images[r, 0, 0, 0] == i and rows.images[r, 0, 0, 1] == j
            assert rows.batch.text_ids[r] == [i, i + 1]
            assert all(int(c[r].flatten()[0]) == 10 * i + j for c in rows.batch.codes)
            assert rows.batch.old_logprobs[r, 0].item() == 10 * i + j
            assert rewards[r].item() == pytest.approx(reward_of(i, j, 0))
            assert values[r].item() == pytest.approx(own[0, j].item())
            want_adv = (own[0, j] - own.mean()) / (own.std() + EPS)     # the group of its own unit only
            assert rows.batch.advantages[r].item() == pytest.approx(want_adv.item(), rel=1e-5, abs=1e-6)
            assert adv[r].item() == pytest.approx(want_adv.item(), rel=1e-6, abs=1e-7)


def test_rollout_record_rows_match_their_sample():
    units = make_units()[::-1]
    results = make_results(units, 2)
    rows = assemble_step(units, results, score, M, VMRConfig(k=2), True, EPS)
    table = step_table(1, units, results, rows).to_pydict()
    for r, (uid, j) in enumerate(zip(table["uid"], table["sample"])):
        i = int(uid.split("/")[1])
        assert table["prompt"][r] == f"prompt {i}" and table["codes"][r][0] == 10 * i + j
        assert table["reward"][r] == pytest.approx(reward_of(i, j, 0))
        assert table["completion_rewards"][r] == pytest.approx([reward_of(i, j, 0), reward_of(i, j, 1)])
        assert table["advantage"][r] == pytest.approx(rows.batch.advantages[r].item(), rel=1e-6)


def test_component_metrics_skip_rows_without_the_check():
    """A verifier check a prompt does not ask is NaN in its row: the step's mean / std are over the other rows,
    and a check no row asks is left out (it used to be logged as NaN for every step)."""
    from rl.step import component_metrics

    out = component_metrics({"strict/colour": np.array([1.0, np.nan, 0.0, 1.0]),
                             "strict/position": np.array([np.nan] * 4), "strict/all": np.array([1.0, 0.0, 0.0, 0.0])})
    assert out["reward/strict/colour/mean"] == pytest.approx(2 / 3)
    assert out["reward/strict/colour/std"] == pytest.approx(np.std([1.0, 0.0, 1.0]))
    assert out["reward/strict/all/mean"] == 0.25 and "reward/strict/position/mean" not in out


def test_down_sampled_rows_keep_their_sample():
    """down_sample = 2 of G = 3: each unit trains on its two samples of largest reward spread (here the highest
    and the lowest), advantages within the pair; the record marks them, the third sample has advantage 0."""
    units = make_units()[::-1]
    results = make_results(units, 1)
    rows = assemble_step(units, results, score, M, VMRConfig(k=1), True, EPS, down_sample=2)
    assert len(rows.batch.text_ids) == 2 * P and rows.keep.shape == (P, 2)
    table = step_table(1, units, results, rows).to_pydict()
    for p, u in enumerate(units):
        own = [reward_of(u.index, j, 0) for j in range(G)]
        picked = sorted([int(np.argmin(own)), int(np.argmax(own))])
        pair = torch.tensor([own[j] for j in picked], dtype=torch.float64)
        for r, j in enumerate(picked):
            row = 2 * p + r
            assert rows.batch.text_ids[row] == [u.index, u.index + 1]
            assert all(int(c[row].flatten()[0]) == 10 * u.index + j for c in rows.batch.codes)
            assert rows.batch.old_logprobs[row, 0].item() == 10 * u.index + j
            want = ((pair[r] - pair.mean()) / (pair.std() + EPS)).item()
            assert rows.batch.advantages[row].item() == pytest.approx(want, rel=1e-5)
        for j in range(G):
            assert table["trained"][p * G + j] == (j in picked)
            assert table["advantage"][p * G + j] == (0.0 if j not in picked else pytest.approx(
                rows.batch.advantages[2 * p + picked.index(j)].item(), rel=1e-6))
