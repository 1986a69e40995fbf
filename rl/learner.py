"""The learner: N Ray actors, one DeepSpeed engine each, one torch.distributed group (gloo on CPU, nccl on GPU).

    driver  LearnerGroup.step(batch)        splits the B rows into N contiguous shards, one per rank
    rank r  LearnerActor.step(shard)        micro-batches in a fixed order; per micro-batch:
                                              loss = micro_step(...)          (rl/update.py: the math, pure)
                                              engine.backward(loss); engine.step()
    one optimiser step per pass over the shard (DeepSpeed gradient accumulation = micro-batches per rank);
    `passes` passes over the same batch (PPO-style epochs; old log-probs stay those of the rollouts, or with
    `recompute_old_logprobs` — the default in bf16 — the learner's own before the update, as verl computes them).

The forward covers only `text + <boi> + scales 2..m`. The multi-scale tokenizer (vq) is frozen and kept out of
the DeepSpeed module (it only turns codes into input features). Reference model for beta > 0: with LoRA the same
model with its adapters disabled (no second copy); without LoRA a frozen copy of the initial weights (a full
replica on every rank, also under ZeRO-3); beta == 0 loads none.

The DeepSpeed config comes from rl/strategy.py (deepspeed_config), the optimiser from policy/optim.py (torch AdamW
passed to deepspeed.initialize: no DeepSpeed op needs compiling; weight decay on parameters with dim >= 2 only).

Metrics of a step are means over ranks x passes x micro-batches (maxima for ratio_max and
ratio_first_pass_max_abs_dev = max |rho - 1| over every micro-batch of the first pass: all of them run before the
first optimiser step, so it checks that the old log-probs equal the learner's; with recomputed old log-probs the
rollouts' distance from them is rollout_logp_max_abs_dev). `version` counts steps;
`publish()` hands out (version, object ref of the trainable state: all weights, or only the LoRA adapters);
`export(out)` writes the current policy as a policy directory from rank 0 (the driver holds no weights).
Determinism: every rank seeds from cfg.seed, no dropout by default, fixed shard and micro-batch order.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path

import ray
import torch

from core.collective import free_port, open_group, send_state, state_layout
from core.settings import SampleConfig
from policy.scales import prefix_tokens
from policy.scoring import PrefixScores
from policy.weights import apply_lora, own_state, trainable_state
from rl.config import GRPOLossConfig
from rl.strategy import LearnerConfig, deepspeed_config, micro_loss_scale, recomputes_old_logprobs
from rl.update import (
    PrefixScorer, TrainBatch, base_model, ema_start, ema_update, learner_old_logprobs, learner_optimizer, loss_guidance,
    micro_batches, micro_step, prefix_of, reduce_metrics, ref_logprobs, register_direct_params, seed_everything,
    split_rows,
)

CHECKPOINT_TAG = "learner"


# ------------------------------------------------------------------------------------------------ one rank
@ray.remote
class LearnerActor:
    """One rank: holds one DeepSpeed engine; the math is in score_prefix and prefix_grpo_loss."""

    def __init__(self, rank: int, world_size: int, policy_dir: str, m: int, alpha: float,
                 loss_cfg: GRPOLossConfig, cfg: LearnerConfig, sample: SampleConfig | None = None):
        self.rank, self.world_size, self.policy_dir = rank, world_size, policy_dir
        self.m, self.alpha, self.loss_cfg, self.cfg, self.sample = m, alpha, loss_cfg, cfg, sample
        os.environ["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "nextscale-rl-torch-ext"))

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def pid(self) -> int:
        return os.getpid()

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by this actor's process (all its threads): steady timing on a shared machine."""
        return time.process_time()

    def setup(self, master: tuple[str, int]) -> dict:
        """Join the process group at rank 0's (address, port) and build the engine."""
        import deepspeed

        from policy.io import Policy

        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        if not self.cfg.use_gpu:  # every DeepSpeed op unavailable: no JIT build of the shm-comm op; gloo it is
            deepspeed.ops.__compatible_ops__ = {}
        deepspeed.init_distributed(dist_backend="nccl" if self.cfg.use_gpu else "gloo", auto_mpi_discovery=False,
                                   timeout=timedelta(minutes=10))
        seed_everything(self.cfg.seed)
        policy = Policy.load(self.policy_dir)
        model = policy.model
        for p in policy.vq.parameters():
            p.requires_grad_(False)
        self.ref = None
        if self.loss_cfg.beta and self.cfg.lora is None:
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        if self.cfg.lora is not None:
            model = apply_lora(model, self.cfg.lora)
        guidance = loss_guidance(self.loss_cfg, self.sample, base_model(model).schedule, self.m)
        scorer = PrefixScorer(model, policy.vq, self.m, guidance).train()
        self.ds_config = deepspeed_config(self.cfg)
        self.zero_stage = self.ds_config["zero_optimization"].get("stage", 0)
        if self.zero_stage == 3:
            register_direct_params(scorer)
        self.engine, *_ = deepspeed.initialize(model=scorer, optimizer=learner_optimizer(scorer, self.cfg),
                                                config=self.ds_config)
        self.vq = policy.vq.to(self.engine.device)
        if self.ref is not None:
            dtype = next(self.engine.module.parameters()).dtype
            self.ref = PrefixScorer(self.ref.to(self.engine.device, dtype), self.vq, self.m, guidance)
        sched = base_model(model).schedule[: self.m]
        self.prefix = prefix_of(sched, self.m, self.alpha, self.engine.device)  # k_s and scale of each token
        self._last_grad_norm = 0.0
        self.average = ema_start(self.trainable_state()) if self.cfg.ema else None   # learner.ema: initial weights
        return {"schedule": sched, "tokens": prefix_tokens(sched, self.m), "zero_stage": self.zero_stage,
                "micro_batch": self.ds_config["train_micro_batch_size_per_gpu"]}

    # -------------------------------------------------------------------------------------------- forward
    def _scores(self, text_ids: list[list[int]], codes: list[torch.Tensor], reference: bool = False):
        """(B, N_m) log-probs and entropy; reference: the frozen copy, or (LoRA) the base with adapters off."""
        codes = [c.to(self.engine.device) for c in codes[: self.m]]
        if not reference:
            return self.engine(text_ids, codes)
        if self.ref is not None:
            return self.ref(text_ids, codes)
        if self.cfg.lora is None:
            raise ValueError("reference: this learner holds no reference model (beta == 0 and no LoRA)")
        with self.engine.module.model.disable_adapter():
            return self.engine(text_ids, codes)

    # -------------------------------------------------------------------------------------------- training
    def step(self, shard: TrainBatch) -> list[dict[str, float]]:
        micro = micro_batches(shard, self.ds_config["train_micro_batch_size_per_gpu"])
        gas = self.ds_config["gradient_accumulation_steps"]
        if len(micro) != gas:
            raise ValueError(f"batch: {len(shard)} rows on rank {self.rank} make {len(micro)} micro-batches, not {gas}")
        cpu0 = time.process_time()
        reference = partial(self._scores, reference=True)
        refs = [ref_logprobs(reference, mb, self.loss_cfg) for mb in micro]   # constant over passes
        self.engine.train()
        records = []
        if recomputes_old_logprobs(self.cfg):
            micro, gaps = zip(*(learner_old_logprobs(self._scores, mb) for mb in micro))
            records.append({"rollout_logp_max_abs_dev": max(gaps)})
        for p in range(self.cfg.passes):
            lr = float(self.engine.get_lr()[0])  # this pass's (a DeepSpeed `scheduler` moves it per optimiser step)
            for mb, ref in zip(micro, refs):
                scale = micro_loss_scale(len(mb), len(shard), gas)
                records.append(self._micro_step(mb, ref, scale, first_pass=p == 0))
            records.append({"grad_norm": self._last_grad_norm, "lr": lr})
        records.append({"cpu_seconds": time.process_time() - cpu0})  # this rank's CPU time of the step (mean over ranks)
        return records

    def _micro_step(self, mb: TrainBatch, ref: torch.Tensor | None, scale: float, first_pass: bool) -> dict:
        """rl.update.micro_step, then DeepSpeed's backward and step (an optimiser step at the accumulation boundary)."""
        loss, metrics = micro_step(self._scores, mb, self.prefix, self.loss_cfg, ref, first_pass)
        self.engine.backward(loss * scale)
        boundary = self.engine.is_gradient_accumulation_boundary()
        manual_norm = self._grad_norm() if boundary and self.zero_stage == 0 else None
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self._last_grad_norm = float(norm if norm is not None else manual_norm)
            if self.average is not None:
                ema_update(self.average, own_state(self.engine.module.model), self.cfg.ema)
        return metrics

    def _grad_norm(self) -> float:
        """Pre-clipping L2 norm of the (already all-reduced) gradients; ZeRO stages report their own."""
        grads = [p.grad.float().pow(2).sum() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.stack(grads).sum().sqrt().item() if grads else 0.0

    # -------------------------------------------------------------------------------------------- weights
    def _gathered(self):
        if self.zero_stage != 3:
            return nullcontext()
        from deepspeed.runtime.zero import GatheredParameters

        return GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        with self._gathered():
            return trainable_state(self.engine.module.model)

    def open_sync(self, addr: str, port: int, world: int, timeout_s: float, backend: str) -> int:
        """Root (rank 0) of a weight broadcast group with the rollout workers (core.collective)."""
        self.sync_group, self.sync_backend = open_group(addr, port, world, 0, timeout_s, backend), backend
        return 0

    def send_weights(self, ranks: list[int]) -> tuple[list[int], int]:
        """The trainable state to `ranks` of the sync group: (ranks whose send failed, bytes per worker)."""
        state = self.trainable_state()
        if self.sync_backend == "gloo":
            state = {k: v.cpu() for k, v in state.items()}
        return send_state(self.sync_group, state, state_layout(state), ranks), sum(
            v.numel() * v.element_size() for v in state.values())

    def sync_layout(self) -> list:
        return state_layout(self.trainable_state())

    @torch.no_grad()
    def score(self, text_ids: list[list[int]], codes: list[torch.Tensor], reference: bool) -> PrefixScores:
        self.engine.eval()
        lp, ent = self._scores(text_ids, codes, reference)
        return PrefixScores(lp.float().cpu(), ent.float().cpu())

    def export(self, out_dir: str, uri: str | None = None, rel: str = "") -> str | None:
        """Rank 0 writes the policy (learner.ema: the running average) as a policy directory; ZeRO-3: all gather."""
        from policy.io import Policy
        from policy.weights import export_policy

        state = self.average if self.average is not None else self.trainable_state()
        if self.rank != 0:
            return None
        out = export_policy(Policy.load(self.policy_dir), state, self.cfg.lora, out_dir)
        if uri is not None:  # a storage URI: rank 0 uploads what it wrote
            from rl.storage import open_storage

            open_storage(uri, probe=False).upload(out, rel)
        return str(out)

    def save(self, path: str, client_state: dict) -> None:
        extra = {"ema": self.average} if self.average is not None else {}
        self.engine.save_checkpoint(path, tag=CHECKPOINT_TAG, client_state=client_state | extra,
                                    exclude_frozen_parameters=self.cfg.lora is not None)

    def load(self, path: str) -> dict:
        loaded, client_state = self.engine.load_checkpoint(path, tag=CHECKPOINT_TAG,
                                                           load_module_strict=self.cfg.lora is None)
        if loaded is None:
            raise FileNotFoundError(f"learner checkpoint: nothing to load in {path}")
        state = dict(client_state or {})
        average = state.pop("ema", None)
        if self.average is not None:  # a checkpoint of a run without learner.ema: the average starts here
            self.average = average or ema_start(self.trainable_state())
        return state

    def save_to(self, uri: str, rel: str, client_state: dict) -> list[tuple[str, int]]:
        """Save into this node's scratch folder, upload the files this rank wrote to storage `rel`, drop the scratch."""
        from rl.runstore import upload_rank_files

        scratch = Path(tempfile.mkdtemp(prefix=f"nextscale-learner{self.rank}-"))
        try:
            self.save(str(scratch), client_state)
            return upload_rank_files(uri, scratch, rel, self.rank)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def load_from(self, uri: str, ckpt: str, sub: str) -> dict:
        """Download the checkpoint files this rank needs into a scratch folder and load them."""
        from rl.runstore import download_rank_files

        scratch = Path(tempfile.mkdtemp(prefix=f"nextscale-learner{self.rank}-"))
        try:
            download_rank_files(uri, ckpt, sub, scratch, self.rank)
            return self.load(str(scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the group
class LearnerDied(RuntimeError):
    """A learner rank's process died (SIGKILL, OOM, node loss): the group cannot go on; resume from a checkpoint."""


def gather(refs: list, what: str) -> list:
    """ray.get of one call per rank, failing as soon as any rank dies (the others may be stuck in a collective)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            rank = refs.index(done[0])
            raise LearnerDied(f"learner rank {rank} died during {what} ({type(e).__name__})") from None
    return ray.get(refs)


class LearnerGroup:
    """Driver side: a placement group of num_ranks bundles, one LearnerActor per bundle, one process group."""

    def __init__(self, policy_dir: str | Path, m: int, alpha: float, loss: GRPOLossConfig, cfg: LearnerConfig,
                 seed: int | None = None, batch_size: int | None = None, env_vars: dict | None = None,
                 sample: SampleConfig | None = None, wait: bool = True):
        """`seed` / `batch_size`, when given, replace cfg.seed / cfg.batch_size (the run's seed, prompts x G);
        `env_vars` go to the ranks' processes (the storage credentials of the driver's environment); `sample`: the
        rollouts' settings (needed by loss.score: guided). wait=False: the placement group is reserved, the ranks
        start in the background, `ready()` waits for them (the driver starts its other processes meanwhile)."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not Path(policy_dir).is_dir():
            raise FileNotFoundError(f"policy_dir: {policy_dir} is not a policy directory")
        update = {k: v for k, v in (("seed", seed), ("batch_size", batch_size)) if v is not None}
        cfg = LearnerConfig.model_validate(cfg.model_dump() | update)
        deepspeed_config(cfg)  # batch_size must be known by now
        self.cfg, self.m, self.version = cfg, m, 0
        gpus = cfg.gpus_per_rank if cfg.use_gpu else 0
        bundle = {"CPU": cfg.cpus_per_rank} | ({"GPU": gpus} if gpus else {})
        self.pg = placement_group([bundle] * cfg.num_ranks, strategy="PACK")
        ray.get(self.pg.ready())
        self.actors = [
            LearnerActor.options(
                num_cpus=cfg.cpus_per_rank, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
                **({"runtime_env": {"env_vars": env_vars}} if env_vars else {}),
            ).remote(r, cfg.num_ranks, str(Path(policy_dir).resolve()), m, alpha, loss, cfg, sample)
            for r in range(cfg.num_ranks)
        ]
        master = self.actors[0].address.remote()  # resolved by Ray before any rank's setup runs
        self._setup = [a.setup.remote(master) for a in self.actors]
        if wait:
            self.ready()

    def ready(self) -> "LearnerGroup":
        """Wait until every rank has joined the process group and built its engine."""
        try:
            self.info = ray.get(self._setup)[0] if self._setup is not None else self.info
        except BaseException:
            self.shutdown()
            raise
        self._setup = None
        return self

    def _all(self, method: str, *args) -> list:
        return gather([getattr(a, method).remote(*args) for a in self.actors], method)

    def step(self, batch: TrainBatch) -> dict[str, float]:
        """One learner step (`passes` optimiser steps) on B rows; metrics averaged over ranks and micro-batches."""
        return self.finish_step(self.start_step(batch))

    def start_step(self, batch: TrainBatch) -> list[ray.ObjectRef]:
        """Send the step to the ranks and return at once (the driver samples the next step meanwhile)."""
        if len(batch) != self.cfg.batch_size:
            raise ValueError(f"batch: {len(batch)} rows, the learner is set up for batch_size {self.cfg.batch_size}")
        if len(batch.codes) < self.m or batch.old_logprobs.shape[1] != self.info["tokens"]:
            raise ValueError(f"batch: needs codes of scales 1..{self.m} and old_logprobs (B, {self.info['tokens']}), "
                             f"got {len(batch.codes)} scales and {tuple(batch.old_logprobs.shape)}")
        batch = TrainBatch(batch.text_ids, batch.codes[: self.m], batch.old_logprobs, batch.advantages)
        return [a.step.remote(s) for a, s in zip(self.actors, split_rows(batch, self.cfg.num_ranks))]

    def finish_step(self, refs: list[ray.ObjectRef]) -> dict[str, float]:
        """Wait for a started step; its metrics averaged over ranks and micro-batches."""
        records = gather(refs, "a learner step")
        self.version += 1
        return reduce_metrics([r for rank in records for r in rank]) | {"version": self.version}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Rank 0's trainable weights (all, or the LoRA adapters); ZeRO-3 partitions are gathered first."""
        return ray.get(self.publish()[1])

    def rank_states(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's trainable weights (the ranks of a healthy group hold identical ones)."""
        return self._all("trainable_state")

    def publish(self) -> tuple[int, ray.ObjectRef]:
        """(version, object ref of the trainable state): the ref can go to every rollout worker as is."""
        ranks = self.actors if self.info["zero_stage"] == 3 else self.actors[:1]   # ZeRO-3: all ranks gather
        refs = [a.trainable_state.remote() for a in ranks]
        gather(refs[1:], "a weight gather")
        return self.version, refs[0]

    def export(self, out_dir: str | Path, uri: str | None = None, rel: str = "") -> Path:
        """The current policy as a policy directory at `out_dir` on rank 0's node (uploaded to `uri`/`rel` if set)."""
        ranks = self.actors if self.info["zero_stage"] == 3 else self.actors[:1]   # ZeRO-3: all ranks gather
        out = str(Path(out_dir).resolve())                                          # actors have their own cwd
        return Path(gather([a.export.remote(out, uri, rel) for a in ranks], "the policy export")[0])

    def score(self, text_ids: list[list[int]], codes: list[torch.Tensor], reference: bool = False) -> PrefixScores:
        """Per-token log-probs / entropy of scales 1..m under the learner's model (or its reference), no grad."""
        return self._all("score", text_ids, codes[: self.m], reference)[0]

    def save(self, path: str | Path) -> None:
        """DeepSpeed checkpoint (weights + optimiser state + version) into `path` (shared storage across nodes)."""
        self._all("save", str(path), {"version": self.version})

    def load(self, path: str | Path) -> None:
        self.version = int(self._all("load", str(path))[0].get("version", 0))

    def save_to(self, uri: str, rel: str) -> list[tuple[str, int]]:
        """A checkpoint on storage `uri` under `rel`: every rank uploads its own files; (path, size) of all."""
        return [f for files in self._all("save_to", uri, rel, {"version": self.version}) for f in files]

    def load_from(self, uri: str, ckpt: str, sub: str = "learner") -> None:
        self.version = int(self._all("load_from", uri, ckpt, sub)[0].get("version", 0))

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in getattr(self, "actors", []):
            ray.kill(a)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)
            self.pg = None
