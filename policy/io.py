"""Weight I/O: strict safetensors loading with clear errors (never a half-loaded model)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file

from policy.scales import validate_schedule

if TYPE_CHECKING:
    from policy.tokenizer import MultiScaleVQ
    from policy.transformer import NextScaleLM


M = TypeVar("M", bound=BaseModel)


def read_json_config(file: str | Path, cls: type[M]) -> M:
    """A model's `config.json` -> cls; a missing, non-JSON or invalid file is one line naming the file."""
    from core.config import format_validation_error

    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: config file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable JSON config ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{file}: {format_validation_error(e)}") from None


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
        if (v.dtype.is_floating_point, v.dtype == torch.bool) != (own[k].dtype.is_floating_point, own[k].dtype == torch.bool):
            raise ValueError(f"{file}: tensor {k} has dtype {v.dtype}, model expects {own[k].dtype}")
    model.load_state_dict(state, strict=False)


# ------------------------------------------------------------------------------------------ the policy bundle


class PolicyConfig(BaseModel):
    """Either `path` (a saved policy directory) or the architecture of a fresh, randomly initialised one."""
    model_config = ConfigDict(extra="forbid")
    path: str | None = None
    schedule: list[tuple[int, int]] = [(s, s) for s in (1, 2, 3, 4, 6, 8)]
    vq: dict = {}                 # VQConfig fields other than the schedule
    backbone: dict = {}           # BackboneConfig fields
    seed: int = 0                 # initialisation seed of a fresh policy

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, v):
        return validate_schedule(v)


@dataclass
class Policy:
    """What the policy *is*: the next-scale transformer, the image tokenizer and the text tokenizer."""
    model: "NextScaleLM"
    vq: "MultiScaleVQ"
    tokenizer: object

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        self.model.save_pretrained(path / "transformer")
        self.vq.save_pretrained(path / "vq")
        self.tokenizer.save_pretrained(str(path / "text_tokenizer"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        from policy.text_tokenizer import load_text_tokenizer
        from policy.tokenizer import MultiScaleVQ
        from policy.transformer import NextScaleLM

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"policy.path: {path} is not a policy directory")
        model, vq = NextScaleLM.from_pretrained(path / "transformer"), MultiScaleVQ.from_pretrained(path / "vq")
        try:
            tokenizer = load_text_tokenizer(path / "text_tokenizer")
        except Exception as e:  # transformers raises many types (OSError, ValueError, Exception from tokenizers)
            cause = (str(e).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"{path / 'text_tokenizer'}: not a readable tokenizer ({type(e).__name__}: {cause})") \
                from None
        return cls(model, vq, tokenizer)

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        from policy.text_tokenizer import encode_prompts

        return encode_prompts(self.tokenizer, prompts)


def build_policy(cfg: PolicyConfig) -> Policy:
    """Load `cfg.path`, or build a fresh shapes-world policy (word-level tokenizer, random weights)."""
    if cfg.path:
        return Policy.load(cfg.path)
    import torch

    from policy.text_tokenizer import shapes_tokenizer
    from policy.tokenizer import MultiScaleVQ, VQConfig
    from policy.transformer import BackboneConfig, NextScaleConfig, NextScaleLM

    torch.manual_seed(cfg.seed)
    tok = shapes_tokenizer()
    vq = MultiScaleVQ(VQConfig(schedule=cfg.schedule, **cfg.vq))
    model = NextScaleLM(NextScaleConfig(
        backbone=BackboneConfig(**cfg.backbone), schedule=cfg.schedule, text_vocab_size=len(tok),
        num_codes=vq.cfg.num_codes, code_dim=vq.cfg.code_dim, pad_token_id=tok.pad_token_id,
    ))
    return Policy(model.eval(), vq.eval(), tok)
