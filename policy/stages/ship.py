"""Collect the stages' final artefacts into the shipped checkpoint folder, evaluate, and write its README.

    python -m policy.stages.ship [--runs runs/stages] [--out checkpoints/shapes-tiny]

out/policy  (SFT output: transformer + VQ + text tokenizer)   out/clip  (open_clip local-dir)
out/configs (the exact stage configs)   out/metrics.json (final metrics of each stage)
out/eval.json + out/samples.png (held-out verifier scores per category, pretrain vs SFT)
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from core.atomic import atomic_dir

STAGES = {"tokenizer": "shapes-tokenizer", "reward_model": "shapes-clip", "pretrain": "shapes-pretrain",
          "sft": "shapes-sft"}
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "stages"


def copy_artefact(src: Path, dst: Path) -> dict:
    """Copy a stage's final folder without its metrics file; return the metrics."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("metrics.json"))
    return json.loads((src / "metrics.json").read_text())


def collect(runs: Path, out: Path) -> dict:
    """The SFT policy, the CLIP and the stage configs into `out`; return each stage's final metrics."""
    metrics = {"sft": copy_artefact(runs / STAGES["sft"] / "final", out / "policy"),
               "reward_model": copy_artefact(runs / STAGES["reward_model"] / "final", out / "clip")}
    for stage in ("tokenizer", "pretrain"):
        metrics[stage] = json.loads((runs / STAGES[stage] / "final" / "metrics.json").read_text())
    shutil.copytree(CONFIG_DIR, out / "configs")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _cell(result: dict, key: str) -> str:
    lo, hi = result.get("ci", {}).get(key, (float("nan"), float("nan")))
    return f"{result.get(key, float('nan')):.3f} [{lo:.2f}, {hi:.2f}]"


def readme(metrics: dict, scores: dict) -> str:
    """The shipped folder's README: what is here, how to reproduce it, the final metrics and held-out scores."""
    cats = ["overall", "partial", "object", "colour", "count", "two-object", "position"]
    rows = [f"| {name} | " + " | ".join(_cell(scores[name], c) for c in cats)
            + f" | {_cell(scores[name]['template'], 'overall')} |" for name in scores]
    keep = ("step", "loss", "psnr", "recon", "recon_pass", "i2t_acc", "ce/scale1", "ce/scale6")
    stage_rows = [f"| {stage} | " + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k in keep) + " |"
                  for stage, m in metrics.items()]
    return "\n".join([
        "# The shipped tiny shapes checkpoints", "",
        "`policy/` (transformer + multi-scale VQ + word-level text tokenizer; `policy.io.Policy.load`) and `clip/`",
        "(an open_clip `local-dir:` model: `open_clip.create_model('local-dir:checkpoints/shapes-tiny/clip')`).",
        "Reproduce from scratch with `make checkpoints` (the stage configs are copied under `configs/`).", "",
        "## Final stage metrics", "", "| stage | metrics |", "|---|---|", *stage_rows, "",
        "## Held-out verifier score (strict per category; partial = mean fraction of checks passed)", "",
        f"{next(iter(scores.values()))['num_images']} held-out images (96 per category), 95% Wilson intervals; the last "
        "column is the template-overlap judge (not a training reward).", "",
        "| policy | " + " | ".join(cats) + " | template judge |", "|---" * (len(cats) + 2) + "|", *rows, "",
        "`samples.png`: held-out prompts sampled from `policy/` (verdict in brackets).", "",
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m policy.stages.ship", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[-1], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", default="runs/stages", help="the stages' storage (default: %(default)s)")
    ap.add_argument("--out", default="checkpoints/shapes-tiny", help="the shipped folder (default: %(default)s)")
    args = ap.parse_args(argv)
    from policy.evaluate import EvalConfig, evaluate, format_scores, write_report  # after --help: imports torch
    from policy.io import Policy

    runs, out = Path(args.runs), Path(args.out)
    with atomic_dir(out) as tmp:  # built aside; replaces the shipped folder only once complete
        metrics = collect(runs, tmp)
        cfg = EvalConfig()
        scores = {}
        for name, path in (("pretrain", runs / STAGES["pretrain"] / "final"), ("sft", tmp / "policy")):
            result, images, labels = evaluate(Policy.load(path), cfg, desc=f"eval {name}")
            scores[name] = result
            if name == "sft":
                write_report(result, images, labels, tmp, cfg.grid_size)
            print(f"{name}: {format_scores(result)}")
        (tmp / "eval.json").write_text(json.dumps({"eval_config": cfg.model_dump(), **scores}, indent=2))
        (tmp / "scores.json").unlink()
        (tmp / "README.md").write_text(readme(metrics, scores))
    print(f"shipped {out}")


if __name__ == "__main__":
    main()
