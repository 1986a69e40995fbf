"""What a run shows: metrics JSONL (flushed every step), wandb (offline by default), PNG grids, a reward curve."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from policy.images import save_grid


SECRET_WORDS = {"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "AUTH"}


def env_secrets(env=None) -> dict[str, str]:
    """name -> value of the environment variables that look like secrets (WANDB_API_KEY, HF_TOKEN, ...): a part of
    the name between underscores is one of SECRET_WORDS (not TOKENIZERS_PARALLELISM); values under 6 characters
    are left alone."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if SECRET_WORDS & set(k.upper().split("_")) and len(v) >= 6}


def redact_secrets(obj, env=None):
    """A copy of a JSON-able structure where every string holding a secret env var's value shows its name instead.

    Config dumps (RUN/config.yaml, wandb's config) go through this: a key passed on the command line or written
    into a config as a literal never reaches the run directory.
    """
    secrets = env_secrets(env)
    if not secrets:
        return obj

    def walk(x):
        if isinstance(x, str):
            for name, value in secrets.items():
                x = x.replace(value, f"<${name}>")
            return x
        if isinstance(x, dict):
            return {walk(k): walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return x
    return walk(obj)


class Tracker:
    def __init__(self, run_dir: Path, name: str, project: str, mode: str, run_id: str | None, config: dict,
                 resume_step: int = 0):
        """resume_step: rows logged after this step (by a run that died before its next checkpoint) are dropped."""
        self.run_dir = Path(run_dir)
        self.history = [r for r in load_history(self.run_dir) if r["step"] <= resume_step]
        path = self.run_dir / "metrics.jsonl"
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, path)
        self.file = open(path, "a")
        self.wandb = None
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            # online: a resumed run continues the same wandb run; offline: each process writes its own offline
            # run (a killed process can leave its run id locked), grouped under the run name
            self.wandb = wandb.init(project=project, name=name, group=name, mode=mode, dir=str(self.run_dir),
                                    config=redact_secrets(config), **({"id": run_id, "resume": "allow"} if mode == "online" else {}))
        self.run_id = run_id or (self.wandb.id if self.wandb else None)

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.wandb:
            self.wandb.log(row, step=step)

    def grid(self, step: int, images: np.ndarray, captions: list[str], tag: str = "samples") -> Path:
        path = save_grid(images, captions, self.run_dir / tag / f"step_{step:06d}.png")
        if self.wandb:
            import wandb

            self.wandb.log({tag: [wandb.Image(img, caption=c) for img, c in zip(images, captions)]}, step=step)
        return path

    def reward_curve(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.history if "reward/mean" in r]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [r["step"] for r in rows]
        for key in sorted({k for r in rows for k in r if k.startswith("reward/") and k.endswith("/mean")}):
            ax.plot(steps, [r.get(key) for r in rows], alpha=0.6, label=key[len("reward/"):-len("/mean")])
        ax.plot(steps, [r["reward/mean"] for r in rows], color="black", lw=2, label="total")
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = self.run_dir / "reward_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        self.file.close()
        if self.wandb:
            self.wandb.finish()


def load_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v
