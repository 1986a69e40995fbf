"""The learner's strategy (torch-free): the learner config and the DeepSpeed config derived from it.

Defaults (the user's `deepspeed` dict is merged over them, see `deepspeed_config`): ZeRO stage 0, fp32 on CPU and
bf16 on GPU, gradient_clipping = grad_clip, micro-batch = min(micro_batch_size, rows per rank),
gradient_accumulation_steps = ceil(rows per rank / micro-batch); a smaller last micro-batch is weighted by its rows
(`micro_loss_scale`). Pure Python, so a run config validates without importing torch, DeepSpeed or Ray.
"""
from __future__ import annotations

import math

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.settings import LoraSettings

class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_ranks: int = Field(1, ge=1, description="DeepSpeed data-parallel ranks (Ray Train workers)")
    use_gpu: bool = Field(False, description="each rank computes on a GPU (gpus_per_rank of one)")
    gpus_per_rank: float = Field(1.0, gt=0, le=1, description="Ray GPUs per rank under use_gpu; a fraction shares "
                                                              "the GPU with rollout workers and the reward service")
    precision: Literal["fp32", "bf16"] | None = Field(None, description="the learner's compute precision (DeepSpeed "
                                                                       "bf16); null: bf16 on GPUs, fp32 on CPUs")
    recompute_old_logprobs: bool | None = Field(None, description="old log-probs from the learner's own forward "
                                                "before the update (verl's way), not the rollouts'; null: on in bf16")
    cpus_per_rank: float = Field(1.0, gt=0, description="Ray CPUs per rank")
    batch_size: int | None = Field(None, ge=1, description="rows per step over all ranks (prompts x G); null: the "
                                                           "run sets it")
    micro_batch_size: int = Field(8, ge=1, description="rows per forward/backward on one rank (capped at rows per "
                                                       "rank)")
    passes: int = Field(1, ge=1, description="optimisation passes (optimiser steps) over each batch")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, ge=0, description="gradient norm clip; 0: no clipping")
    seed: int = Field(0, description="seed of every rank (the run passes its own)")
    deepspeed: dict = Field({}, description="merged over our defaults (deepspeed_config)")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of all weights; null: full")
    ema: float = Field(0.0, ge=0, lt=1, description="decay of a running average of the trainable weights after each "
                                                    "optimiser step; the exported policy is the average, the "
                                                    "rollouts sample the current weights; 0: off")

    @model_validator(mode="after")
    def _check(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: must lie in [0, 1), got {self.betas}")
        ds = deepspeed_config(self, need_batch=False)  # raises on a bad merge (and a bad split once batch_size is known)
        if self.ema and ds["zero_optimization"].get("stage", 0) == 3:
            raise ValueError("ema: the weights' running average needs whole weights on each rank; use ZeRO stage <= 2")
        return self


def merge_dicts(base: dict, over: dict) -> dict:
    """Recursive merge: values of `over` win; nested dicts are merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def rows_per_rank(cfg: LearnerConfig) -> int:
    if cfg.batch_size % cfg.num_ranks:
        raise ValueError(f"batch_size: {cfg.batch_size} rows do not split evenly over {cfg.num_ranks} ranks")
    return cfg.batch_size // cfg.num_ranks


def batch_defaults(cfg: LearnerConfig) -> dict:
    """Micro-batch = min(micro_batch_size, rows per rank); accumulation steps = micro-batches per rank (the last
    one may be smaller: see micro_loss_scale)."""
    per_rank = rows_per_rank(cfg)
    micro = min(cfg.micro_batch_size, per_rank)
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": math.ceil(per_rank / micro)}


def check_batch(ds: dict, cfg: LearnerConfig) -> None:
    micro, gas = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    if not (isinstance(micro, int) and isinstance(gas, int) and micro >= 1 and gas >= 1):
        raise ValueError(f"deepspeed: micro-batch {micro!r} and gradient_accumulation_steps {gas!r} must be ints >= 1")
    per_rank = rows_per_rank(cfg)
    if gas != math.ceil(per_rank / micro):
        raise ValueError(f"deepspeed.gradient_accumulation_steps: {gas}, but {per_rank} rows per rank make "
                         f"{math.ceil(per_rank / micro)} micro-batches of {micro}")
    if ds.get("train_batch_size", micro * gas * cfg.num_ranks) != micro * gas * cfg.num_ranks:
        raise ValueError(f"deepspeed.train_batch_size: {ds['train_batch_size']} != micro-batch {micro} x {gas} "
                         f"steps x {cfg.num_ranks} ranks")


def micro_loss_scale(rows: int, shard_rows: int, gas: int) -> float:
    """DeepSpeed divides each micro-batch loss by gas; a micro-batch of `rows` of the rank's `shard_rows` must weigh
    rows / shard_rows in the rank's mean loss (each micro-batch loss is a per-row mean): sum_i s_i l_i / gas."""
    return rows * gas / shard_rows


def learner_precision(cfg: LearnerConfig) -> str:
    """The learner's precision: as set, else bf16 on GPUs and fp32 on CPUs."""
    return cfg.precision or ("bf16" if cfg.use_gpu else "fp32")


def recomputes_old_logprobs(cfg: LearnerConfig) -> bool:
    """As set, else in bf16: there the sampler's KV-cached, guided-batch forward and the learner's teacher-forced
    one round differently (the shipped policy in bf16 on both sides: |rho - 1| up to 0.2 on the first pass)."""
    return cfg.recompute_old_logprobs if cfg.recompute_old_logprobs is not None else learner_precision(cfg) == "bf16"


def deepspeed_config(cfg: LearnerConfig, need_batch: bool = True) -> dict:
    """Our defaults with `cfg.deepspeed` merged over them; the batch arithmetic must add up."""
    defaults = {
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": learner_precision(cfg) == "bf16"},
        "zero_allow_untested_optimizer": True,   # our optimiser is torch's AdamW
        "zero_force_ds_cpu_optimizer": False,    # ... also with optimizer offload (no DeepSpeedCPUAdam to compile)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.batch_size is not None:
        defaults |= batch_defaults(cfg)
    ds = merge_dicts(defaults, cfg.deepspeed)
    if "optimizer" in ds:
        raise ValueError("deepspeed.optimizer: not supported, the learner builds torch AdamW (lr, betas, weight_decay)")
    stage = ds["zero_optimization"].get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError("deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3")
    if cfg.batch_size is not None:
        check_batch(ds, cfg)
    elif need_batch:
        raise ValueError("batch_size: not set (rows per step = prompts x group size; LearnerGroup(batch_size=...))")
    return ds

