"""Run storage: one checkpoint of the demo's learner saved to the local disk vs uploaded to an S3 server, and loaded
back from each (the resume path), side by side in one process.

The demo learner (shipped tiny policy, 1 rank, ZeRO-0, AdamW state) under a real DeepSpeed engine; the S3 side is
moto's server on loopback (`tests/s3server.py`), so the figure is the cost of the object-store protocol (one PUT per
file, the manifest, the completeness check) rather than of a network. Local: `rl.checkpoint.save_checkpoint`
(atomic folder) and `LearnerGroup.load`. S3: `LearnerGroup.save_to` (the rank saves to scratch and uploads its
files) + `RunStore.commit_checkpoint`, and `LearnerGroup.load_from` (the rank downloads what it needs and loads).
Ceiling: the checkpoint's bytes over this machine's memcpy bandwidth (both sides copy every byte at least twice).

    .venv/bin/python benchmarks/storage_checkpoint.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import TINY_POLICY, fmt, interleaved, md_table, ratio, start_ray, stats, write_result

from rl.checkpoint import save_checkpoint
from rl.config import GRPOLossConfig
from rl.learner import LearnerGroup
from rl.runstore import RunStore, credential_env
from rl.strategy import LearnerConfig
from tests.s3server import bucket_uri, credentials_env, s3_server


def memcpy_gbps(n: int = 1 << 28) -> float:
    import numpy as np

    a, b = np.ones(n, dtype=np.uint8), np.zeros(n, dtype=np.uint8)
    np.copyto(b, a)  # pages touched: the timed copy measures bandwidth, not page faults
    t = time.perf_counter()
    np.copyto(b, a)
    return n / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.update(credentials_env())
    start_ray()
    cfg = LearnerConfig(num_ranks=1, cpus_per_rank=0.5, lr=1e-4, micro_batch_size=32, batch_size=64)
    group = LearnerGroup(str(TINY_POLICY), 4, 0.7, GRPOLossConfig(), cfg, env_vars=credential_env())
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    with s3_server() as endpoint:
        uri = bucket_uri(endpoint, "bench-runs")
        store = RunStore(tmp / "scratch", "bench", uri)
        steps = iter(range(1, 1000))

        def local_save():
            save_checkpoint(tmp / "local", next(steps), {"step": 0}, group.save, keep=2)

        def s3_save():
            step = next(steps)
            files = group.save_to(uri, store.rel(f"checkpoints/step_{step:06d}/learner"))
            store.commit_checkpoint(step, {"step": 0}, files, keep=2)

        def local_load():
            group.load(sorted((tmp / "local" / "checkpoints").glob("step_*"))[-1] / "learner")

        def s3_load():
            group.load_from(uri, store.latest_checkpoint())

        saves = interleaved({"local disk": local_save, "S3 (moto, loopback)": s3_save}, args.repeats)
        loads = interleaved({"local disk": local_load, "S3 (moto, loopback)": s3_load}, args.repeats)
        ckpt = store.latest_checkpoint()
        size = sum(store.remote.size(f"{ckpt}/{n}") or 0 for n in _files(store, ckpt))
    group.shutdown()
    ceiling = 2 * size / (memcpy_gbps() * 1e9)
    rows = []
    for what, runs in (("save", saves), ("load (resume)", loads)):
        local, s3 = stats(runs["local disk"]), stats(runs["S3 (moto, loopback)"])
        rows.append([what, fmt(local), fmt(s3), fmt(ratio(runs["S3 (moto, loopback)"], runs["local disk"])),
                     f"{ceiling * 1000:.1f} ms"])
    table = md_table(["one demo checkpoint", "local disk (s)", "S3 on loopback (s)", "S3 / local",
                      f"memcpy floor ({size / 1e6:.1f} MB x 2)"], rows)
    write_result("storage_checkpoint", {"bytes": size, "saves": saves, "loads": loads}, table)


def _files(store, ckpt):
    import json

    return json.loads(store.remote.read_bytes(f"{ckpt}/manifest.json"))["files"]


if __name__ == "__main__":
    main()
