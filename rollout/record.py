"""The rollout record: one Parquet file per step under RUN/rollouts/ (a Parquet dataset), written atomically.

Columns: step, uid, prompt, metadata (JSON), seed, sample, version, codes (flat list of all scales' codes),
reward, reward/<component>..., advantage, image_png (PNG bytes); VMR: value (what the advantage is computed from),
completion_rewards (the K completions' rewards of the sample's prefix; [reward] for K = 1), completion_seeds; the driver
adds staleness (the learner's weight version when it trained on the sample - version; > 0 only off-policy).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic import atomic_write_bytes
from policy.images import png_bytes
from rollout.units import UnitResult, WorkUnit, completion_seeds, sample_seeds


def rollout_table(step: int, units: list[WorkUnit], results: dict[str, UnitResult], rewards: np.ndarray,
                  components: dict[str, np.ndarray], advantages: np.ndarray, values: np.ndarray | None = None,
                  completion_rewards: np.ndarray | None = None) -> pa.Table:
    """rewards, components[name], advantages, values: (P * G,) in unit order, G samples per unit;
    completion_rewards (P * G, K). Without them (K = 1) value = reward and completion_rewards = [reward]."""
    rows: dict[str, list] = {k: [] for k in ("step", "uid", "prompt", "metadata", "seed", "sample", "version",
                                             "codes", "image_png")}
    for unit in units:
        res = results[unit.uid]
        for j, seed in enumerate(sample_seeds(unit.seed, unit.group_size)):
            rows["step"].append(step)
            rows["uid"].append(unit.uid)
            rows["prompt"].append(unit.prompt)
            rows["metadata"].append(json.dumps(unit.metadata, sort_keys=True))
            rows["seed"].append(seed)
            rows["sample"].append(j)
            rows["version"].append(res.version)
            rows["codes"].append(np.concatenate([c[j].ravel() for c in res.codes]).astype(np.int32))
            rows["image_png"].append(png_bytes(res.images[j]))
    cols = {k: v for k, v in rows.items() if k not in ("codes", "image_png")}
    cols["codes"] = pa.array(rows["codes"], type=pa.list_(pa.int32()))
    cols["reward"] = pa.array(rewards, type=pa.float64())
    for name, vals in components.items():
        cols[f"reward/{name}"] = pa.array(vals, type=pa.float64())
    cols["advantage"] = pa.array(advantages, type=pa.float64())
    cols.update(vmr_columns(units, rewards, values, completion_rewards))
    cols["image_png"] = pa.array(rows["image_png"], type=pa.binary())
    cols["seed"] = pa.array(rows["seed"], type=pa.uint64())
    return pa.table(cols)


def vmr_columns(units: list[WorkUnit], rewards: np.ndarray, values: np.ndarray | None,
                completion_rewards: np.ndarray | None) -> dict[str, pa.Array]:
    rewards = np.asarray(rewards, dtype=np.float64)
    comp = rewards[:, None] if completion_rewards is None else np.asarray(completion_rewards, dtype=np.float64)
    seeds = [list(s) for u in units
             for s in zip(*[completion_seeds(u.seed, u.group_size, k) for k in range(1, comp.shape[1] + 1)])]
    return {"value": pa.array(rewards if values is None else values, type=pa.float64()),
            "completion_rewards": pa.array(list(comp), type=pa.list_(pa.float64())),
            "completion_seeds": pa.array(seeds, type=pa.list_(pa.uint64()))}


def write_step(run_dir: str | Path, step: int, table: pa.Table) -> Path:
    """RUN/rollouts/step_XXXXXX.parquet, written atomically (its temporary is a dot file: not part of the dataset)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return atomic_write_bytes(Path(run_dir) / "rollouts" / f"step_{step:06d}.parquet", buf.getvalue().to_pybytes())
