import random

import numpy as np
import pytest

from policy.shapes import (
    CATEGORIES, Spec, all_specs, caption, conflicting_spec, read_prompts, render, split_prompts, vocabulary,
    write_prompts,
)
from policy.text_tokenizer import encode_prompts, load_text_tokenizer, shapes_tokenizer
from rewards.verifier import detect, partial_credit, score


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(1234)
    specs = all_specs()
    out = []
    for _ in range(1000):
        spec = rng.choice(specs)
        out.append((spec, render(spec, rng)))
    return out


def test_verifier_agrees_with_renderer(scenes):
    agree = sum(score(img, spec)["all"] for spec, img in scenes)
    assert agree >= 990, agree


def test_verifier_rejects_scenes_of_a_different_spec(scenes):
    rng = random.Random(5)
    rejected = 0
    for spec, img in scenes:
        other = conflicting_spec(spec, rng)
        assert other != spec
        rejected += not score(img, other)["all"]
    assert rejected >= 990, rejected


def test_verifier_checks_per_category():
    rng = random.Random(0)
    spec = Spec.from_json(next(s for s in all_specs() if s.category == "position").to_json())
    checks = score(render(spec, rng), spec)
    assert set(checks) == {"object", "colour", "count", "position", "all"} and all(checks.values())
    two = next(s for s in all_specs() if s.category == "two-object")
    assert "two-object" in score(render(two, rng), two)
    blank = np.full((64, 64, 3), 245, dtype=np.uint8)
    assert detect(blank) == [] and not score(blank, spec)["all"] and partial_credit(score(blank, spec)) == 0
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not any(score(noise, s)["all"] for s in all_specs()[:30])


def test_captions_unique_and_categories_covered():
    specs = all_specs()
    caps = [caption(s) for s in specs]
    assert len(set(caps)) == len(caps)
    assert {s.category for s in specs} == set(CATEGORIES)
    assert caption(Spec("position", (specs[5].objects[0], specs[6].objects[0]), "left of")).count(" left of ") == 1


def test_splits_and_parquet(tmp_path):
    splits = split_prompts()
    train, held = {caption(s) for s in splits.train}, {caption(s) for s in splits.heldout}
    assert not train & held and len(train) + len(held) == len(all_specs())
    assert {s.category for s in splits.heldout} == set(CATEGORIES)
    assert split_prompts().heldout == splits.heldout  # deterministic
    write_prompts(splits.heldout, tmp_path / "heldout.parquet")
    rows = read_prompts(tmp_path / "heldout.parquet")
    assert [p for p, _ in rows] == [caption(s) for s in splits.heldout]
    assert [s for _, s in rows] == splits.heldout


def test_word_level_text_tokenizer(tmp_path):
    tok = shapes_tokenizer()
    assert len(tok) == len(vocabulary()) + 2 and tok.pad_token_id == 0
    ids = encode_prompts(tok, ["a red circle left of a blue square"])[0]
    assert len(ids) == 8 and 1 not in ids  # no unknown words
    tok.save_pretrained(str(tmp_path / "tok"))
    loaded = load_text_tokenizer(tmp_path / "tok")
    assert encode_prompts(loaded, ["two green triangles"]) == encode_prompts(tok, ["two green triangles"])
    assert encode_prompts(loaded, ["zebra"]) == [[tok.unk_token_id]]
