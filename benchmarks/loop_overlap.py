"""The loop in three modes, side by side: sequential rewards, streamed rewards, streamed + one-step off-policy.

Two configs, each the demo config (configs/shapes-tiny.yaml) with checkpoints and grids out of the timed steps:
  (a) demo: its rewards (the strict verifier + 0.25 x partial credit) in the Serve reward service;
  (b) latency-bound: the same two rewards computed by a local HTTP scorer (this process) that waits 200 ms per
      request before answering, reached through the `http` reward (4 service replicas), as a judge on remote GPUs
      would be.
The modes run one after another, interleaved (a-seq, a-stream, a-off, b-seq, ...; `--rounds` times), each a fresh
Driver on one local Ray: `--warmup` untimed steps, then `--steps` timed steps (steps per minute from the wall time
of those steps), then the held-out verifier score of the learner's weights (480 images, 95% Wilson interval; the
same (prompt, seed) pairs for every mode).

    .venv/bin/python benchmarks/loop_overlap.py [--steps 12] [--warmup 2] [--rounds 1]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from common import ROOT, fmt, md_table, start_ray, stats, write_result

from core.config import load_config
from rewards.builtin import VerifierReward
from rewards.wire import parse_request
from rl.config import RunConfig
from rl.driver import Driver

MODES = {"sequential": ["loop.stream_rewards=false"], "streamed": ["loop.stream_rewards=true"],
         "one-step off": ["loop.stream_rewards=true", "loop.off_policy_steps=1"]}
LATENCY_S = 0.2
GOALS = {"streamed": 1.3, "one-step off": 1.5}  # on (b), vs sequential


class SlowScorer(BaseHTTPRequestHandler):
    """POST a batch -> {"score": strict + 0.25 partial, "strict": ..., "partial": ...} after LATENCY_S."""
    strict, partial = VerifierReward("strict"), VerifierReward("partial")
    requests = 0

    def do_POST(self):  # noqa: N802
        batch = parse_request(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(LATENCY_S)
        s = self.strict(batch.images, batch.prompts, batch.metadata)["score"]
        p = self.partial(batch.images, batch.prompts, batch.metadata)["score"]
        body = json.dumps({"score": [a + 0.25 * b for a, b in zip(s, p)], "strict": s, "partial": p}).encode()
        SlowScorer.requests += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


def start_scorer() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowScorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/"


def http_rewards(url: str) -> list[str]:
    """(b): the scorer behind the `http` reward; 4 service replicas (a sleeping request needs no CPU), as the
    NextFlow config has, so concurrent requests can wait side by side."""
    return ["rewards.rewards=[{name: http, weight: 1.0, label: judge, kwargs: {url: '%s', timeout_s: 60}}]" % url,
            "rewards.service.replicas=4", "rewards.service.num_cpus=0.1"]


def run_mode(config: str, overrides: list[str], steps: int, warmup: int, runs: str, name: str) -> dict:
    cfg = load_config(RunConfig, ROOT / "configs/shapes-tiny.yaml", [
        f"runs_dir={runs}", f"name={name}", f"steps={steps + warmup}", "checkpoint.every=1000",
        "logging.grid_every=1000", "logging.wandb=disabled", *overrides])
    driver = Driver(cfg)
    state, ckpt = driver._prepare_run_dir()
    try:
        driver._start(state, ckpt)
        for _ in range(warmup):
            driver.step(state)
        t = time.perf_counter()
        for _ in range(steps):
            driver.step(state)
        wall = time.perf_counter() - t
        score = driver.evaluate(driver.export_policy("eval_policy"), "after", state.step)
    finally:
        driver.shutdown()
    return {"config": config, "steps_per_min": 60 * steps / wall, "wall_s": wall,
            "heldout": score["overall"], "ci": score["ci"]["overall"]}


def table(records: list[dict]) -> str:
    rows = []
    for config in ("a", "b"):
        rate = {m: stats([r["steps_per_min"] for r in records if r["config"] == config and r["mode"] == m])
                for m in MODES}
        for mode in MODES:
            r = [x for x in records if x["config"] == config and x["mode"] == mode][-1]
            ratio = rate[mode]["median"] / rate["sequential"]["median"]
            goal = GOALS.get(mode) if config == "b" else None
            cell = "-" if goal is None else (f"met (>= {goal})" if ratio >= goal else f"MISSED (>= {goal})")
            rows.append([{"a": "(a) demo", "b": "(b) 200 ms judge"}[config], mode, fmt(rate[mode], 3),
                         f"{ratio:.2f}", cell, f"{r['heldout']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"])
    return md_table(["config", "mode", "steps / min, median (min-max)", "vs sequential", "goal",
                     "held-out strict after"], rows)


def markdown(records: list[dict], steps: int, warmup: int, rounds: int) -> str:
    return table(records) + (f"\n{steps} timed steps after {warmup} warm-up steps per mode, {rounds} round(s); "
                             "held-out: 480 images, the same (prompt, seed) pairs for every mode.\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    start_ray()
    url = start_scorer()
    records = []
    with tempfile.TemporaryDirectory() as runs:
        for rnd in range(args.rounds):
            for config, extra in (("a", []), ("b", http_rewards(url))):
                for mode, over in MODES.items():
                    name = f"overlap-{config}-{mode.replace(' ', '-')}-{rnd}"
                    rec = run_mode(config, extra + over, args.steps, args.warmup, runs, name) | {"mode": mode}
                    print(json.dumps(rec), flush=True)
                    records.append(rec)
    write_result("loop_overlap", {"records": records, "latency_s": LATENCY_S, "steps": args.steps,
                                  "warmup": args.warmup, "rounds": args.rounds},
                 markdown(records, args.steps, args.warmup, args.rounds))


if __name__ == "__main__":
    main()
