"""Weight sync: bytes and time to bring a new weight version to 2 rollout workers, full model vs LoRA adapters.

Each side is a RolloutPool of 2 RolloutWorkers (the driver's path: `pool.broadcast(version, state)` puts the state
in the object store once and waits until both workers have loaded it). Full: every weight of the transformer;
LoRA: the adapters only (r = 8 on the 7 Qwen2 linears, `policy.weights.LoraSettings()` defaults). Measured for the
shipped tiny policy and the small 12-scale model; the bytes also for the Qwen2.5-7B-shaped NextFlow model (counted
on the meta device, bf16). Goal: adapters <= 2 % of the bytes.

    .venv/bin/python benchmarks/weight_sync.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from common import (fmt, goal_cell, human_bytes, interleaved, md_table, policy_dir, qwen7b_config, ratio,
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worlds", nargs="+", default=["tiny", "256"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    start_ray()
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
