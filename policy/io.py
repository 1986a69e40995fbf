"""Weight I/O: strict safetensors loading with clear errors (never a half-loaded model)."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file


def load_state_strict(model: nn.Module, file: str | Path, ignore_missing: set[str] = frozenset()) -> None:
    """Load a safetensors file into `model`; any missing, unexpected or mis-shaped tensor is an error.

    The file is fully read and checked before any parameter is touched.
    """
    file = Path(file)
    if not file.exists():
        raise FileNotFoundError(f"{file}: weights file not found")
    try:
        state = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - set(ignore_missing))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{file}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{file}: tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
