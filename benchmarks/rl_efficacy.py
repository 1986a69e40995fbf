"""Does prefix-GRPO make the shipped tiny policy better? The long run (3 seeds) and the m-ablation (with VMR).

Every run is a real `python -m rl train` (local Ray, Serve reward service, DeepSpeed learner) of
configs/shapes-efficacy.yaml (or `--config PATH`) with the held-out evaluation (policy.evaluate: 96 images per
category, the same (prompt, seed) pairs at every evaluation) every `eval.every` steps. Figures carry 95% Wilson
intervals; a difference whose intervals overlap is reported as no difference.

    .venv/bin/python benchmarks/rl_efficacy.py long     [--seeds 0 1 2] [--steps 150] [--eval-every 25]
    .venv/bin/python benchmarks/rl_efficacy.py long --config configs/shapes-long.yaml --seeds 0
                                                       (its own steps and eval.every; results rl_efficacy_shapes-long*)
    .venv/bin/python benchmarks/rl_efficacy.py ablation [--ms 2 3 4 5 6] [--vmr-m 2] [--steps 100] [--seeds 0]
    .venv/bin/python benchmarks/rl_efficacy.py ablation --config configs/shapes-tiny-m6.yaml --steps 220 --vmr-m 0 \\
        --seeds 0 1 2          (runs ablation-STEM-mM-seedS, or the long run at the config's own m; rl_ablation_STEM*)
    .venv/bin/python benchmarks/rl_efficacy.py report   (tables and plots again from the finished runs)
    .venv/bin/python benchmarks/rl_efficacy.py compare --config configs/shapes-tiny-pods.yaml \\
        --against configs/shapes-tiny.yaml --seeds 0 1 2   (finished long runs of two configs, after vs after)

Runs go to runs/efficacy/NAME; tables, JSON and PNGs to benchmarks/results/rl_efficacy* and rl_ablation*.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import OUT, ROOT, md_table, write_result

from core.atomic import atomic_write_text
from policy.evaluate import paired_difference, wilson_interval
from shapes.world import CATEGORIES

CONFIG = ROOT / "configs" / "shapes-efficacy.yaml"
RUNS = ROOT / "runs" / "efficacy"
KEYS = ["overall", *CATEGORIES]


def train(name: str, overrides: list[str], config: Path = CONFIG) -> dict:
    """One `rl train` run (skipped when its summary exists); returns its record: evals, metrics, wall time."""
    run_dir = RUNS / name
    if not (run_dir / "summary.json").exists():
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "rl", "train", str(config), f"name={name}", f"runs_dir={RUNS}", *overrides]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        atomic_write_text(run_dir / "wall_seconds.txt", f"{time.perf_counter() - t:.1f}\n")
    return load_run(run_dir)


def load_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = [json.loads(line) for line in (run_dir / "eval_curve.jsonl").read_text().splitlines() if line.strip()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "reward/mean" in m]
    cpu = [m["learner/cpu_seconds"] for m in steps if "learner/cpu_seconds" in m]
    wall = run_dir / "wall_seconds.txt"
    return {"name": run_dir.name, "before": summary["eval_before"], "after": summary["eval_after"], "curve": curve,
            "reward": [(m["step"], m["reward/mean"]) for m in steps],
            "learner_cpu_s": sum(cpu) / max(1, len(cpu)), "step_s": sum(m["time/step"] for m in steps) / len(steps),
            "wall_s": float(wall.read_text()) if wall.exists() else float("nan")}


def pooled(results: list[dict], key: str) -> tuple[float, float, float]:
    """Rate and 95% Wilson interval of `key` over the images of several evaluations pooled together."""
    k = sum(round(r[key] * r["counts"][key]) for r in results)
    n = sum(r["counts"][key] for r in results)
    lo, hi = wilson_interval(k, n)
    return k / n, lo, hi


def paired_over(pairs: list[tuple[Path, Path]], key: str) -> dict:
    """Paired change of the per-image verdict `key` from each pair's first scores.json to its second (the same
    (prompt, seed) pairs), pooled over all pairs."""
    first, second = [], []
    for a, b in pairs:
        x, y = (json.loads(p.read_text())["per_image"] for p in (a, b))
        if [(r["prompt"], r["seed"]) for r in x] != [(r["prompt"], r["seed"]) for r in y]:
            raise ValueError(f"{a} and {b} judged different (prompt, seed) pairs")
        first += [r[key] for r in x]
        second += [r[key] for r in y]
    return paired_difference(first, second)


def pooled_paired(runs: list[dict], key: str) -> dict:
    """Paired change of the per-image verdict `key` (after - before, same prompts and seeds) over all runs' images."""
    return paired_over([tuple(RUNS / r["name"] / f"eval_{t}" / "scores.json" for t in ("before", "after"))
                        for r in runs], key)


def compare(config: Path, against: Path, seeds: list[int], against_tag: str = "after") -> None:
    """The finished long runs of `config` (after) against those of `against` (after, or with against_tag "before"
    their starting policy: the whole recipe against another base), seed by seed on the same (prompt, seed) pairs
    (a run's evaluation pairs follow its seed), pooled over the seeds."""
    names = {str(c): [f"long{stem_of(c)}-seed{s}" for s in seeds] for c in (against, config)}
    pairs = [(RUNS / a / f"eval_{against_tag}" / "scores.json", RUNS / c / "eval_after" / "scores.json")
             for a, c in zip(names[str(against)], names[str(config)])]
    judges = ("strict", "template")
    paired = {k: paired_over(pairs, k) for k in judges}
    rows = [[f"seed {s}"] + [paired_cell(paired_over([p], k)) for k in judges] for s, p in zip(seeds, pairs)]
    rows.append([f"pooled, {len(seeds)} seeds"] + [paired_cell(paired[k]) for k in judges])
    table = (f"`{config.name}` after vs `{against.name}` {against_tag}, the same held-out (prompt, seed) pairs "
             f"(paired, 95% interval):\n\n" + md_table(["seeds", "strict", "template judge"], rows))
    write_result(compare_name(config, against, against_tag),
                 {"config": str(config), "against": str(against), "against_tag": against_tag, "seeds": seeds,
                  "runs": names, "paired": paired}, table)


def compare_name(config: Path, against: Path, against_tag: str = "after") -> str:
    """Result file of `compare`: rl_compare_A_vs_B, with _before when B's starting policy is the reference."""
    name = f"rl_compare{stem_of(config).replace('-', '_', 1)}_vs{stem_of(against).replace('-', '_', 1)}"
    return name + ("_before" if against_tag == "before" else "")


def diff_cell(d: dict) -> str:
    """A paired_difference result as 'diff [lo, hi]'."""
    return f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def paired_cell(d: dict) -> str:
    """A paired_difference result as 'diff [lo, hi] (G gained, L lost)'."""
    return f"{diff_cell(d)} ({d['gained']} gained, {d['lost']} lost)"


def cell(rate: float, lo: float, hi: float) -> str:
    return f"{rate:.3f} [{lo:.3f}, {hi:.3f}]"


def verdict(before: tuple, after: tuple) -> str:
    if after[1] > before[2]:
        return "better"
    if after[2] < before[1]:
        return "worse"
    return "no difference (intervals overlap)"


# ------------------------------------------------------------------------------------------------ long run
def long_run(seeds: list[int], steps: int | None, eval_every: int | None, config: Path = CONFIG) -> None:
    """configs/shapes-efficacy.yaml: runs long-seedS, results rl_efficacy*; another config (its own steps and
    eval.every unless given): runs long-STEM-seedS, results rl_efficacy_STEM*."""
    stem = stem_of(config)
    given = [f"steps={steps}"] * (steps is not None) + [f"eval.every={eval_every}"] * (eval_every is not None)
    runs = [train(f"long{stem}-seed{s}", [f"seed={s}", *given], config) for s in seeds]
    steps = runs[0]["reward"][-1][0]
    rows = []
    for label, part in ((f"before ({base_label(config)})", "before"), (f"after {steps} steps", "after")):
        rows.append([label] + [cell(*pooled([r[part] for r in runs], k)) for k in KEYS]
                    + [cell(*pooled([r[part]["template"] for r in runs], "overall"))])
    b, a = pooled([r["before"] for r in runs], "overall"), pooled([r["after"] for r in runs], "overall")
    paired = {k: pooled_paired(runs, k) for k in ("strict", "template")}
    per_seed = [[r["name"], cell(*pooled([r["before"]], "overall")), cell(*pooled([r["after"]], "overall")),
                 f"{r['after']['overall'] - r['before']['overall']:+.3f}", f"{r['wall_s'] / 60:.1f}"] for r in runs]
    table = (f"Held-out strict score, {len(seeds)} seeds x {runs[0]['after']['num_images']} images pooled "
             f"(95% Wilson intervals); last column: the template-overlap judge (not the training reward).\n\n"
             + md_table(["policy", *KEYS, "template judge"], rows)
             + f"\nMean gain {a[0] - b[0]:+.3f}: {verdict(b, a)}. Paired over the same {paired['strict']['n']} "
             + "(prompt, seed) pairs: " + "; ".join(f"{k} {paired_cell(d)}" for k, d in paired.items()) + ".\n\n"
             + md_table(["run", "before", "after", "gain", "wall min"], per_seed))
    out = result_name("rl_efficacy", config)
    plot_long(runs, OUT / f"{out}.png")
    write_result(out, {"runs": runs, "before": b, "after": a, "paired": paired}, table)


def moving_average(xs, window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    return [sum(xs[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(xs))]


def plot_long(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        pts = [(0, r["before"])] + [(c["step"], c) for c in r["curve"]]
        xs = [s for s, _ in pts]
        ax1.plot(xs, [c["overall"] for _, c in pts], marker="o", label=r["name"])
        ax1.fill_between(xs, [c["ci"]["overall"][0] for _, c in pts], [c["ci"]["overall"][1] for _, c in pts],
                         alpha=0.15)
        steps, reward = zip(*r["reward"])
        line, = ax2.plot(steps, reward, alpha=0.3)
        ax2.plot(steps, moving_average(reward, 10), color=line.get_color(), label=f"{r['name']} (10-step mean)")
    ax1.set(xlabel="step", ylabel="held-out strict overall (95% CI)", title="held-out score")
    ax2.set(xlabel="step", ylabel="mean training reward", title="reward curve")
    ax1.legend(), ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------------ m-ablation
def ablation_run(m: int, steps: int, seed: int, base: list[str], config: Path = CONFIG) -> dict:
    """The config's own m at a step its long run (same seed) evaluated is that long run cut there (the evaluations
    between steps do not change training: rollout seeds belong to units), so it is not run twice."""
    long_dir = RUNS / f"long{stem_of(config)}-seed{seed}"
    if m == own_m(config) and (long_dir / "summary.json").exists():
        run = load_run(long_dir)
        at = [c for c in run["curve"] if c["step"] == steps]
        if at:
            cpu = [json.loads(x) for x in (long_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
            cpu = [r["learner/cpu_seconds"] for r in cpu if "learner/cpu_seconds" in r and r["step"] <= steps]
            return run | {"after": at[-1], "learner_cpu_s": sum(cpu) / len(cpu), "after_dir": f"eval_{at[-1]['tag']}",
                          "wall_s": run["wall_s"] * steps / len(run["reward"])}
    return train(f"ablation{stem_of(config)}-m{m}-seed{seed}", base + [f"m={m}"], config)


def base_label(config: Path) -> str:
    """How the long-run table names the starting policy: "shipped policy", or the config's policy_path."""
    path = yaml.safe_load(config.read_text()).get("policy_path", "checkpoints/shapes-tiny/policy")
    return "shipped policy" if path == "checkpoints/shapes-tiny/policy" else f"`{path}`"


def own_m(config: Path) -> int:
    return int(yaml.safe_load(config.read_text())["m"])


def stem_of(config: Path) -> str:
    """'' for configs/shapes-efficacy.yaml, else '-STEM': run names and result files of another config."""
    return "" if config == CONFIG else f"-{config.stem}"


def result_name(prefix: str, config: Path) -> str:
    """rl_efficacy / rl_ablation for the default config, else PREFIX_STEM (the results of another config)."""
    return prefix + stem_of(config).replace("-", "_", 1)


def scores(run: dict, tag: str) -> Path:
    """A run's scores.json of evaluation `tag` ('before', or 'after': the arm's final evaluation)."""
    part = run.get("after_dir", "eval_after") if tag == "after" else "eval_before"
    return RUNS / run["name"] / part / "scores.json"


def ablation(ms: list[int], vmr_m: int | None, steps: int, seeds: list[int], config: Path = CONFIG) -> None:
    """Every m (and m = vmr_m with VMR) at the same steps and seeds; per arm the held-out score pooled over the seeds,
    the paired gain over the shipped policy and against full GRPO (after vs after, the same pairs), learner CPU."""
    stem, base = stem_of(config), [f"steps={steps}", "eval.every=0"]
    arms = [(f"m={m}" + (" (full GRPO)" if m == max(ms) else ""),
             [ablation_run(m, steps, s, base + [f"seed={s}"], config) for s in seeds]) for m in ms]
    if vmr_m:
        arms.append((f"m={vmr_m} + VMR (K=2, eta=1)",
                     [train(f"ablation{stem}-m{vmr_m}-vmr-seed{s}",
                            base + [f"seed={s}", f"m={vmr_m}", "vmr.k=2", "vmr.eta=1.0"], config) for s in seeds]))
    full = arms[ms.index(max(ms))][1]
    full_cpu = sum(r["learner_cpu_s"] for r in full) / len(full)
    rows = [["shipped policy", cell(*pooled([r["before"] for r in full], "overall"))] + [""] * 6]
    per_seed = []
    for label, runs in arms:
        gain = {k: paired_over([(scores(r, "before"), scores(r, "after")) for r in runs], k)
                for k in ("strict", "template")}
        vs_full = "" if runs is full else diff_cell(paired_over(
            [(scores(f, "after"), scores(r, "after")) for f, r in zip(full, runs)], "strict"))
        cpu = sum(r["learner_cpu_s"] for r in runs) / len(runs)
        rows.append([label, cell(*pooled([r["after"] for r in runs], "overall")), diff_cell(gain["strict"]),
                     diff_cell(gain["template"]), vs_full, f"{cpu:.2f}", f"{cpu / full_cpu:.2f}",
                     f"{sum(r['wall_s'] for r in runs) / len(runs) / 60:.1f}"])
        per_seed.append([label] + [diff_cell(paired_over([(scores(r, "before"), scores(r, "after"))], "strict"))
                                   for r in runs])
    n = sum(r["after"]["num_images"] for r in full)
    table = (f"m-ablation{f' ({config.name})' * bool(stem)}: {steps} steps, seeds {', '.join(map(str, seeds))}, "
             f"the same prompts and seeds for every m; held-out strict overall pooled over {n} images (95% Wilson "
             "intervals); paired changes over the same (prompt, seed) pairs (95% intervals); learner CPU-s and wall "
             "minutes are means over the seeds.\n\n"
             + md_table(["run", "held-out strict", "paired gain vs shipped", "template judge gain",
                         "vs full GRPO (after vs after)", "learner CPU-s / step", "vs full", "wall min"], rows)
             + "\nPaired strict gain over the shipped policy, seed by seed:\n\n"
             + md_table(["run", *(f"seed {s}" for s in seeds)], per_seed))
    if vmr_m in ms:
        plain, vmr = arms[ms.index(vmr_m)][1], arms[-1][1]
        d = paired_over([(scores(a, "after"), scores(b, "after")) for a, b in zip(plain, vmr)], "strict")
        table += f"\nm={vmr_m} + VMR after vs m={vmr_m} after, the same pairs: {paired_cell(d)}.\n"
    out = result_name("rl_ablation", config)
    plot_ablation(arms, OUT / f"{out}.png")
    write_result(out, {"seeds": seeds, "runs": dict(arms)}, table)


def plot_ablation(arms: list[tuple[str, list[dict]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in arms:
        rate, lo, hi = pooled([r["after"] for r in runs], "overall")
        cpu = sum(r["learner_cpu_s"] for r in runs) / len(runs)
        ax.errorbar(cpu, rate, yerr=[[rate - lo], [hi - rate]], fmt="o", capsize=3, label=label)
    rate, lo, hi = pooled([r["before"] for r in arms[0][1]], "overall")
    ax.axhspan(lo, hi, color="grey", alpha=0.2, label="shipped policy (95% CI)")
    ax.set(xlabel="learner CPU-seconds per step", ylabel="held-out strict overall (seeds pooled)",
           title="prefix length m")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["long", "ablation", "report", "compare"])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (long), 0 (ablation)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--config", type=Path, default=CONFIG, help="the runs' config (default: shapes-efficacy)")
    ap.add_argument("--against", type=Path, default=None, help="compare: the other config's finished long runs")
    ap.add_argument("--against-tag", choices=["after", "before"], default="after",
                    help="compare: the --against runs' final policy (after) or their starting policy (before)")
    ap.add_argument("--ms", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    ap.add_argument("--vmr-m", type=int, default=2, help="m of the VMR row (0: no VMR row)")
    args = ap.parse_args()
    config = args.config.resolve()
    default = config == CONFIG
    if args.mode in ("long", "report"):
        long_run(args.seeds or [0, 1, 2], args.steps or (150 if default else None),
                 args.eval_every or (25 if default else None), config)
    if args.mode == "compare":
        if args.against is None:
            ap.error("compare: --against CONFIG is required (the config whose finished long runs to compare with)")
        compare(config, args.against.resolve(), args.seeds or [0, 1, 2], args.against_tag)
    if args.mode in ("ablation", "report"):
        ablation(args.ms, args.vmr_m, args.steps or 100, args.seeds or [0], config)


if __name__ == "__main__":
    main()
