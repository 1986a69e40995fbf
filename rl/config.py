"""The run config of `python -m rl train`: pydantic, loaded from YAML with `key.sub=value` overrides.

Everything is validated before anything starts; a bad field is a one-line `ConfigError` naming it (exit code 2).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, model_serializer, model_validator

from core.config import Sections, absolute_path, redact_secrets
from core.settings import SampleConfig
from rewards.config import RewardsConfig
from rl.strategy import LearnerConfig, learner_precision


PATH_KWARGS = ("model", "pretrained", "path", "checkpoint")  # reward kwargs that may name files


def in_ray_job_working_copy(path: str) -> bool:
    """True when this process is a Ray job's entrypoint and `path` lies in the job's working-directory copy."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return False
    cwd = Path.cwd().resolve()
    return "runtime_resources" in cwd.parts and Path(path).resolve().is_relative_to(cwd)


class _Strict(Sections):
    model_config = ConfigDict(extra="forbid")


def describe(default, description: str, **constraints):
    """A field with its one-line description (shown by `--help`)."""
    return Field(default, description=description, **constraints)


class GRPOLossConfig(_Strict):
    eps_lo: float = describe(0.2, "lower clip of the probability ratio (1 - eps_lo)", ge=0)
    eps_hi: float = describe(0.28, "upper clip of the probability ratio (1 + eps_hi; clip-higher)", ge=0)
    beta: float = describe(0.0, "KL weight towards the initial policy; 0: no KL term, no reference model", ge=0)
    kl: Literal["k1", "k3"] = describe("k3", "KL estimator")
    neg_weight: float = describe(1.0, "weight of the negative advantages in the loss; < 1 leans on the samples "
                                      "that did better than their group", ge=0)
    score: Literal["conditional", "guided"] = describe(
        "conditional", "the policy the loss scores: the unguided conditional one, or the CFG-guided distribution "
        "the rollouts sample (rollout.sample's cfg_scale, guidance_schedule, temperature; the rollouts log old "
        "log-probs of the same)")


class VMRConfig(_Strict):
    k: int = describe(1, "completions per prefix; 1 = off (the rollout's own reward)", ge=1)
    eta: float = describe(1.0, "temperature of the soft value: -> max as eta -> 0, -> mean as eta -> inf", gt=0)


class RolloutConfig(_Strict):
    workers: int = describe(2, "rollout workers at start (python -m rl scale resizes a live run)", ge=1)
    min_workers: int = describe(1, "fewest workers the pool may shrink to", ge=1)
    max_workers: int = describe(16, "most workers the pool may grow to", ge=1)
    cpus_per_worker: float = describe(1.0, "Ray CPUs per rollout worker", gt=0)
    gpus_per_worker: float = describe(0.0, "Ray GPUs per rollout worker", ge=0)
    threads_per_worker: int = describe(1, "torch threads inside a worker", ge=1)
    precision: Literal["fp32", "bf16"] | None = describe(None, "the workers' compute precision; null: the "
                                                               "learner's (learner.precision)")
    weight_sync: Literal["object_store", "collective"] = describe(
        "object_store", "how new weights reach the workers: Ray's object store, or a broadcast group with learner "
                        "rank 0 (gloo; NCCL when both are on GPUs) with the object store as fallback")
    sync_timeout_s: float = describe(60.0, "collective weight sync: seconds before a stuck group is given up", gt=0)
    sample: SampleConfig = describe(SampleConfig(cfg_scale=3.0, guidance_schedule="linear", top_k=32, top_p=0.95),
                                    "how the rollouts sample")

    @model_validator(mode="after")
    def _bounds(self):
        if not self.min_workers <= self.workers <= self.max_workers:
            raise ValueError(f"workers: {self.workers} is outside min_workers..max_workers "
                             f"({self.min_workers}..{self.max_workers})")
        return self


class PromptsConfig(_Strict):
    path: str | None = describe(None, "Parquet with a `prompt` column (+ optional `spec`, `category`)")
    split: Literal["train", "heldout", "all"] = describe("train", "the shapes world's split when path is null")
    balance: Literal["none", "category"] = describe("category", "cycle the stream through categories "
                                                                "(none if unknown)")


class CheckpointSettings(_Strict):
    every: int = describe(10, "steps between checkpoints", ge=1)
    keep: int = describe(3, "checkpoints kept (older ones are deleted)", ge=1)


class LoggingSettings(_Strict):
    wandb: Literal["offline", "online", "disabled"] = describe("offline", "wandb mode")
    project: str = describe("nextscale-rl", "wandb project")
    grid_every: int = describe(5, "steps between PNG sample grids", ge=1)
    grid_size: int = describe(16, "images in a sample grid", ge=1)
    verbose: bool = describe(False, "show Ray's and Serve's per-request logs in the terminal (else only in Ray's "
                                    "log files)")


class LoopSettings(_Strict):
    stream_rewards: bool = describe(True, "send each unit's reward request as its rollout returns (many in flight, "
                                          "batched by the service); false: one request per step after the rollouts")
    off_policy_steps: int = describe(0, "1: the rollouts of step t+1 run (with the weights of step t-1) while the "
                                        "learner trains step t, except after a checkpoint step; 0: on-policy",
                                     ge=0, le=1)


class EvalSettings(_Strict):
    enabled: bool = describe(True, "held-out verifier score before the first and after the last step")
    images_per_category: int = describe(96, "held-out prompts repeated cyclically (new seeds) to this many", ge=1)
    every: int = describe(0, "also every N steps (0: never); all evals go to RUN/eval_curve.jsonl", ge=0)


class RunConfig(_Strict):
    name: str = describe(..., "run name: the run directory is runs_dir/name", min_length=1,
                         pattern=r"^[A-Za-z0-9_.-]+$")
    runs_dir: str = describe("runs", "where run directories live (with a storage URI: this node's scratch)")
    storage: str | None = describe(None, "where the run's files live: an absolute local / NFS path, or a URI that "
                                   "pyarrow.fs opens (s3://, gs://, hdfs://); null: runs_dir. Set it under Ray Jobs")
    resume: bool = describe(False, "continue from the last checkpoint of runs_dir/name")
    seed: int = describe(0, "seed of the prompt stream and the sampling")
    steps: int = describe(..., "training steps", ge=1)
    policy_path: str = describe(..., "a saved policy directory (transformer/ + VQ + text tokenizer)")
    m: int = describe(..., "scales 1..m enter the loss (the later ones are still sampled)", ge=1)
    group_size: int = describe(..., "G samples per prompt", ge=2)
    prompts_per_step: int = describe(..., "prompts per step (a batch is prompts_per_step x group_size)", ge=1)
    alpha: float = describe(0.7, "per-scale weight exponent of the loss (k_s ~ n_s^-alpha)", ge=0)
    normalize_std: bool = describe(True, "divide a group's advantages by its reward std")
    adv_eps: float = describe(1e-4, "added to the std when normalising advantages", gt=0)
    down_sample: int = describe(0, "train on this many of each group's G samples: those whose rewards vary most "
                                   "(PODS max-variance down-sampling; advantages within them); 0: all G", ge=0)
    loss: GRPOLossConfig = describe(GRPOLossConfig(), "the clipped GRPO loss")
    vmr: VMRConfig = describe(VMRConfig(), "middle-step value over K completions per prefix; k = 1: off")
    learner: LearnerConfig = describe(LearnerConfig(), "the DeepSpeed learner ranks")
    rollout: RolloutConfig = describe(RolloutConfig(), "the rollout worker pool")
    prompts: PromptsConfig = describe(PromptsConfig(), "the training prompt stream")
    rewards: RewardsConfig = describe(..., "the rewards and the Serve service that computes them")
    checkpoint: CheckpointSettings = describe(CheckpointSettings(), "checkpoints under RUN/checkpoints")
    logging: LoggingSettings = describe(LoggingSettings(), "metrics, sample grids and terminal output")
    eval: EvalSettings = describe(EvalSettings(), "held-out evaluation")
    loop: LoopSettings = describe(LoopSettings(), "how the steps' stages overlap")
    allow_precision_mismatch: bool = describe(False, "run even when rollout.precision differs from the learner's "
                                                     "(the old and new log-probs then differ beyond the clip range)")

    @model_validator(mode="after")
    def _check_against_policy(self, info: ValidationInfo):
        """Cross-field checks; with context {"check_paths": False} (a config for another machine) skip the files."""
        self.policy_path, self.runs_dir = absolute_path(self.policy_path), absolute_path(self.runs_dir)
        self._check_storage()
        self.prompts.path = absolute_path(self.prompts.path)
        for entry in self.rewards.rewards:  # file arguments of rewards are read inside Serve replicas
            entry.kwargs = {k: absolute_path(v) if isinstance(v, str) and k in PATH_KWARGS else v
                            for k, v in entry.kwargs.items()}
        self._check_precision()
        self._check_guided_scoring()
        if self.down_sample and not 2 <= self.down_sample <= self.group_size:
            raise ValueError(f"down_sample: {self.down_sample} must lie in 2..group_size ({self.group_size}), or be 0")
        if self.train_rows % self.learner.num_ranks:
            raise ValueError(f"learner.num_ranks: {self.learner.num_ranks} does not divide the batch of "
                             f"{self.train_rows} samples (prompts_per_step x (down_sample or group_size))")
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

    def _check_precision(self) -> None:
        """The old log-probs (rollouts) and the new ones (learner) must come from the same precision policy."""
        learner = learner_precision(self.learner)
        if self.rollout.precision is None:
            self.rollout.precision = learner
        elif self.rollout.precision != learner and not self.allow_precision_mismatch:
            raise ValueError(f"rollout.precision: {self.rollout.precision}, but the learner computes in {learner} "
                             "(learner.precision): the first-pass ratio would deviate from 1 by up to the clip "
                             "range; use one precision, or set allow_precision_mismatch=true")

    def _check_guided_scoring(self) -> None:
        if self.loss.score == "guided" and self.rollout.sample.greedy_within(self.m):
            raise ValueError("loss.score: guided scoring needs rollout.sample.temperature > 0 at scales 1..m "
                             "(greedy sampling has no log-prob)")

    def _check_storage(self) -> None:
        """A local storage path is the runs_dir; without storage a Ray job must not write into its working copy."""
        if self.storage and "://" not in self.storage:
            if not Path(self.storage).is_absolute():
                raise ValueError(f"storage: {self.storage} is relative; give an absolute path every node sees, or "
                                 "a URI (s3://bucket/runs)")
            self.runs_dir = self.storage
        elif not self.storage and in_ray_job_working_copy(self.runs_dir):
            raise ValueError(f"storage: not set, and runs_dir {self.runs_dir} lies in this Ray job's temporary copy "
                             "of the working directory, which Ray may evict; set storage=/shared/abs/path or "
                             "storage=s3://bucket/runs")

    @model_serializer(mode="wrap", when_used="json")
    def _without_env_secrets(self, handler):
        """JSON dumps (RUN/config.yaml, wandb's config) never hold the value of a secret env var (WANDB_API_KEY...)."""
        data = redact_secrets(handler(self))
        if data.get("storage"):
            from rl.storage import public_uri

            data["storage"] = public_uri(data["storage"])
        return data

    @property
    def train_rows(self) -> int:
        """The learner's rows per step: prompts_per_step x (down_sample or group_size)."""
        return self.prompts_per_step * (self.down_sample or self.group_size)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name
