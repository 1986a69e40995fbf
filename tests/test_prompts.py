import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl.config import PromptsConfig
from rl.prompts import load_prompts, prompts_at
from rollout.units import sample_seeds, unit_seed


def test_prompt_stream_epochs_and_cursor():
    items = list(range(10))
    stream = prompts_at(items, 0, 0, 25)
    assert sorted(stream[:10]) == items and sorted(stream[10:20]) == items and stream[:10] != stream[10:20]
    assert prompts_at(items, 0, 7, 5) == stream[7:12]  # resuming at a cursor continues the same stream
    assert prompts_at(items, 1, 0, 10) != stream[:10]


def test_load_prompts_from_shapes_split_and_parquet(tmp_path):
    train = load_prompts(PromptsConfig(split="train"))
    assert train and all(meta["spec"] for _, meta in train)
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
