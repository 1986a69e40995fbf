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
    cfg_scale: float = Field(1.0, description="classifier-free guidance w; 1 = no guidance")
    guidance_schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant w, or linear from 1 at scale 1 to w at the last scale")
    temperature: float | list[float] = Field(1.0, description="<= 0: greedy; one value or one per scale")
    top_k: int | list[int] = Field(0, description="0: off; one value or one per scale")
    top_p: float | list[float] = Field(1.0, description="1: off; one value or one per scale")

    def greedy_within(self, m: int) -> bool:
        """Some scale of 1..m samples greedily (temperature <= 0): its codes have no log-prob to score."""
        temps = self.temperature if isinstance(self.temperature, list) else [self.temperature]
        return any(t <= 0 for t in temps[:m])


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator (the update is scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="> 0 makes the first-pass ratio differ from 1")
    target_modules: list[str] = Field(default_factory=lambda: list(QWEN2_LINEARS), min_length=1,
                                      description="module names that get adapters (default: Qwen2's linears)")
