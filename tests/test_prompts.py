import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl.config import PromptsConfig
from rl.prompts import category_groups, load_prompts, prompts_at
from rollout.units import sample_seeds, unit_seed


def test_prompt_stream_epochs_and_cursor():
    items = list(range(10))
    stream = prompts_at(items, 0, 0, 25)
    assert sorted(stream[:10]) == items and sorted(stream[10:20]) == items and stream[:10] != stream[10:20]
    assert prompts_at(items, 0, 7, 5) == stream[7:12]  # resuming at a cursor continues the same stream
    assert prompts_at(items, 1, 0, 10) != stream[:10]


def test_balanced_stream_gives_each_category_an_equal_share():
    train = load_prompts(PromptsConfig(split="train"))
    cats = [meta["category"] for _, meta in train]
    assert cats.count("position") / len(cats) > 0.8           # unbalanced split
    stream = prompts_at(train, 3, 0, 100 * 8, balance="category")
    share = {c: sum(m["category"] == c for _, m in stream) / len(stream) for c in set(cats)}
    assert len(share) == 5 and all(abs(v - 0.2) <= 0.01 for v in share.values()), share
    # each step of 8 cycles through the categories: no category twice before all have come up
    assert all(len({m["category"] for _, m in stream[i : i + 5]}) == 5 for i in range(0, 795))
    uniform = prompts_at(train, 3, 0, 800)
    assert sum(m["category"] == "position" for _, m in uniform) > 600


def test_balanced_stream_is_deterministic_and_resumable():
    train = load_prompts(PromptsConfig(split="train"))
    stream = prompts_at(train, 3, 0, 400, balance="category")
    assert prompts_at(train, 3, 0, 400, balance="category") == stream
    steps = [prompts_at(train, 3, c, 8, balance="category") for c in range(0, 400, 8)]
    assert [x for step in steps for x in step] == stream      # cursor continuation = one long stream
    assert prompts_at(train, 3, 123, 10, balance="category") == stream[123:133]
    assert prompts_at(train, 4, 0, 400, balance="category") != stream
    # within a category: every prompt once per epoch (the object category has 2 train prompts)
    obj = [p for p, m in stream if m["category"] == "object"][:6]
    assert sorted(obj[:2]) == sorted(obj[2:4]) == sorted(obj[4:6]) and len(set(obj[:2])) == 2


def test_balance_falls_back_to_uniform_without_categories():
    items = [("a", {}), ("b", {"category": "x"}), ("c", {})]
    assert category_groups(items) is None and category_groups(list(range(4))) is None
    assert prompts_at(items, 0, 0, 9, balance="category") == prompts_at(items, 0, 0, 9)
    assert category_groups([("a", {"category": "y"}), ("b", {"category": "x"}), ("c", {"category": "y"})]) == {
        "x": [1], "y": [0, 2]}
    with pytest.raises(ValueError, match="balance"):
        prompts_at(items, 0, 0, 1, balance="bogus")
    assert PromptsConfig().balance == "category"


def test_load_prompts_from_shapes_split_and_parquet(tmp_path):
    train = load_prompts(PromptsConfig(split="train"))
    assert train and all(meta["spec"] and meta["category"] for _, meta in train)
    pq.write_table(pa.table({"prompt": ["p", "q"], "category": ["x", None]}), tmp_path / "cat.parquet")
    assert load_prompts(PromptsConfig(path=str(tmp_path / "cat.parquet"))) == [("p", {"category": "x"}), ("q", {})]
    pq.write_table(pa.table({"prompt": ["a red circle", "two blue squares"]}), tmp_path / "p.parquet")
    assert load_prompts(PromptsConfig(path=str(tmp_path / "p.parquet"))) == [("a red circle", {}),
                                                                            ("two blue squares", {})]
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        load_prompts(PromptsConfig(path=str(tmp_path / "nocol.parquet")))
    pq.write_table(pa.table({"prompt": ["ok", " "]}), tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="empty prompt at row 1"):
        load_prompts(PromptsConfig(path=str(tmp_path / "empty.parquet")))
    (tmp_path / "bad.parquet").write_bytes(b"\xff\xfenot parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        load_prompts(PromptsConfig(path=str(tmp_path / "bad.parquet")))


def test_unit_seeds_belong_to_units():
    assert unit_seed(0, 3, 1) == unit_seed(0, 3, 1) != unit_seed(0, 3, 2)
    assert 0 <= unit_seed(123, 9, 9) < 2**63
    seeds = sample_seeds(unit_seed(0, 1, 0), 8)
    assert len(set(seeds)) == 8
