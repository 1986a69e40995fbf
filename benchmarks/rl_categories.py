"""Which prompt categories does the training stream learn? Per category of the training prompts, from a finished
run's logged rollouts (runs/efficacy/NAME/rollouts/step_*.parquet): the strict reward of the first and the last
window of steps (95% Wilson), and the share of groups (one prompt's G samples) with at least one strict success:
a group without one gives the strict term no gradient (its advantages come from the partial credit alone); and
the share of the last window's samples passing each of the strict reward's checks (which part is missing).

    .venv/bin/python benchmarks/rl_categories.py --runs long-shapes-long-ema-seed0 runs/trials/NAME [--window 50]

Writes benchmarks/results/rl_categories.{md,json,png}. Reads only the runs' files (seconds).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
from common import OUT, ROOT, md_table, write_result

from policy.evaluate import wilson_interval
from shapes.world import CATEGORIES

RUNS = ROOT / "runs" / "efficacy"


def category_windows(rows: list[tuple[int, str, str, float]], window: int) -> dict[int, dict[str, dict]]:
    """rows: (step, group uid, category, strict reward). Per window of `window` steps (step 1.. -> window 0..) and
    category: samples, successes (strict > 0), groups and groups with any success."""
    out: dict[int, dict[str, dict]] = defaultdict(lambda: defaultdict(lambda: {"n": 0, "hits": 0, "groups": 0,
                                                                              "groups_hit": 0}))
    groups: dict[tuple[int, str, str], bool] = {}
    for step, uid, category, strict in rows:
        cell = out[(step - 1) // window][category]
        cell["n"] += 1
        cell["hits"] += int(strict > 0)
        key = ((step - 1) // window, category, f"{step}/{uid}")
        groups[key] = groups.get(key, False) or strict > 0
    for (w, category, _), hit in groups.items():
        out[w][category]["groups"] += 1
        out[w][category]["groups_hit"] += int(hit)
    return {w: dict(cats) for w, cats in out.items()}


def first_and_last(rows: list[tuple[int, str, str, float]], window: int) -> tuple[dict, dict]:
    """The categories of the first `window` steps and of the last `window` steps (the last step's, backwards)."""
    last = max(r[0] for r in rows)
    tail = [(step - (last - window), *rest) for step, *rest in rows if step > last - window]
    return category_windows([r for r in rows if r[0] <= window], window)[0], category_windows(tail, window)[0]


CHECKS = ("object", "colour", "count", "two-object", "position", "only")


def check_rates(rows: list[tuple[str, dict[str, float | None]]]) -> dict[str, dict[str, float]]:
    """rows: (category, {check: 1.0 / 0.0, or None / NaN where the check does not apply}). Per category, the share
    of samples passing each check that applies to it: which part of a strict success is missing."""
    passed: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for category, checks in rows:
        for name, value in checks.items():
            if value is not None and value == value:  # NaN: the rollout table's "does not apply"
                passed[category][name].append(value)
    return {c: {k: sum(v) / len(v) for k, v in checks.items()} for c, checks in passed.items()}


def read_run(run_dir: Path) -> list[dict]:
    """The run's logged rollouts, one record per sample: step, uid, category, strict (the reward) and checks (the
    strict reward's per-check verdicts, NaN where a check does not apply)."""
    cols = [f"reward/strict/{k}" for k in CHECKS]
    out = []
    for f in sorted((run_dir / "rollouts").glob("step_*.parquet")):
        for r in pq.read_table(f, columns=["step", "uid", "metadata", "reward/strict", *cols]).to_pylist():
            out.append({"step": r["step"], "uid": r["uid"], "category": json.loads(r["metadata"]).get("category", "?"),
                        "strict": r["reward/strict"], "checks": {k: r[c] for k, c in zip(CHECKS, cols)}})
    return out


def rate_cell(c: dict) -> str:
    lo, hi = wilson_interval(c["hits"], c["n"])
    return f"{c['hits'] / c['n']:.3f} [{lo:.3f}, {hi:.3f}]"


def plot(curves: dict[str, dict[int, dict]], window: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (name, wins) in zip(axes[0], curves.items()):
        ws = sorted(wins)
        for category in CATEGORIES:
            ax.plot([(w + 1) * window for w in ws], [wins[w][category]["hits"] / wins[w][category]["n"] for w in ws],
                    marker="o", ms=3, label=category)
        ax.set(title=name, xlabel="step", ylabel="training strict reward", ylim=(0, 1))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run names under runs/efficacy, or run folders")
    ap.add_argument("--window", type=int, default=50, help="steps per window")
    args = ap.parse_args()
    dirs = {Path(name).name: Path(name) if Path(name).is_dir() else RUNS / name for name in args.runs}
    records = {name: read_run(d) for name, d in dirs.items()}
    streams = {name: [(r["step"], r["uid"], r["category"], r["strict"]) for r in recs]
               for name, recs in records.items()}
    curves = {name: category_windows(rows, args.window) for name, rows in streams.items()}
    checks, table_rows = {}, []
    for name, recs in records.items():
        first, last = first_and_last(streams[name], args.window)
        end = max(r["step"] for r in recs)
        checks[name] = check_rates([(r["category"], r["checks"]) for r in recs if r["step"] > end - args.window])
        for category in CATEGORIES:
            a, b = first[category], last[category]
            table_rows.append([name, category, rate_cell(a), rate_cell(b),
                               f"{a['groups_hit'] / a['groups']:.2f} -> {b['groups_hit'] / b['groups']:.2f}",
                               ", ".join(f"{k} {v:.2f}" for k, v in checks[name][category].items())])
    table = (f"Training strict reward by prompt category, first and last {args.window} steps of each run (95% "
             "Wilson), the share of groups with at least one strict success, and the share of the last window's "
             "samples passing each of the strict reward's checks.\n\n"
             + md_table(["run", "category", "first window", "last window", "groups with a success",
                         "checks passed, last window"], table_rows))
    write_result("rl_categories", {"window": args.window, "last_window_checks": checks,
                                   "runs": {n: {str(w): c for w, c in wins.items()} for n, wins in curves.items()}},
                 table)
    plot(curves, args.window, OUT / "rl_categories.png")


if __name__ == "__main__":
    main()
