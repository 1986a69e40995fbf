"""The rollout worker: a Ray actor holding the full policy; it samples work units with all S scales and CFG.

Thin by design: weights in, `policy.sampler.sample` out. A worker refuses to sample with a weight version older
than the one the driver asks for.
"""
from __future__ import annotations

import os

import ray
import torch

from policy.io import Policy
from policy.images import to_uint8
from policy.sampler import SampleConfig, sample
from rollout.units import UnitResult, WorkUnit, sample_seeds


class StaleWeightsError(RuntimeError):
    pass


class RolloutWorkerImpl:
    def __init__(self, policy_path: str, sample_cfg: dict, m: int, lora: dict | None = None, threads: int = 1):
        torch.set_num_threads(threads)
        self.policy = Policy.load(policy_path)
        if lora:
            from rl.weights import LoraSettings, apply_lora

            self.policy.model = apply_lora(self.policy.model, LoraSettings(**lora))
        self.policy.model.eval()
        self.sample_cfg = SampleConfig(**sample_cfg)
        self.m = m
        self.version = 0  # the weights of policy_path
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def set_weights(self, version: int, state: dict) -> int:
        from rl.weights import load_trainable_state

        load_trainable_state(self.policy.model, state)
        self.version = version
        return version

    def get_version(self) -> int:
        return self.version

    def pid(self) -> int:
        return os.getpid()

    def sample_unit(self, unit: WorkUnit, min_version: int) -> UnitResult:
        if self.version < min_version:
            raise StaleWeightsError(f"worker {self.name} holds weights v{self.version}, unit {unit.uid} needs v{min_version}")
        out = sample(self.policy.model, self.policy.vq, [list(unit.text_ids)] * unit.group_size,
                     sample_seeds(unit.seed, unit.group_size), self.sample_cfg, m=self.m)
        return UnitResult(unit.uid, [c.numpy() for c in out.codes], to_uint8(out.images),
                          out.logprobs.float().numpy(), self.version, self.name)


RolloutWorker = ray.remote(max_restarts=0, max_task_retries=0)(RolloutWorkerImpl)
