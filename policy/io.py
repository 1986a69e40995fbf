"""Weight I/O: strict safetensors loading with clear errors (never a half-loaded model)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.atomic import atomic_dir
from policy.scales import ScheduleField

if TYPE_CHECKING:
    from policy.tokenizer import MultiScaleVQ
    from policy.transformer import NextScaleLM


M = TypeVar("M", bound=BaseModel)

# Keys transformers writes or reads beside a model's own fields in config.json; our configs ignore them on load.
HF_METADATA_KEYS = ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype")
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
MAX_SHARD_SIZE = "5GB"  # weights above this are split into shards with an index (Hugging Face's layout)


def read_json_config(file: str | Path, cls: type[M], model_type: str | None = None) -> M:
    """A model's `config.json` -> cls; a missing, non-JSON or invalid file is one line naming the file.

    With `model_type`, a file that names another model type is refused; transformers' metadata keys are dropped
    (folders written before they were added have none, and load the same).
    """
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
    if model_type is not None:
        if data.get("model_type", model_type) != model_type:
            raise ValueError(f"{file}: model_type is {data['model_type']!r}, expected {model_type!r}")
        data = {k: v for k, v in data.items() if k not in HF_METADATA_KEYS}
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{file}: {format_validation_error(e)}") from None


def hf_config_dict(model_type: str, architecture: str | None, cfg: BaseModel) -> dict:
    """config.json of a model folder: transformers' `model_type` (and `architectures`: the transformers class that
    opens it, if any), then our own fields."""
    import transformers

    head = {"model_type": model_type, "architectures": [architecture]} if architecture else {"model_type": model_type}
    return {**head, "transformers_version": transformers.__version__, **cfg.model_dump(mode="json")}


def save_model_folder(path: str | Path, config: dict, state: dict[str, torch.Tensor],
                      max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Write `path/config.json` and the weights as safetensors (sharded with an index above `max_shard_size`).

    The folder is written aside and swapped in whole: a reader sees the old folder or the new one.
    """
    from huggingface_hub import save_torch_state_dict

    with atomic_dir(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
    return Path(path)


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.exists():
        raise FileNotFoundError(f"{file}: weights file not found")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a safetensors file, or of a model folder (one `model.safetensors`, or shards listed in
    `model.safetensors.index.json`) -> (state, the file to name in errors)."""
    path = Path(path)
    index = path / INDEX_FILE
    if not path.is_dir() or not index.exists():
        file = path / WEIGHTS_FILE if path.is_dir() else path
        return _read_safetensors(file), file
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a readable weights index ({type(e).__name__})") from None
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_read_safetensors(path / shard))
    if set(state) != set(weight_map):
        raise ValueError(f"{index}: the index and its shards list different tensors")
    return state, index


def load_state_strict(model: nn.Module, path: str | Path, ignore_missing: set[str] = frozenset()) -> None:
    """Load a safetensors file or model folder (see `read_weights`) into `model`; any missing, unexpected or
    mis-shaped tensor is an error.

    The weights are fully read and checked before any parameter is touched.
    """
    state, file = read_weights(path)
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
    path: str | None = Field(None, description="a saved policy directory (null: a fresh random policy)")
    schedule: ScheduleField = Field([(s, s) for s in (1, 2, 3, 4, 6, 8)],
                                    description="the (h, w) token grid of every scale of a fresh policy")
    vq: dict = Field({}, description="VQConfig fields of a fresh policy, other than the schedule")
    backbone: dict = Field({}, description="BackboneConfig fields of a fresh policy")
    seed: int = Field(0, description="initialisation seed of a fresh policy")


@dataclass
class Policy:
    """What the policy *is*: the next-scale transformer, the image tokenizer and the text tokenizer."""
    model: "NextScaleLM"
    vq: "MultiScaleVQ"
    tokenizer: object

    def save(self, path: str | Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
        """`path/{transformer,vq,text_tokenizer}`, written aside and swapped in whole (never half a policy)."""
        with atomic_dir(path) as tmp:
            self.model.save_pretrained(tmp / "transformer", max_shard_size=max_shard_size)
            self.vq.save_pretrained(tmp / "vq")
            self.tokenizer.save_pretrained(str(tmp / "text_tokenizer"))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        from policy.text_tokenizer import load_text_tokenizer
        from policy.tokenizer import MultiScaleVQ
        from policy.transformer import NextScaleLM

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"policy.path: {path} is not a policy directory")
        model, vq = NextScaleLM.from_pretrained(path / "transformer"), MultiScaleVQ.from_pretrained(path / "vq")
        check_agreement(model.cfg, vq.cfg, path / "transformer", path / "vq")
        try:
            tokenizer = load_text_tokenizer(path / "text_tokenizer")
        except Exception as e:  # transformers raises many types (OSError, ValueError, Exception from tokenizers)
            cause = (str(e).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"{path / 'text_tokenizer'}: not a readable tokenizer ({type(e).__name__}: {cause})") \
                from None
        if len(tokenizer) > model.cfg.text_vocab_size:
            raise ValueError(f"{path / 'text_tokenizer'} and {path / 'transformer'} disagree on text_vocab_size: "
                             f"the tokenizer has {len(tokenizer)} tokens, the transformer "
                             f"{model.cfg.text_vocab_size} text rows")
        return cls(model, vq, tokenizer)

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        from policy.text_tokenizer import encode_prompts

        return encode_prompts(self.tokenizer, prompts)


def check_agreement(model_cfg, vq_cfg, model_dir: Path, vq_dir: Path) -> None:
    """The transformer reads and writes the tokenizer's codes: the same schedule, codebook size and code dim."""
    for field in ("schedule", "num_codes", "code_dim"):
        a, b = getattr(model_cfg, field), getattr(vq_cfg, field)
        if a != b:
            raise ValueError(f"{model_dir} and {vq_dir} disagree on {field}: {a} vs {b}")


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
