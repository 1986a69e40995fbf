"""The pure parts of benchmarks/: FLOP counts against torch's FlopCounterMode, and the statistics helpers."""
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from policy.sampler import SampleConfig, sample
from policy.sequence import attention_mask, left_pad, position_ids
from tests.conftest import PROMPTS, SCHED, tiny_model, tiny_vq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import forward_flops, interleaved, learner_memory, md_table, ratio, sampler_flops, stats  # noqa: E402


def counted(fn) -> int:
    """FLOPs torch counts; SDPA on the math backend (the CPU flash kernel is invisible to FlopCounterMode)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def inputs(model, k):
    ids, tmask = left_pad(PROMPTS, 0)
    n_img = sum(h * w for h, w in SCHED[1:k])
    embeds = torch.randn(len(PROMPTS), ids.shape[1] + 1 + n_img, model.cfg.backbone.hidden_size)
    return embeds, attention_mask(tmask, SCHED, k), position_ids(tmask, SCHED, k), ids.shape[1]


@torch.no_grad()
def test_forward_flops_matches_flop_counter():
    model = tiny_model()
    embeds, mask, pos, t = inputs(model, len(SCHED))
    b, length = embeds.shape[:2]
    # the whole sequence at once, head on every position
    got = counted(lambda: model.image_logits(model(embeds, mask, pos)))
    assert got == pytest.approx(b * forward_flops(model.cfg, length, length), rel=0.01)
    # with a KV cache: a prefix, then a block of 36 new tokens attending to everything before
    cache = DynamicCache(config=model.text_config)
    model(embeds[:, :-36], mask[..., :-36, :-36], pos[..., :-36], cache)
    got = counted(lambda: model.image_logits(model(embeds[:, -36:], mask[..., -36:, :], pos[..., -36:], cache)))
    assert got == pytest.approx(b * forward_flops(model.cfg, 36, length), rel=0.01)


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampler_flops_matches_flop_counter(use_cache):
    model, vq = tiny_model(), tiny_vq()
    text = [[3, 4, 5, 6]] * 2                                     # equal lengths: no padding
    got = counted(lambda: sample(model, vq, text, [0, 1], SampleConfig(cfg_scale=2.0), use_cache=use_cache,
                                 decode=False))
    assert got == pytest.approx(sampler_flops(model.cfg, 4, rows=4, use_cache=use_cache), rel=0.02)


def test_stats_and_ratio_hand_worked():
    s = stats([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["q1"] == 1.75 and s["q3"] == 4.75
    r = ratio([4.0, 6.0, 8.0], [2.0, 2.0, 2.0])
    assert r == {"median": 3.0, "min": 2.0, "max": 4.0}


def test_interleaved_order_and_counts():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and [len(v) for v in times.values()] == [3, 3]


def test_md_table():
    assert md_table(["x", "y"], [[1, "z"]]) == "| x | y |\n|---|---|\n| 1 | z |\n"


def test_rl_efficacy_pooling_verdict_and_moving_average():
    from rl_efficacy import moving_average, pooled, verdict

    from policy.evaluate import wilson_interval

    runs = [{"overall": 0.25, "counts": {"overall": 8}}, {"overall": 0.5, "counts": {"overall": 4}}]
    rate, lo, hi = pooled(runs, "overall")  # 2 + 2 of 12 images pooled
    assert rate == pytest.approx(4 / 12) and (lo, hi) == pytest.approx(wilson_interval(4, 12))
    assert verdict((0.1, 0.05, 0.15), (0.3, 0.2, 0.4)) == "better"
    assert verdict((0.3, 0.2, 0.4), (0.1, 0.05, 0.15)) == "worse"
    assert verdict((0.1, 0.05, 0.2), (0.15, 0.1, 0.25)).startswith("no difference")
    assert moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5] and moving_average([5], 10) == [5]


def test_rl_efficacy_names_and_cells():
    from rl_efficacy import CONFIG, base_label, compare_name, diff_cell, own_m, paired_cell, result_name

    other = CONFIG.parent / "shapes-tiny-m6.yaml"
    assert own_m(CONFIG) == 4 and own_m(other) == 6
    assert base_label(other) == "shipped policy"
    assert base_label(CONFIG.parent / "shapes-long-sft.yaml") == "`runs/stages/sft-more6000/final`"
    assert result_name("rl_ablation", CONFIG) == "rl_ablation"
    assert result_name("rl_ablation", other) == "rl_ablation_shapes-tiny-m6"
    sft, ema = CONFIG.parent / "shapes-long-sft.yaml", CONFIG.parent / "shapes-long-ema.yaml"
    assert compare_name(sft, ema) == "rl_compare_shapes-long-sft_vs_shapes-long-ema"
    assert compare_name(sft, ema, "before") == "rl_compare_shapes-long-sft_vs_shapes-long-ema_before"
    d = {"diff": 0.0432, "ci": (0.0171, -0.0001), "gained": 3, "lost": 1}
    assert diff_cell(d) == "+0.043 [+0.017, -0.000]" and paired_cell(d).endswith("(3 gained, 1 lost)")


def test_learner_memory_estimate_by_hand_and_against_the_tensors():
    """3 rows of 5 text tokens, m = 3 (1 + 4 + 9 = 14 image tokens, so L = 19) on the tiny model (D 64, MLP 128,
    2 layers, 4 heads / 2 KV heads: kv width 32, 64 codes)."""
    from policy.scoring import teacher_forced_logits

    model, vq = tiny_model(), tiny_vq()
    est = learner_memory(model.cfg, rows=3, text_len=5, m=3)
    assert est["sequence"] == 19
    assert est["mask"] == 19 * 19 * 2 and learner_memory(model.cfg, 3, 5, 3, shared_mask=False)["mask"] == 3 * 722
    assert est["layer_inputs"] == 2 * 3 * 19 * 64 * 2
    assert est["one_layer"] == 3 * 19 * (64 + 64 + 32 + 32 + 3 * 128) * 2
    assert est["logits"] == 3 * 14 * 64 * 10
    assert est["weights"] == 2 * sum(p.numel() for p in model.parameters())
    assert est["total"] == sum(v for k, v in est.items() if k not in ("total", "sequence"))
    text = [[3, 4, 5, 6, 7]] * 3
    _, tmask = left_pad(text, 0)
    mask = attention_mask(tmask, SCHED, 3, torch.bfloat16)
    assert mask.numel() * mask.element_size() == est["mask"]                     # the shared (1, 1, L, L) mask
    codes = [torch.zeros(3, h, w, dtype=torch.long) for h, w in SCHED]
    with torch.no_grad():
        logits = teacher_forced_logits(model, vq, text, codes, 3)
    assert logits.numel() * 10 == est["logits"]                                  # bf16 + fp32 copy + log-softmax


def test_rl_noise_demo_reward_is_exclusive_strict_plus_quarter_partial():
    """benchmarks/rl_noise.py --reward demo runs the demo config's own rewards (CombinedReward): exclusive strict +
    0.25 x partial credit, hand-worked on a circle alone (1 + 0.25) and a circle with a stray square (0 + 0.25 x 2/3,
    while the plain strict verdict still passes it)."""
    import numpy as np
    from rl_noise import reward_fn
    from shapes.world import ObjectSpec, Spec, shape_mask

    spec = Spec("object", (ObjectSpec("circle"),))
    alone = np.full((64, 64, 3), 245, dtype=np.uint8)
    alone[shape_mask("circle", 16, 16, 16)] = (220, 40, 40)
    stray = alone.copy()
    stray[shape_mask("square", 48, 48, 16)] = (40, 40, 220)
    images = np.stack([alone, stray])
    assert reward_fn("demo")(images, [spec, spec]).tolist() == pytest.approx([1.25, 0.25 * 2 / 3])
    assert reward_fn("strict")(images, [spec, spec]).tolist() == [1.0, 1.0]


def test_rl_noise_pools_the_per_image_verdicts(tmp_path, monkeypatch):
    """--pool: the paired change over the concatenated images of several runs (hand-worked: 2 runs x 2 images,
    d = +1, 0, 0, -1 and +1, +1, 0, 0 -> mean 2/8) equals paired_difference on all of them; a run without
    per-image verdicts is a one-line error naming pool."""
    import json
    import rl_noise

    monkeypatch.setattr(rl_noise, "OUT", tmp_path)
    runs = {"a": ([0, 1, 1, 1], [1, 1, 1, 0]), "b": ([0, 0, 1, 0], [1, 1, 1, 0])}
    for tag, (before, after) in runs.items():
        res = {"results": [{"held_out_strict": {"before": before, "after": after}}]}
        (tmp_path / f"rl_noise_{tag}.json").write_text(json.dumps(res))
    d = rl_noise.pooled_change(["a", "b"])
    assert d["diff"] == 2 / 8 and d["n"] == 8 and (d["gained"], d["lost"]) == (3, 1)
    (tmp_path / "rl_noise_c.json").write_text(json.dumps({"results": [{"paired": {}}]}))
    with pytest.raises(ValueError, match="^pool: "):
        rl_noise.pooled_change(["a", "c"])


def test_rl_noise_arms_and_window():
    """benchmarks/rl_noise.py: shuffled advantages are a permutation of the real ones, negated their negation;
    the window pools 0/1 rewards with a Wilson interval (hand-worked: 3 of 8)."""
    from rl_noise import arm_advantages, window

    adv = torch.tensor([1.5, -0.5, -0.5, -0.5, 2.0, -2.0, 0.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    shuffled = arm_advantages(adv, "shuffled", gen)
    assert torch.equal(shuffled.sort().values, adv.sort().values) and not torch.equal(shuffled, adv)
    assert torch.equal(arm_advantages(adv, "negated", gen), -adv) and torch.equal(arm_advantages(adv, "real", gen), adv)
    assert arm_advantages(adv, "positive", gen).tolist() == [1.5, 0, 0, 0, 2.0, 0, 0, 0]
    with pytest.raises(ValueError, match="arms: 'noisy'"):
        arm_advantages(adv, "noisy", gen)
    rate, lo, hi = window([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], 0, 2)
    assert rate == 3 / 8 and lo < 3 / 8 < hi and abs(lo - 0.1368) < 1e-3 and abs(hi - 0.6944) < 1e-3


def test_rl_noise_prompt_choice_and_probe_change():
    """--prompt picks prompts of any split (a one-line error names an unknown one); --split heldout trains on the
    held-out prompts; probe_change pairs the verdicts per prompt and setting (hand-worked: 1 of 4 -> 3 of 4)."""
    import argparse

    from rl_noise import probe_change, probe_table, training_prompts
    from shapes.world import split_prompts

    args = argparse.Namespace(prompt=["a black square", "a circle"], split="train")
    assert [p for p, _ in training_prompts(args)] == ["a black square", "a circle"]
    assert training_prompts(args)[1][1]["category"] == "object"
    assert len(training_prompts(argparse.Namespace(prompt=None, split="heldout"))) == len(split_prompts().heldout)
    with pytest.raises(ValueError, match="^prompt: 'a black cube'"):
        training_prompts(argparse.Namespace(prompt=["a black cube"], split="train"))
    before = {"a circle": {"rollout": [1, 0, 0, 0], "eval": [1, 1, 0, 0]}}
    after = {"a circle": {"rollout": [1, 1, 1, 0], "eval": [1, 1, 0, 0]}}
    d = probe_change(before, after)["probes"]["a circle"]
    assert d["rollout"][:2] == [0.25, 0.75] and d["rollout"][2]["diff"] == 0.5 and d["rollout"][2]["gained"] == 2
    assert d["eval"][2]["diff"] == 0.0
    table = probe_table([{"arm": "real", "probes": {"a circle": d}}])
    assert "| real | a circle | 0.250 -> 0.750, +0.500" in table


def test_rl_noise_curve_table_reads_the_paired_change_at_each_step():
    """--eval-every: each row is the held-out rate at that step and its paired change against the start
    (hand-worked: 0 of 4 -> 2 of 4 is +0.5)."""
    from policy.evaluate import paired_difference
    from rl_noise import curve_table

    curve = [{"step": 5, "held_out": [0.0, 0.5], "paired": paired_difference([0, 0, 0, 0], [1, 1, 0, 0])}]
    table = curve_table([{"arm": "real", "curve": curve}, {"arm": "shuffled"}])
    assert "| real | 5 | 0.500 | +0.500 [" in table and "shuffled" not in table
    assert curve_table([{"arm": "real"}]) == ""


def test_rl_noise_objects_reward_adds_half_the_object_credit():
    """--reward objects: the demo's reward + 0.5 x object credit (exclusive), hand-worked on a circle alone
    (1.25 + 0.5) and a circle with a stray square (0.25 x 2/3 + 0.5 x 1/2)."""
    import numpy as np
    from rl_noise import reward_fn
    from shapes.world import ObjectSpec, Spec, shape_mask

    spec = Spec("object", (ObjectSpec("circle"),))
    alone = np.full((64, 64, 3), 245, dtype=np.uint8)
    alone[shape_mask("circle", 16, 16, 16)] = (220, 40, 40)
    stray = alone.copy()
    stray[shape_mask("square", 48, 48, 16)] = (40, 40, 220)
    got = reward_fn("objects")(np.stack([alone, stray]), [spec, spec]).tolist()
    assert got == pytest.approx([1.75, 0.25 * 2 / 3 + 0.25])


def test_rl_categories_windows_by_hand():
    """Two windows of 2 steps; a group is one (step, uid): hits count strict > 0, a group is hit if any sample is."""
    import rl_categories

    rows = [(1, "a", "object", 1.0), (1, "a", "object", 0.0), (1, "b", "count", 0.0), (1, "b", "count", 0.0),
            (2, "a", "object", 0.0), (2, "a", "object", 0.0), (3, "a", "count", 1.0), (3, "a", "count", 1.0)]
    wins = rl_categories.category_windows(rows, window=2)
    assert wins[0]["object"] == {"n": 4, "hits": 1, "groups": 2, "groups_hit": 1}   # steps 1 and 2: uid a twice
    assert wins[0]["count"] == {"n": 2, "hits": 0, "groups": 1, "groups_hit": 0}
    assert wins[1] == {"count": {"n": 2, "hits": 2, "groups": 1, "groups_hit": 1}}
    assert rl_categories.rate_cell(wins[1]["count"]).startswith("1.000 [0.342, 1.000]")
    first, last = rl_categories.first_and_last(rows, window=2)      # the last 2 steps are 2 and 3
    assert first == wins[0] and last["object"]["n"] == 2 and last["count"]["hits"] == 2


def test_rl_categories_check_rates_by_hand():
    """Per category, each check's pass share over the samples it applies to (None or NaN: does not apply)."""
    import rl_categories

    rows = [("two-object", {"object": 1.0, "colour": 0.0, "position": None}),
            ("two-object", {"object": 0.0, "colour": 0.0, "position": None}),
            ("position", {"object": 1.0, "colour": 1.0, "position": 0.0, "two-object": float("nan")})]
    assert rl_categories.check_rates(rows) == {"two-object": {"object": 0.5, "colour": 0.0},
                                               "position": {"object": 1.0, "colour": 1.0, "position": 0.0}}


def test_base_diagnostics_binding_flags_by_hand():
    """Two-object binding: shapes drawn, colours drawn, each shape in its colour, and the colours swapped."""
    import base_diagnostics
    from shapes.verifier import Blob
    from shapes.world import ObjectSpec, Spec

    spec = Spec("two-object", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")))
    blob = lambda shape, colour: Blob(colour, shape, 256, (8.0, 8.0))  # noqa: E731
    flags = base_diagnostics.binding_flags
    assert flags([blob("circle", "red"), blob("square", "blue")], spec) == \
        {"shapes": True, "colours": True, "bound": True, "swapped": False}
    assert flags([blob("circle", "blue"), blob("square", "red")], spec) == \
        {"shapes": True, "colours": True, "bound": False, "swapped": True}
    assert flags([blob("circle", "red"), blob("square", "green")], spec) == \
        {"shapes": True, "colours": False, "bound": False, "swapped": False}
    assert flags([blob("triangle", "red"), blob("square", "blue")], spec) == \
        {"shapes": False, "colours": True, "bound": False, "swapped": False}
