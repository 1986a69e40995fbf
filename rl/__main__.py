"""nextscale-rl command line (`nextscale ...` once installed, or `python -m rl ...`).

    nextscale train CONFIG [key.sub=value ...] [--print-config]   run prefix-GRPO (resume=true continues a run)
    nextscale eval  POLICY_DIR [key.sub=value ...]                held-out verifier score per category + PNG grid
    nextscale scale RUN --rollout-workers N [--address ADDR]      resize a live run's rollout pool

`nextscale COMMAND --help` lists a command's options and config fields (type, default, description).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

USAGE = """usage:
    {p} train CONFIG [key.sub=value ...] [--print-config]   run prefix-GRPO (resume=true continues a run)
    {p} eval  POLICY_DIR [key.sub=value ...]                held-out verifier score per category + PNG grid
    {p} scale RUN --rollout-workers N [--address ADDR]      resize a live run's rollout pool

`{p} COMMAND --help` lists a command's options and config fields (type, default, description)."""
TRAIN_ABOUT = """Run prefix-GRPO on a local Ray (or the cluster RAY_ADDRESS names). The config is a YAML file;
every field below can be overridden on the command line, e.g. steps=10 rollout.sample.top_k=16."""


def prog() -> str:
    """How the user called us: `nextscale` (the console script) or `python -m rl`."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return "python -m rl" if name in ("__main__.py", "-m", "", "-c") or name.endswith(".py") else name


def cmd_train(argv: list[str]) -> int:
    from core.cli import parse_config_args
    from rl.config import RunConfig

    cfg = parse_config_args(RunConfig, argv, f"{prog()} train CONFIG [key.sub=value ...] [--print-config]",
                            TRAIN_ABOUT)
    if isinstance(cfg, int):
        return cfg
    from rl.driver import Driver, RunFailed

    try:
        summary = Driver(cfg).run()
    except ValueError as e:  # run-level input errors found at start-up (existing run, bad prompts, ...)
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except RunFailed as e:  # a fault the run cannot ride out; everything up to the last checkpoint is intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    if "eval_after" in summary:
        from policy.evaluate import format_scores

        print(f"held-out score before: {format_scores(summary['eval_before'])}")
        print(f"held-out score after:  {format_scores(summary['eval_after'])}")
        for key, d in summary.get("paired", {}).items():
            print(f"paired change ({key}, {d['n']} images, same prompts and seeds): {d['diff']:+.3f} "
                  f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (gained {d['gained']}, lost {d['lost']})")
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("eval")}))


def cmd_scale(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=f"{prog()} scale", description="Resize the rollout pool of a live run.")
    ap.add_argument("run", help="the run's name (or its folder: a path or a storage URI ending in /NAME)")
    ap.add_argument("--rollout-workers", type=int, required=True, help="the new number of rollout workers")
    ap.add_argument("--address", default="auto", help="the Ray cluster the run is on (default: auto)")
    args = ap.parse_args(argv)
    from rl.control import scale

    try:
        n = scale(run_name(args.run), args.rollout_workers, args.address)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run {args.run}: rollout workers -> {n}")
    return 0


def run_name(run: str) -> str:
    """A run's name from its name, its folder or its storage URI (s3://bucket/runs/NAME?endpoint_override=...)."""
    return run.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def cmd_eval(argv: list[str]) -> int:
    """`rl eval POLICY_DIR` where POLICY_DIR may be a storage URI (downloaded to a temporary folder first)."""
    import tempfile

    from policy.evaluate import main as eval_main

    if argv and "://" in argv[0] and not argv[0].startswith("-"):
        from rl.storage import StorageError, open_storage

        with tempfile.TemporaryDirectory(prefix="nextscale-eval-") as tmp:
            try:
                open_storage(argv[0], probe=False).download("", Path(tmp) / "policy")
            except (StorageError, OSError) as e:
                print(f"error: storage: {str(e).splitlines()[0]}", file=sys.stderr)
                return 2
            return eval_main([str(Path(tmp) / "policy"), *argv[1:]], prog=f"{prog()} eval")
    return eval_main(argv, prog=f"{prog()} eval")


def main(argv: list[str]) -> int:
    usage = USAGE.format(p=prog())
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in ("train", "eval", "scale"):
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "train":
        return cmd_train(argv[1:])
    if argv[0] == "scale":
        return cmd_scale(argv[1:])
    return cmd_eval(argv[1:])


def cli() -> None:
    """The `nextscale` console script."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
