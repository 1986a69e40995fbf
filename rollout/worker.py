"""The rollout worker: a Ray actor holding the full policy; it samples work units with all S scales and CFG.

Thin by design: weights in, `policy.sampler.sample` out. A worker refuses to sample with a weight version older
than the one the driver asks for. It computes on the GPU Ray gave it (else the CPU) in its configured precision
(`rollout.precision`, the learner's by default); what it returns is CPU numpy.
"""
from __future__ import annotations

import os

import ray
import torch

from policy.io import Policy
from policy.images import to_uint8
from policy.sampler import SampleConfig, sample
from rollout.units import UnitResult, WorkUnit, completion_seeds, sample_seeds


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class StaleWeightsError(RuntimeError):
    pass


def actor_device() -> torch.device:
    """CUDA when Ray gave this actor a GPU (and torch sees one), else the CPU."""
    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    return torch.device("cuda") if gpus and torch.cuda.is_available() else torch.device("cpu")


class RolloutWorkerImpl:
    def __init__(self, policy_path: str, sample_cfg: dict, m: int, lora: dict | None = None, threads: int = 1,
                 completions: int = 1, precision: str = "fp32", logprobs: str = "conditional"):
        torch.set_num_threads(threads)
        self.policy = Policy.load(policy_path)
        if lora:
            from policy.weights import LoraSettings, apply_lora

            self.policy.model = apply_lora(self.policy.model, LoraSettings(**lora))
        self.device = actor_device()
        self.policy.model.to(self.device, DTYPES[precision]).eval()   # the VQ stays fp32 (decoding)
        self.policy.vq.to(self.device)
        self.sample_cfg = SampleConfig(**sample_cfg)
        self.m = m
        self.completions = completions  # K: completions per prefix (VMR); 1 = the rollout only
        self.logprobs = logprobs  # what the old log-probs score: "conditional" or "guided" (loss.score)
        self.version = 0  # the weights of policy_path
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def set_weights(self, version: int, state: dict) -> int:
        from policy.weights import load_trainable_state

        load_trainable_state(self.policy.model, state)
        self.version = version
        return version

    def open_sync(self, addr: str, port: int, world: int, rank: int, timeout_s: float, backend: str) -> int:
        """Join a weight broadcast group (core.collective) as `rank`; learner rank 0 is its root."""
        from core.collective import open_group

        self.sync_group, self.sync_device = open_group(addr, port, world, rank, timeout_s, backend), \
            self.device if backend == "nccl" else torch.device("cpu")
        return rank

    def receive_weights(self, version: int, layout: list) -> int:
        """Weights `version` from the group's root, straight into the model."""
        from core.collective import recv_state

        return self.set_weights(version, recv_state(self.sync_group, layout, self.sync_device))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What set_weights loads (all weights, or the LoRA adapters), on the CPU: to compare with the learner's."""
        from policy.weights import trainable_state

        return {k: v.cpu() for k, v in trainable_state(self.policy.model).items()}

    def get_version(self) -> int:
        return self.version

    def pid(self) -> int:
        return os.getpid()

    def sample_unit(self, unit: WorkUnit, min_version: int) -> UnitResult:
        if self.version < min_version:
            raise StaleWeightsError(f"worker {self.name} holds weights v{self.version}, unit {unit.uid} needs v{min_version}")
        out = sample(self.policy.model, self.policy.vq, [list(unit.text_ids)] * unit.group_size,
                     sample_seeds(unit.seed, unit.group_size), self.sample_cfg, m=self.m,
                     logprobs=self.logprobs)
        return UnitResult(unit.uid, [c.cpu().numpy() for c in out.codes], to_uint8(out.images),
                          out.logprobs.float().cpu().numpy(), self.version, self.name, self._complete(unit, out.codes))

    def _complete(self, unit: WorkUnit, codes: list[torch.Tensor]):
        """Completions 2..K of each sample's prefix (scales 1..m): (G, K - 1, P, P, 3) uint8, or None for K = 1."""
        extra, g = self.completions - 1, unit.group_size
        if extra < 1:
            return None
        seeds = [s for k in range(2, self.completions + 1) for s in completion_seeds(unit.seed, g, k)]
        prefix = [c.repeat(extra, 1, 1) for c in codes[: self.m]]  # rows k-major: (k - 2) * G + j
        out = sample(self.policy.model, self.policy.vq, [list(unit.text_ids)] * (g * extra), seeds,
                     self.sample_cfg, m=self.m, prefix_codes=prefix)
        images = to_uint8(out.images)
        return images.reshape(extra, g, *images.shape[1:]).swapaxes(0, 1).copy()


RolloutWorker = ray.remote(max_restarts=0, max_task_retries=0)(RolloutWorkerImpl)
