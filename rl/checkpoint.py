"""Atomic run checkpoints: RUN/checkpoints/step_XXXXXX/{learner/, driver_state.json}.

A checkpoint is written into a hidden temporary folder, fsynced, and renamed into place; `driver_state.json` is
written last, so a folder without it is never picked up. The last K are kept.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

STATE = "driver_state.json"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a checkpoint folder so that no crash midway can leave a loadable-looking half: rename, then delete."""
    trash = path.with_name(f".trash-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, state: dict, write_learner: Callable[[Path], None], keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    for leftover in root.glob(".t*-step_*"):  # temporaries and trash of a process killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        tmp.mkdir()
        write_learner(tmp / "learner")
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        _remove(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_state(ckpt: Path) -> dict:
    path = Path(ckpt) / STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable driver state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: driver state must be a JSON object, got {type(state).__name__}")
    return state
