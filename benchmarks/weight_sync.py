"""Weight sync: bytes and time to bring a new weight version to 2 rollout workers, full model vs LoRA adapters.

Each side is a RolloutPool of 2 RolloutWorkers (the driver's path: `pool.broadcast(version, state)` puts the state
in the object store once and waits until both workers have loaded it). Full: every weight of the transformer;
LoRA: the adapters only (r = 8 on the 7 Qwen2 linears, `policy.weights.LoraSettings()` defaults). Measured for the
shipped tiny policy and the small 12-scale model; the bytes also for the Qwen2.5-7B-shaped NextFlow model (counted
on the meta device, bf16). Goal: adapters <= 2 % of the bytes.

A second table (`--paths`): the two ways a version reaches the workers (rollout.weight_sync), through Ray's
object store vs over the collective (gloo) group from learner rank 0 (rl/weight_sync.py), the full state of a
52 MB fp32 policy to 2 workers, in bytes per second delivered (state bytes x workers / push seconds), beside the
machine's memcpy bandwidth (every path copies the state at least once per worker).

    .venv/bin/python benchmarks/weight_sync.py [--repeats 5]
    .venv/bin/python benchmarks/weight_sync.py --paths [--repeats 5]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import (fmt, goal_cell, human_bytes, interleaved, md_table, policy_dir, qwen7b_config, rate, ratio,
                    start_ray, stats, update_bytes, write_result)

from policy.io import Policy
from policy.weights import LoraSettings, apply_lora, state_bytes, trainable_state
from rollout.pool import RolloutPool
from rollout.worker import RolloutWorker

GOAL = 0.02


def pool(path: str, lora: dict | None) -> RolloutPool:
    factory = lambda: RolloutWorker.options(num_cpus=0.5).remote(path, {}, 1, lora)  # noqa: E731
    return RolloutPool(factory, 2, min_size=2, max_size=2)


def measure(name: str, root: str, repeats: int) -> dict:
    path = str(policy_dir(name, root))
    lora = LoraSettings()
    model = Policy.load(path).model
    states = {"full": trainable_state(model), "lora": trainable_state(apply_lora(Policy.load(path).model, lora))}
    pools = {"full": pool(path, None), "lora": pool(path, lora.model_dump())}
    version = iter(range(1, 10**6))
    try:
        for p in pools.values():
            p._poll_starting(timeout=120)                       # both workers up before timing
        times = interleaved({k: (lambda k=k: pools[k].broadcast(next(version), states[k])) for k in pools}, repeats)
    finally:
        for p in pools.values():
            p.shutdown()
    size = {k: state_bytes(s) for k, s in states.items()}
    return {"model": name, "bytes": size, "fraction": size["lora"] / size["full"], "seconds": times,
            "sync_s": {k: stats(v) for k, v in times.items()}, "time_ratio": ratio(times["full"], times["lora"])}


def bytes_7b() -> dict:
    """Full vs adapter bytes of the 7B-shaped model on NextFlow's 18-scale schedule, bf16, nothing allocated."""
    b = update_bytes(qwen7b_config())
    return {"model": "7B-shaped, 1024 px (bf16)", "bytes": b, "fraction": b["lora"] / b["full"]}


WIDE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)


def memcpy_bytes_per_s(n: int = 2**26, repeats: int = 5) -> float:
    x = torch.empty(n, dtype=torch.float32)
    secs = interleaved({"copy": lambda: x.clone()}, repeats)["copy"]
    return x.numel() * 4 / stats(secs)["median"]


def measure_paths(root: str, repeats: int) -> dict:
    """Object store vs collective group: the same learner, the same 2 workers, pushes interleaved."""
    from policy.io import PolicyConfig, build_policy
    from rl.config import GRPOLossConfig
    from rl.learner import LearnerGroup
    from rl.strategy import LearnerConfig
    from rl.weight_sync import WeightSync

    path = build_policy(PolicyConfig(backbone=WIDE)).save(Path(root) / "wide")
    learner = LearnerGroup(path, 2, 0.0, GRPOLossConfig(), LearnerConfig(batch_size=2, micro_batch_size=2))
    workers = pool(str(path), None)
    syncs = {k: WeightSync(learner, workers, k, timeout_s=60) for k in ("object_store", "collective")}
    try:
        workers._poll_starting(timeout=120)
        syncs["collective"].push()                                  # the group is built once, outside the timing
        times = interleaved({k: s.push for k, s in syncs.items()}, repeats)
        size = state_bytes(learner.trainable_state())
    finally:
        workers.shutdown()
        learner.shutdown()
    rates = {k: rate(v, 2 * size) for k, v in times.items()}
    return {"bytes": size, "seconds": times, "bytes_per_s": rates, "memcpy_bytes_per_s": memcpy_bytes_per_s(),
            "ratio": ratio(times["object_store"], times["collective"])}


def paths_table(r: dict) -> str:
    row = lambda k: [k, human_bytes(r["bytes"]), fmt(stats(r["seconds"][k])),  # noqa: E731
                     f"{stats(r['bytes_per_s'][k])['median'] / 2**20:.0f} MiB/s"]
    rows = [row("object_store"), row("collective")]
    rows[1].append(f"{fmt(r['ratio'])}x faster")
    rows[0].append(f"memcpy ceiling {r['memcpy_bytes_per_s'] / 2**30:.1f} GiB/s per copy")
    return md_table(["path", "state", "push s (2 workers)", "delivered", "note"], rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worlds", nargs="+", default=["tiny", "256"])
    ap.add_argument("--paths", action="store_true", help="object store vs collective group (rollout.weight_sync)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    start_ray()
    if args.paths:
        with tempfile.TemporaryDirectory() as root:
            r = measure_paths(root, args.repeats)
        write_result("weight_sync_paths", r, paths_table(r))
        return
    with tempfile.TemporaryDirectory() as root:
        results = [measure(w, root, args.repeats) for w in args.worlds]
    results.append(bytes_7b())
    rows = [[r["model"], human_bytes(r["bytes"]["full"]), human_bytes(r["bytes"]["lora"]),
             f"{100 * r['fraction']:.2f} %",
             fmt(r["sync_s"]["full"]) if "sync_s" in r else "-", fmt(r["sync_s"]["lora"]) if "sync_s" in r else "-",
             fmt(r["time_ratio"]) if "sync_s" in r else "-", goal_cell(100 * r["fraction"], 100 * GOAL, "<=", " %")]
            for r in results]
    table = md_table(["model", "full bytes", "LoRA bytes", "LoRA / full", "full sync s (2 workers)",
                      "LoRA sync s (2 workers)", "time ratio", "goal (bytes)"], rows)
    write_result("weight_sync", {"goal": GOAL, "lora": LoraSettings().model_dump(), "results": results}, table)


if __name__ == "__main__":
    main()
