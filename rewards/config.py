"""Typed reward configs: which rewards with which weights (`RewardsConfig.rewards`), and how they are served.

    rewards:
      - {name: verifier, weight: 1.0, kwargs: {mode: partial}}
      - {name: clip_score, weight: 0.1, kwargs: {model: shapes-clip-tiny, pretrained: null}}
      - {name: my_package.scores:Aesthetic, weight: 0.5, label: aesthetic}
    service: {replicas: 1, max_batch_size: 8, batch_wait_timeout_s: 0.05, port: 8000}

Load with `core.config.load_config(RewardsConfig, path, overrides)`: a bad field is a one-line ConfigError.
"""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class RewardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="built-in / registry name, entry point (nextscale.rewards), "
                                                "or 'pkg.mod:attr'")
    weight: float = Field(1.0, allow_inf_nan=False, description="negative: a penalty; at least one weight must "
                                                                "be > 0")
    kwargs: dict[str, Any] = Field({}, description="constructor arguments (class) or bound keyword arguments "
                                                   "(function)")
    label: str | None = Field(None, description="how its components are reported; default: the name (an import "
                                                "path's attr)")
    timeout_s: float | None = Field(60.0, gt=0, description="one call on one batch; null waits forever")

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        """Checked without importing anything: a registry name, an installed entry point, or 'pkg.mod:attr'."""
        from rewards.base import check_name

        check_name(v)
        return v

    @model_validator(mode="after")
    def _default_label(self) -> "RewardEntry":
        self.label = self.label or self.name.rpartition(":")[2]
        if "/" in self.label or self.label == "score":
            raise ValueError(f"label {self.label!r}: must not contain '/' or be 'score'")
        return self


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("rewards", description="Serve application name")
    replicas: int = Field(1, ge=1, description="Serve replicas of the reward service")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs per replica")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per replica")
    runtime_env: dict[str, Any] = Field({}, description="per replica, e.g. {pip: [my-rewards]} or {env_vars: {...}}")
    max_batch_size: int = Field(8, ge=1, description="requests merged into one call of the rewards")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="longest wait for a batch to fill")
    max_ongoing_requests: int | None = Field(None, ge=1, description="per replica; default 2 * max_batch_size")
    host: str = Field("127.0.0.1", description="HTTP host of the service")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the service")
    route_prefix: str = Field("/rewards", description="HTTP route of the service")
    max_request_bytes: int = Field(64 << 20, ge=1, description="HTTP: a larger request body -> 413")
    body_timeout_s: float = Field(30.0, gt=0, description="HTTP: a request body not received in this time -> 408")
    timeout_s: float = Field(300.0, gt=0, description="client: one call, queueing included")
    retries: int = Field(2, ge=0, description="client: further attempts after a failed call")
    backoff_s: float = Field(0.5, ge=0, description="client: wait before retry k is backoff_s * 2**(k-1) ...")
    backoff_max_s: float = Field(10.0, ge=0, description="... at most this")

    @field_validator("max_ongoing_requests")
    @classmethod
    def _fill_batches(cls, v: int | None, info: ValidationInfo) -> int | None:
        size = info.data.get("max_batch_size", 1)
        if v is not None and v < size:
            raise ValueError(f"must be >= max_batch_size ({size}) or batches never fill")
        return v

    @field_validator("route_prefix")
    @classmethod
    def _slash(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size


class RewardsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rewards: list[RewardEntry] = Field(min_length=1, description="the rewards; the score is their weighted sum")
    service: ServiceConfig = Field(ServiceConfig(), description="the Ray Serve deployment that computes them")

    @field_validator("rewards")
    @classmethod
    def _unique_labels(cls, v: list[RewardEntry]) -> list[RewardEntry]:
        labels = [e.label for e in v]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"labels {dup} appear more than once; give each entry its own label")
        ws = [e.weight for e in v]
        if not any(w > 0 for w in ws) or not math.isfinite(sum(ws)):
            raise ValueError(f"weights {ws}: the weighted sum needs at least one positive weight "
                             "(negative weights are penalties)")
        return v
