"""nextscale-rl command line.

    python -m rl train CONFIG [key.sub=value ...]          run prefix-GRPO (resume=true continues a run)
    python -m rl eval  POLICY_DIR [key.sub=value ...]      held-out verifier score per category + PNG grid
    python -m rl scale RUN --rollout-workers N [--address ADDR]   resize a live run's rollout pool
"""
from __future__ import annotations

import argparse
import json
import sys


def cmd_train(argv: list[str]) -> int:
    from core.config import ConfigError, load_config
    from rl.config import RunConfig

    if not argv:
        print("usage: python -m rl train CONFIG [key.sub=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(RunConfig, argv[0], argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from rl.driver import Driver, RunFailed

    try:
        summary = Driver(cfg).run()
    except ValueError as e:  # run-level input errors found at start-up (existing run, bad prompts, ...)
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except RunFailed as e:  # a fault the run cannot ride out; everything up to the last checkpoint is intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "eval_after" in summary:
        from policy.evaluate import format_scores

        print(f"held-out score before: {format_scores(summary['eval_before'])}")
        print(f"held-out score after:  {format_scores(summary['eval_after'])}")
        for key, d in summary.get("paired", {}).items():
            print(f"paired change ({key}, {d['n']} images, same prompts and seeds): {d['diff']:+.3f} "
                  f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (gained {d['gained']}, lost {d['lost']})")
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("eval")}))
    return 0


def cmd_scale(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m rl scale")
    ap.add_argument("run")
    ap.add_argument("--rollout-workers", type=int, required=True)
    ap.add_argument("--address", default="auto")
    args = ap.parse_args(argv)
    from rl.control import scale

    try:
        n = scale(args.run, args.rollout_workers, args.address)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run {args.run}: rollout workers -> {n}")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "eval", "scale"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if argv[0] == "train":
        return cmd_train(argv[1:])
    if argv[0] == "scale":
        return cmd_scale(argv[1:])
    from policy.evaluate import main as eval_main

    return eval_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
