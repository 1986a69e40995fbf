"""Atomic run checkpoints: RUN/checkpoints/step_XXXXXX/{learner/, driver_state.json}.

A checkpoint is written into a hidden temporary folder, fsynced, and swapped into place (core.atomic.atomic_dir:
an old folder of the same step is removed only after the new one is in place); `driver_state.json` is written
last, so a folder without it is never picked up. The last K are kept.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from core.atomic import atomic_dir

if TYPE_CHECKING:
    import torch

STATE = "driver_state.json"


def _remove(path: Path) -> None:
    """Delete a checkpoint folder so that no crash midway can leave a loadable-looking half: rename, then delete."""
    trash = path.with_name(f".trash-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, state: dict, write_learner: Callable[[Path], None], keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for leftover in [*root.glob(".step_*"), *root.glob(".t*-step_*")]:  # temporaries / trash of a killed process
        shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step_{step:06d}"
    with atomic_dir(final) as tmp:
        write_learner(tmp / "learner")
        (tmp / STATE).write_text(json.dumps(state, indent=1))   # last; atomic_dir fsyncs the tree before the swap
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


def check_learner_checkpoint(path: str | Path, expected: dict[str, torch.Tensor] | None = None) -> Path:
    """Check a DeepSpeed learner checkpoint folder (RUN/checkpoints/step_*/learner) before anything loads it.

    Reads the `latest` tag, checks every `*.pt` under the tag is an intact torch archive (zip CRCs, nothing
    unpickled), then opens the model states with `torch.load(weights_only=True)`; with `expected` (name -> tensor,
    e.g. `trainable_state(model)`) every tensor's name and shape must match. A problem is one line naming the file.
    Returns the model-states file.
    """
    import torch  # here, not at the top: saving and listing checkpoints needs no torch (a killed writer starts fast)

    root = Path(path)
    tag_file = root / "latest"
    try:
        tag = tag_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{tag_file}: unreadable checkpoint tag ({type(e).__name__})") from None
    if not tag or "/" in tag or tag in (".", ".."):
        raise ValueError(f"{tag_file}: bad checkpoint tag {tag[:50]!r}")
    files = sorted((root / tag).glob("*.pt"))
    states = root / tag / "mp_rank_00_model_states.pt"
    if states not in files:
        raise ValueError(f"{states}: model states missing")
    for f in files:
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"{f}: truncated or not a torch checkpoint ({type(e).__name__}: {e})") from None
        if bad is not None:
            raise ValueError(f"{f}: corrupt entry {bad} (CRC mismatch)")
    try:
        blob = torch.load(states, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / ... for damaged archives
        raise ValueError(f"{states}: unreadable model states ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    module = blob.get("module") if isinstance(blob, dict) else None
    if not isinstance(module, dict) or not all(isinstance(v, torch.Tensor) for v in module.values()):
        raise ValueError(f"{states}: no 'module' state dict of tensors")
    if expected is not None:
        own = {k.removeprefix("model."): v for k, v in module.items()}
        missing = sorted(set(expected) - set(own))
        if missing:
            raise ValueError(f"{states}: missing tensor {missing[0]} ({len(missing)} missing in all)")
        for k, v in expected.items():
            if tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"{states}: tensor {k} has shape {tuple(own[k].shape)}, the model expects "
                                 f"{tuple(v.shape)}")
    return states
