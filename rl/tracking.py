"""What a run shows: metrics JSONL (flushed every step), wandb (offline by default), PNG grids, a reward curve."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from core.atomic import atomic_write_bytes, atomic_write_text
from core.config import redact_secrets
from policy.images import save_grid


class Tracker:
    def __init__(self, run_dir: Path, name: str, project: str, mode: str, run_id: str | None, config: dict,
                 resume_step: int = 0):
        """resume_step: rows logged after this step (by a run that died before its next checkpoint) are dropped."""
        self.run_dir = Path(run_dir)
        self.history = [r for r in load_history(self.run_dir) if r["step"] <= resume_step]
        path = atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        self.file = open(path, "a")  # then appends, flushed and fsynced every step
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
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return atomic_write_bytes(self.run_dir / "reward_curve.png", buf.getvalue())

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
