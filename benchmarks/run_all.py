"""Run the CPU benchmark set one script after another (never two at once), then paste every
benchmarks/results/NAME.md into README.md between its `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers.

    .venv/bin/python benchmarks/run_all.py                    # the whole CPU set (~15-25 min on 2 shared cores)
    .venv/bin/python benchmarks/run_all.py kv_cache weight_sync   # some of them
    .venv/bin/python benchmarks/run_all.py --readme-only      # only refresh the README tables
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from core.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
CPU_SET = ["sampling_speed", "kv_cache", "prefix_learner", "sampler_efficiency", "reward_batching", "weight_sync",
           "weight_sync --paths", "step_breakdown", "rollout_scaling", "storage_checkpoint"]  # "script [args]"


def update_readme(readme: Path = README, results: Path = HERE / "results") -> list[str]:
    """Replace the text between each pair of markers with results/NAME.md; returns the names updated."""
    text, done = readme.read_text(), []
    for md in sorted(results.glob("*.md")):
        name = md.stem
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + md.read_text() + m.group(2), text)
            done.append(name)
    atomic_write_text(readme, text)
    return done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=CPU_SET)
    ap.add_argument("--readme-only", action="store_true")
    args = ap.parse_args()
    failed = []
    for name in [] if args.readme_only else args.names:
        t = time.perf_counter()
        print(f"=== {name}", flush=True)
        script, *extra = name.split()
        if subprocess.run([sys.executable, str(HERE / f"{script}.py"), *extra], cwd=HERE.parent).returncode:
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - t:.0f} s", flush=True)
    print("README tables updated:", ", ".join(update_readme()) or "none")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
