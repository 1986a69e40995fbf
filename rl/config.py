"""The run config of `python -m rl train`: pydantic, loaded from YAML with `key.sub=value` overrides.

Everything is validated before anything starts; a bad field is a one-line `ConfigError` naming it (exit code 2).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_serializer, model_validator

from core.config import absolute_path, redact_secrets
from core.settings import SampleConfig
from rewards.config import RewardsConfig
from rl.strategy import LearnerConfig


PATH_KWARGS = ("model", "pretrained", "path", "checkpoint")  # reward kwargs that may name files


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GRPOLossConfig(_Strict):
    eps_lo: float = Field(0.2, ge=0)
    eps_hi: float = Field(0.28, ge=0)
    beta: float = Field(0.0, ge=0)     # 0: no KL term, no reference model loaded
    kl: Literal["k1", "k3"] = "k3"


class VMRConfig(_Strict):
    k: int = Field(1, ge=1)          # completions per prefix; 1 = off (the rollout's own reward)
    eta: float = Field(1.0, gt=0)    # temperature of the soft value: -> max as eta -> 0, -> mean as eta -> inf


class RolloutConfig(_Strict):
    workers: int = Field(2, ge=1)               # at start
    min_workers: int = Field(1, ge=1)
    max_workers: int = Field(16, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    threads_per_worker: int = Field(1, ge=1)    # torch threads inside a worker
    sample: SampleConfig = SampleConfig(cfg_scale=3.0, guidance_schedule="linear", top_k=32, top_p=0.95)

    @model_validator(mode="after")
    def _bounds(self):
        if not self.min_workers <= self.workers <= self.max_workers:
            raise ValueError(f"workers: {self.workers} is outside min_workers..max_workers "
                             f"({self.min_workers}..{self.max_workers})")
        return self


class PromptsConfig(_Strict):
    path: str | None = None                      # Parquet with a `prompt` column (+ optional `spec`, `category`)
    split: Literal["train", "heldout", "all"] = "train"  # the shapes world's split when path is null
    balance: Literal["none", "category"] = "category"  # cycle the stream through categories (none if unknown)


class CheckpointSettings(_Strict):
    every: int = Field(10, ge=1)                 # steps
    keep: int = Field(3, ge=1)


class LoggingSettings(_Strict):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "nextscale-rl"
    grid_every: int = Field(5, ge=1)             # steps between PNG sample grids
    grid_size: int = Field(16, ge=1)


class EvalSettings(_Strict):
    enabled: bool = True                         # held-out verifier score before the first and after the last step
    images_per_category: int = Field(96, ge=1)   # held-out prompts repeated cyclically (new seeds) to this many
    every: int = Field(0, ge=0)                  # also every N steps (0: never); all evals go to RUN/eval_curve.jsonl


class RunConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    runs_dir: str = "runs"
    resume: bool = False                         # continue from the last checkpoint of runs_dir/name
    seed: int = 0
    steps: int = Field(ge=1)
    policy_path: str
    m: int = Field(ge=1)                         # scales 1..m enter the loss
    group_size: int = Field(ge=2)                # G samples per prompt
    prompts_per_step: int = Field(ge=1)
    alpha: float = Field(0.7, ge=0)              # per-scale weight exponent of the loss (k_s ~ n_s^-alpha)
    normalize_std: bool = True
    adv_eps: float = Field(1e-4, gt=0)
    loss: GRPOLossConfig = GRPOLossConfig()
    vmr: VMRConfig = VMRConfig()                 # middle-step value over K completions per prefix; k = 1: off
    learner: LearnerConfig = LearnerConfig()
    rollout: RolloutConfig = RolloutConfig()
    prompts: PromptsConfig = PromptsConfig()
    rewards: RewardsConfig
    checkpoint: CheckpointSettings = CheckpointSettings()
    logging: LoggingSettings = LoggingSettings()
    eval: EvalSettings = EvalSettings()

    @model_validator(mode="after")
    def _check_against_policy(self, info: ValidationInfo):
        """Cross-field checks; with context {"check_paths": False} (a config for another machine) skip the files."""
        self.policy_path, self.runs_dir = absolute_path(self.policy_path), absolute_path(self.runs_dir)
        self.prompts.path = absolute_path(self.prompts.path)
        for entry in self.rewards.rewards:  # file arguments of rewards are read inside Serve replicas
            entry.kwargs = {k: absolute_path(v) if isinstance(v, str) and k in PATH_KWARGS else v
                            for k, v in entry.kwargs.items()}
        rows = self.prompts_per_step * self.group_size
        if rows % self.learner.num_ranks:
            raise ValueError(f"learner.num_ranks: {self.learner.num_ranks} does not divide the batch of "
                             f"{rows} samples (prompts_per_step x group_size)")
        if info.context and not info.context.get("check_paths", True):
            return self
        cfg_file = Path(self.policy_path) / "transformer" / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"policy_path: {self.policy_path} is not a policy directory (no transformer/config.json)")
        num_scales = len(json.loads(cfg_file.read_text())["schedule"])
        if self.m > num_scales:
            raise ValueError(f"m: {self.m} is more than the policy's {num_scales} scales")
        if self.prompts.path:
            if not Path(self.prompts.path).is_file():
                raise ValueError(f"prompts.path: {self.prompts.path} not found")
            from rl.prompts import load_prompts  # read it now: a bad prompt file stops the run before anything starts

            load_prompts(self.prompts)
        return self

    @model_serializer(mode="wrap", when_used="json")
    def _without_env_secrets(self, handler):
        """JSON dumps (RUN/config.yaml, wandb's config) never hold the value of a secret env var (WANDB_API_KEY...)."""
        return redact_secrets(handler(self))

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name
