"""What every stage shares: its config, the Ray Train launch, checkpoint save/restore, DDP (Ray Train's).

A stage is a Ray Train `TorchTrainer`. Data is procedural and a pure function of (seed, step, rank), so the
"data position" saved in a checkpoint is just the step. A rerun with the same run name and storage resumes from
the last checkpoint (Ray Train restores it); `FailureConfig` retries failed workers from it too.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.atomic import atomic_dir
from core.config import absolute_path
from core.resources import gpu_shortfall
from shapes.world import CATEGORIES, Spec, all_specs, caption, render, split_prompts

STATE_FILE = "train_state.pt"


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="run name: a rerun with the same name resumes")
    storage: str = Field("runs/stages", description="Ray Train storage path (a shared filesystem on a cluster)")
    out: str | None = Field(None, description="where the final artefact is exported (default STORAGE/NAME/final)")
    num_workers: int = Field(1, description="Ray Train workers (data-parallel)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1, description="Ray CPUs per worker")
    max_failures: int = Field(1, description="worker failures retried from the last checkpoint")
    steps: int = Field(100, description="optimiser steps")
    batch_size: int = Field(32, description="images per worker per step")
    lr: float = Field(1e-3, description="peak learning rate")
    warmup_steps: int = Field(0, description="linear warm-up steps")
    min_lr_ratio: float = Field(0.1, description="cosine decay to lr * min_lr_ratio at the last step")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, description="gradient norm clip; 0: no clipping")
    log_every: int = Field(10, description="steps between metric reports")
    checkpoint_every: int = Field(100, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, description="checkpoints kept")
    seed: int = Field(0, description="seed of the data and the initialisation")

    @model_validator(mode="after")
    def _absolute_paths(self):
        self.storage, self.out = absolute_path(self.storage), absolute_path(self.out)
        return self

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.storage).resolve() / self.name / "final"


# ----------------------------------------------------------------------------------------------- data
def step_rng(seed: int, step: int, rank: int) -> random.Random:
    """The data RNG of one worker at one step: resuming at `step` replays exactly the same batches."""
    return random.Random(f"{seed}/{step}/{rank}")


def sample_specs(rng: random.Random, n: int, categories: list[str] | None = None, split: str = "train") -> list[Spec]:
    """Category-balanced specs from a prompt split (`train`, `heldout` or `all`)."""
    pool = all_specs() if split == "all" else getattr(split_prompts(), split)
    cats = categories or list(CATEGORIES)
    by_cat = {c: [s for s in pool if s.category == c] for c in cats}
    by_cat = {c: v for c, v in by_cat.items() if v}
    return [rng.choice(by_cat[rng.choice(sorted(by_cat))]) for _ in range(n)]


def scene_batch(rng: random.Random, specs: list[Spec]) -> tuple[torch.Tensor, list[str]]:
    """(B, 3, 64, 64) float images in [0, 1] and their captions."""
    imgs = np.stack([render(s, rng) for s in specs])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, [caption(s) for s in specs]


def lr_at(step: int, cfg: StageConfig) -> float:
    """Linear warm-up, then cosine decay from cfg.lr to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ----------------------------------------------------------------------------------------------- workers
def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are: a stage's step puts its batch there (the worker's GPU under use_gpu)."""
    return next(module.parameters()).device


class StageStep(torch.nn.Module):
    """A stage's modules as one module whose forward is one step's (loss, metrics): what Ray Train wraps in DDP.

    `trained` are the optimised modules; `frozen` ride along only to be put on the same device (a VQ, a teacher).
    Going through this forward is what lets DDP all-reduce the gradients of whatever the step touched.
    """

    def __init__(self, trained: dict[str, torch.nn.Module], frozen: dict[str, torch.nn.Module],
                 step_fn: Callable[[int], tuple[torch.Tensor, dict]]):
        super().__init__()
        self.trained, self.frozen, self.step_fn = torch.nn.ModuleDict(trained), torch.nn.ModuleDict(frozen), step_fn

    def forward(self, step: int) -> tuple[torch.Tensor, dict]:
        return self.step_fn(step)


def data_parallel(step: StageStep) -> torch.nn.Module:
    """Ray Train's `prepare_model`: onto the worker's device (its GPU under use_gpu, else the CPU), then DDP
    (gloo on CPUs, NCCL on GPUs) when there is more than one worker. Unused parameters are allowed: a phase may
    freeze the backbone."""
    from ray.train.torch import prepare_model

    return prepare_model(step, parallel_strategy_kwargs={"find_unused_parameters": True})


def restore(modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """Load the latest Ray Train checkpoint of this run, if any; return the step to continue from."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    for name, module in modules.items():
        module.load_state_dict(state["modules"][name])
    optimizer.load_state_dict(state["optimizer"])
    print(f"[stage] resumed from step {state['step']}", flush=True)
    return int(state["step"])


def report(metrics: dict, step: int, modules, optimizer, export: Callable[[Path], None] | None) -> None:
    """Report metrics from every worker; with `export`, rank 0 also writes a checkpoint (state + artefact)."""
    import ray.train

    rank, _ = world()
    metrics = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    if export is None or rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        state = {"step": step, "optimizer": optimizer.state_dict(),
                 "modules": {n: m.state_dict() for n, m in modules.items()}}
        torch.save(state, Path(tmp) / STATE_FILE)
        export(Path(tmp) / "artefact")
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_steps(
    cfg: StageConfig, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
    step_fn: Callable[[int], tuple[torch.Tensor, dict]], export: Callable[[Path], None],
    frozen: dict[str, torch.nn.Module] | None = None,
) -> None:
    """The shared loop: device + DDP, restore, then step / clip / report / checkpoint until cfg.steps.

    `step_fn(step)` builds its batch on `device_of` its model and returns (loss, metrics); DDP averages the
    gradients over the workers during `backward`.
    """
    from tqdm import tqdm

    rank, _ = world()
    model = data_parallel(StageStep(modules, frozen or {}, step_fn))
    start = restore(modules, optimizer)  # after the move: the optimiser state lands on the parameters' device
    for step in tqdm(range(start, cfg.steps), desc=cfg.name, disable=rank != 0, mininterval=5):
        torch.manual_seed(hash((cfg.seed, step, rank)) % 2**31)
        loss, metrics = model(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        done = step + 1
        ckpt = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if ckpt or done % cfg.log_every == 0:
            report({"loss": loss.detach(), **metrics}, done, modules, optimizer, export if ckpt else None)


# ----------------------------------------------------------------------------------------------- driver
def launch(train_fn: Callable[[dict], None], cfg: StageConfig) -> Path:
    """Run `train_fn` as a TorchTrainer job; export the final checkpoint's artefact to cfg.out_dir()."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()  # joins the cluster named by RAY_ADDRESS (e.g. under `ray job submit`), else starts a local one
    problem = gpu_shortfall({"use_gpu": cfg.num_workers if cfg.use_gpu else 0},
                            float(ray.cluster_resources().get("GPU", 0.0)))
    if problem:
        raise ValueError(problem)
    storage = str(Path(cfg.storage).resolve())
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=cfg.model_dump(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {cfg.name}: finished without a checkpoint")
    out = cfg.out_dir()
    with result.checkpoint.as_directory() as d, atomic_dir(out) as tmp:  # the old artefact goes only once replaced
        shutil.copytree(Path(d) / "artefact", tmp, dirs_exist_ok=True)
        shutil.copy(Path(d) / "metrics.json", tmp / "metrics.json")
    print(f"[stage] {cfg.name}: exported {out} ({json.loads((out / 'metrics.json').read_text())})")
    return out


def main(cls: type[StageConfig], train_fn: Callable[[dict], None], argv: list[str]) -> int:
    """`python -m policy.stages.<stage> CONFIG [key=value ...]`: validate, then launch."""
    from core.cli import parse_config_args

    if train_fn.__module__ == "__main__":  # run as a script: use the importable module so workers import it by name
        import importlib

        module = importlib.import_module(sys.modules["__main__"].__spec__.name)
        cls, train_fn = getattr(module, cls.__name__), module.train_fn
    module = sys.modules[cls.__module__]  # the stage's own module (sft.py reuses pretrain's train_fn)
    name = module.__spec__.name if module.__spec__ else cls.__module__
    about = (module.__doc__ or "").split("\n\n")
    cfg = parse_config_args(cls, argv, f"python -m {name} CONFIG [key.sub=value ...] [--print-config]",
                            "\n\n".join([about[0]] + about[2:]))
    if isinstance(cfg, int):
        return cfg
    try:
        launch(train_fn, cfg)
    except ValueError as e:  # found at start-up, before any worker (a GPU the cluster lacks)
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
