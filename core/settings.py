"""Settings shared across layers, kept free of torch so that validating a run config imports neither torch nor Ray.

`SampleConfig` is read by the sampler (policy/sampler.py), `LoraSettings` by the weights (policy/weights.py).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The Qwen2 attention and MLP linears of NextScaleLM's backbone (module names as in transformers' Qwen2).
QWEN2_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SampleConfig(BaseModel):
    """Per-scale settings may be one value or one value per scale."""
    model_config = ConfigDict(extra="forbid")
    cfg_scale: float = 1.0                                   # classifier-free guidance w; 1 = no guidance
    guidance_schedule: Literal["constant", "linear"] = "constant"
    temperature: float | list[float] = 1.0                   # <= 0: greedy
    top_k: int | list[int] = 0                               # 0: off
    top_p: float | list[float] = 1.0                         # 1: off


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)   # > 0 makes the first-pass ratio differ from 1
    target_modules: list[str] = Field(default_factory=lambda: list(QWEN2_LINEARS), min_length=1)
