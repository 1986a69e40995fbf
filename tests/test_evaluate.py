"""The held-out evaluation: its statistics (against hand-worked values), the fixed eval set, summary and report."""
import json
import random

import numpy as np
import pytest

import policy.evaluate as ev
from policy.evaluate import (
    EvalConfig, eval_items, format_scores, grid_indices, mean_interval, paired_comparison, paired_difference,
    summarize, wilson_interval, write_report,
)
from shapes.world import CATEGORIES, render, split_prompts


# ------------------------------------------------------------------------------------------------ statistics
def test_wilson_interval_hand_worked():
    # 8 / 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half 1.96 / 1.38416 * sqrt(0.016 + 0.009604)
    lo, hi = wilson_interval(8, 10, z=1.96)
    assert lo == pytest.approx(0.49016, abs=1e-5) and hi == pytest.approx(0.94332, abs=1e-5)
    lo, hi = wilson_interval(0, 10, z=1.96)       # centre = half = 0.19208 / 1.38416
    assert lo == 0.0 and hi == pytest.approx(0.27754, abs=1e-5)
    assert wilson_interval(10, 10, z=1.96)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(48, 96)              # symmetric around 1/2, narrower with more images
    assert lo + hi == pytest.approx(1.0) and hi - lo < wilson_interval(5, 10)[1] - wilson_interval(5, 10)[0]


def test_mean_interval_hand_worked():
    # mean 0.5, sample variance (0.25 + 0 + 0.25 + 0) / 3 = 1/6, se = sqrt(1/6) / 2 = 0.2041241
    lo, hi = mean_interval([0.0, 0.5, 1.0, 0.5], z=1.96)
    assert lo == pytest.approx(0.5 - 1.96 * 0.2041241) and hi == pytest.approx(0.5 + 1.96 * 0.2041241)
    assert mean_interval([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval([1.0])


def test_paired_difference_hand_worked():
    before = [1, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    after = [1, 0, 1, 1, 0, 1, 1, 0, 0, 0]        # 3 gained, 1 lost of 10: d = +0.2, mean(d^2) = 0.4
    out = paired_difference(before, after, z=1.96)
    half = 1.96 * np.sqrt((0.4 - 0.04) / 10)
    assert out["diff"] == pytest.approx(0.2) and out["ci"] == pytest.approx([0.2 - half, 0.2 + half])
    assert (out["n"], out["gained"], out["lost"]) == (10, 3, 1)
    same = paired_difference(before, before)
    assert same["diff"] == 0 and same["ci"] == [0, 0] and same["gained"] == same["lost"] == 0
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([1, 0], [1])


def test_paired_difference_is_narrower_than_unpaired_when_verdicts_agree():
    rng = np.random.default_rng(0)
    before = (rng.random(480) < 0.3).astype(int)
    after = before.copy()
    after[np.flatnonzero(before == 0)[:24]] = 1   # +5 points, every other image unchanged
    out = paired_difference(before, after)
    assert out["ci"][0] > 0                       # resolved: two overlapping Wilson intervals would not show it
    b, a = wilson_interval(before.sum(), 480), wilson_interval(after.sum(), 480)
    assert a[0] < b[1]


# ------------------------------------------------------------------------------------------------ eval set
def test_eval_items_balanced_cyclic_and_seeded():
    items = eval_items(96, 1234)
    assert len(items) == 480 and len(eval_items(EvalConfig().images_per_category, 0)) == 480
    held = split_prompts().heldout
    for cat in CATEGORIES:
        got = [it for it in items if it.spec.category == cat]
        group = [s for s in held if s.category == cat]
        assert len(got) == 96 and [it.spec for it in got] == [group[i % len(group)] for i in range(96)]
    assert [it.seed for it in items] == [1234 + i for i in range(480)] == [1234 + it.index for it in items]
    assert eval_items(96, 1234) == items          # a pure function of the config: before / after are paired
    assert len({(it.spec, it.seed) for it in items}) == 480


def _records(counts: dict[str, tuple[int, int, int]]) -> list[dict]:
    """Synthetic per-image records: per category (n, strict successes, template successes)."""
    out = []
    for cat, (n, s, t) in counts.items():
        out += [{"index": len(out) + i, "prompt": f"p{i}", "category": cat, "seed": i, "strict": int(i < s),
                 "partial": 1.0 if i < s else 0.25, "template": int(i < t)} for i in range(n)]
    return out


def test_summarize_keys_values_and_intervals():
    counts = {"object": (10, 8, 5), "colour": (10, 2, 1), "count": (10, 0, 0), "two-object": (10, 5, 5),
              "position": (10, 10, 9)}
    res = summarize(_records(counts))
    assert res["overall"] == pytest.approx(25 / 50) and res["num_images"] == 50
    assert res["partial"] == pytest.approx((25 * 1.0 + 25 * 0.25) / 50)
    for cat, (n, s, t) in counts.items():
        assert res[cat] == pytest.approx(s / n) and res["ci"][cat] == pytest.approx(list(wilson_interval(s, n)))
        assert res["template"][cat] == pytest.approx(t / n)
        assert res["template"]["ci"][cat] == pytest.approx(list(wilson_interval(t, n)))
    assert res["ci"]["overall"] == pytest.approx(list(wilson_interval(25, 50)))
    assert res["counts"] == {"overall": 50, "partial": 50, **{c: 10 for c in CATEGORIES}}
    assert res["template"]["counts"] == {"overall": 50, **{c: 10 for c in CATEGORIES}}
    assert res["template"]["overall"] == pytest.approx(20 / 50)
    assert res["ci"]["partial"] == pytest.approx(list(mean_interval([1.0] * 25 + [0.25] * 25)))
    assert all(isinstance(res[k], float) for k in ("overall", "partial", *CATEGORIES))
    json.dumps(res)                               # logged and checkpointed as JSON


def test_format_scores_shows_intervals_and_accepts_old_results():
    res = summarize(_records({c: (10, 8, 4) for c in CATEGORIES}))
    lo, hi = wilson_interval(40, 50)
    line = format_scores(res)
    assert f"overall=0.800 [{lo:.3f}, {hi:.3f}]" in line and "template overall=0.40 [" in line
    assert "position=0.80 [0.49, 0.94]" in line
    assert format_scores({"overall": 0.5, "partial": 0.6, "object": 1.0}) == "overall=0.500 partial=0.600 | object=1.00"


# ------------------------------------------------------------------------------------------------ end to end
def test_evaluate_and_report_with_rendered_images(tmp_path, monkeypatch):
    def fake_sample(policy, items, cfg, desc="eval"):
        return np.stack([render(it.spec, random.Random(it.seed)) for it in items])

    monkeypatch.setattr(ev, "sample_images", fake_sample)
    cfg = EvalConfig(images_per_category=4, seed=7, grid_size=10)
    result, images, records = ev.evaluate(None, cfg)
    assert result["num_images"] == 20 == len(images) == len(records)
    assert result["overall"] >= 0.95 and result["template"]["overall"] >= 0.95 and result["partial"] >= 0.95
    assert set(result["ci"]) == {"overall", "partial", *CATEGORIES}
    assert [r["seed"] for r in records] == list(range(7, 27))
    grid = write_report(result, images, records, tmp_path / "before", cfg.grid_size)
    write_report(result, images, records, tmp_path / "after", cfg.grid_size)
    assert grid.exists()
    before = json.loads((tmp_path / "before" / "scores.json").read_text())
    after = json.loads((tmp_path / "after" / "scores.json").read_text())
    assert {"overall", "partial", "num_images", "ci", "template", *CATEGORIES} <= set(before)
    assert len(before["per_image"]) == 20 and before["per_image"][3]["prompt"] == records[3]["prompt"]
    assert paired_comparison(before, after)["diff"] == 0
    after["per_image"][0]["seed"] += 1
    with pytest.raises(ValueError, match="different"):
        paired_comparison(before, after)
    assert grid_indices(480, 20).tolist() == grid_indices(480, 20).tolist() and len(grid_indices(3, 20)) == 3
    pair = ev.side_by_side(tmp_path / "before", tmp_path / "after", tmp_path / "before_after.png", pairs_per_row=5)
    from PIL import Image

    width, _ = Image.open(pair).size
    assert width == 10 * (64 * 2 + 4) + 4  # 5 before|after pairs per row at zoom 2


def test_resume_drops_evaluations_logged_after_the_checkpoint(tmp_path):
    from rl.runstore import trim_eval_curve

    path = tmp_path / "eval_curve.jsonl"
    path.write_text("".join(json.dumps({"step": s, "overall": s / 10}) + "\n" for s in (0, 5, 10, 15)))
    trim_eval_curve(path, 10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 5, 10]
    trim_eval_curve(tmp_path / "missing.jsonl", 3)  # no curve yet: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()
