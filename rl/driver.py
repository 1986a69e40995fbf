"""The central driver: the loop of DESIGN.md ("The loop"), on a local Ray or a cluster.

1 prompts (cursor) -> 2 work units (seeds from run seed, step, prompt index) -> 3 rollout pool -> 4 reward service
-> 5 group advantages -> 6 learner step -> 7 weights to workers (version = step) -> 8 metrics, grids, Parquet
-> 9 atomic checkpoint every N steps. SIGTERM finishes the step, checkpoints and returns.
"""
from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
import yaml
from tqdm import tqdm

from core.atomic import atomic_write_text
from core.resources import gpu_shortfall
from rewards.client import RewardServiceError
from rl.checkpoint import check_learner_checkpoint, latest_checkpoint, load_state, save_checkpoint
from rl.config import RunConfig
from rl.control import NAMESPACE, start_control
from rl.learner import LearnerDied
from rl.prompts import load_prompts
from rl.runstore import RunStore, credential_env, trim_eval_curve
from rl.step import StreamedRewards, assemble_step, check_staleness, make_units, step_metrics, step_table
from rl.tracking import Tracker
from rl.weight_sync import WeightSync, sync_backend
from rollout.pool import RolloutPool
from rollout.record import write_step
from rollout.worker import RolloutWorker


@dataclass
class DriverState:
    step: int = 0          # last completed step
    cursor: int = 0        # position in the prompt stream
    version: int = 0       # weight version held by the workers (= step)
    run_id: str | None = None
    eval_before: dict = field(default_factory=dict)


def run_gpu_asks(cfg: RunConfig) -> dict[str, float]:
    """{config field: GPUs a run asks for at start}: learner ranks, rollout workers, reward replicas."""
    svc = cfg.rewards.service
    return {"learner.use_gpu": cfg.learner.num_ranks * cfg.learner.gpus_per_rank if cfg.learner.use_gpu else 0.0,
            "rollout.gpus_per_worker": cfg.rollout.gpus_per_worker * cfg.rollout.workers,
            "rewards.service.num_gpus": svc.num_gpus * svc.replicas}


class RunFailed(RuntimeError):
    """The run stopped on a fault it cannot ride out (a dead learner rank, a full or read-only run directory).
    One line: what failed, and from which checkpoint `resume=true` continues. Nothing already written is damaged."""


def write_problem(path: Path) -> str | None:
    """Why `path` (or its nearest existing parent) cannot take writes, if it visibly cannot."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not os.access(path, os.W_OK):
        return "read-only or not writable"
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    return f"no space left on device ({free} bytes free)" if free < (1 << 20) else None


def resume_hint(run_dir: Path) -> str:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return "no checkpoint yet: rerun with resume=true to start again"
    return f"rerun with resume=true to continue from checkpoint step {int(ckpt.name.split('_')[1])}"


def last_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1].strip() if lines else ''}"


class StopFlag:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit 0."""

    def __init__(self):
        self.stop = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, *_):
        self.stop = True


class Driver:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.store = RunStore(self.run_dir, cfg.name, None)  # opened on `storage` in _prepare_run_dir
        self.timings: dict[str, float] = {}
        self.prefetched: dict[int, tuple] = {}  # off-policy: the next step's rollouts, sampled during a learner step
        self.doing = "start-up"  # what the driver is at, for the message of a fault that stops the run

    # ------------------------------------------------------------------ writes
    @contextmanager
    def _writing(self, what: str):
        """Any failure while writing into the run directory -> RunFailed naming what, where, and the cause."""
        try:
            yield
        except (LearnerDied, RunFailed):
            raise
        except Exception as e:
            problem = write_problem(self.run_dir) or last_line(e)
            raise RunFailed(f"run directory {self.run_dir}: could not write {what} ({problem}); "
                            f"{resume_hint(self.run_dir)}") from e

    # ------------------------------------------------------------------ set-up
    def _write_config(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.model_dump(mode="json"),
                                                                           sort_keys=False))
        except OSError as e:
            raise ValueError(f"runs_dir: {self.run_dir} cannot be written ({e.strerror})") from None

    def _prepare_remote(self) -> tuple[DriverState, str | None]:
        """storage is a URI: the newest complete checkpoint there decides; a resume downloads the run's files."""
        ckpt = self.store.latest_checkpoint()
        if ckpt is not None and not self.cfg.resume:
            raise ValueError(f"name: run {self.cfg.name} already has checkpoints in storage "
                             f"{self.cfg.model_dump(mode='json')['storage']}; pass resume=true or choose another name")
        state = DriverState(**self.store.restore()) if ckpt is not None else DriverState()
        self._write_config()
        self.store.push("config.yaml")
        if ckpt is not None:
            trim_eval_curve(self.run_dir / "eval_curve.jsonl", state.step)
        return state, ckpt

    def _prepare_run_dir(self) -> tuple[DriverState, Path | str | None]:
        self.store = RunStore(self.run_dir, self.cfg.name, self.cfg.storage)  # a bad storage: one line, exit 2
        if self.store.remote is not None:
            return self._prepare_remote()
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None and not self.cfg.resume:
            raise ValueError(f"name: run {self.cfg.name} already has checkpoints in {self.run_dir}; "
                             "pass resume=true to continue it or choose another name")
        problem = write_problem(self.run_dir)
        if problem:
            raise ValueError(f"runs_dir: {self.run_dir} cannot be written ({problem})")
        self._write_config()
        if ckpt is None:
            return DriverState(), None
        check_learner_checkpoint(ckpt / "learner")  # a damaged checkpoint is one line before anything starts
        state = DriverState(**load_state(ckpt))
        trim_eval_curve(self.run_dir / "eval_curve.jsonl", state.step)
        return state, ckpt

    def _start(self, state: DriverState, ckpt: Path | None) -> None:
        from policy.text_tokenizer import load_text_tokenizer
        from rewards.client import RewardClient
        from rewards.service import check_rewards, start_service
        from rl.learner import LearnerGroup

        cfg = self.cfg
        if not ray.is_initialized():
            ray.init(namespace=NAMESPACE, logging_level="WARNING", log_to_driver=cfg.logging.verbose)  # else: files
        problem = gpu_shortfall(run_gpu_asks(cfg), float(ray.cluster_resources().get("GPU", 0.0)))
        if problem:
            raise ValueError(problem)
        check_rewards(cfg.rewards)
        self.control = start_control(cfg.name, cfg.rollout.workers, cfg.rollout.min_workers, cfg.rollout.max_workers)
        learner_cfg = cfg.learner.model_copy(update={"batch_size": cfg.train_rows})
        # the learner's placement group first (its CPUs before the workers'), then every process starts at once:
        # the ranks, the rollout workers and the reward replicas each spend seconds importing torch and friends
        self.learner = LearnerGroup(cfg.policy_path, cfg.m, cfg.alpha, cfg.loss, learner_cfg, wait=False,
                                    env_vars=credential_env() if self.store.remote else None, sample=cfg.rollout.sample)
        self.pool = self._start_pool()
        with ThreadPoolExecutor(1) as ex:
            service = ex.submit(start_service, cfg.rewards, cfg.logging.verbose)
            try:
                self.tokenizer = load_text_tokenizer(Path(cfg.policy_path) / "text_tokenizer")  # no model weights
                self.items = load_prompts(cfg.prompts)
                self.learner.ready()
            finally:
                futures_wait([service])  # shut down only once the service call has returned
            self.rewards = RewardClient(service.result(), cfg.rewards)
        if isinstance(ckpt, str):  # on storage: every rank downloads the files it needs
            self.learner.load_from(self.store.uri, ckpt)
        elif ckpt is not None:
            self.learner.load(ckpt / "learner")  # checked in _prepare_run_dir
        r = cfg.rollout
        self.sync = WeightSync(self.learner, self.pool, r.weight_sync, r.sync_timeout_s,
                               sync_backend(cfg.learner.use_gpu, r.gpus_per_worker),
                               lazy=cfg.loop.off_policy_steps == 0)  # the learner steps during rollouts otherwise
        if state.version > 0:
            self.sync.push()
        with self._writing("metrics.jsonl"):
            self.tracker = Tracker(self.run_dir, cfg.name, cfg.logging.project, cfg.logging.wandb, state.run_id,
                                   cfg.model_dump(mode="json"), resume_step=state.step)
        state.run_id = self.tracker.run_id

    def _start_pool(self) -> RolloutPool:
        cfg, r = self.cfg, self.cfg.rollout
        lora = cfg.learner.lora.model_dump() if cfg.learner.lora else None
        factory = lambda: RolloutWorker.options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker).remote(  # noqa: E731
            cfg.policy_path, r.sample.model_dump(), cfg.m, lora, r.threads_per_worker, cfg.vmr.k, r.precision,
            cfg.loss.score)
        return RolloutPool(factory, r.workers, r.min_workers, r.max_workers,
                           desired=lambda: ray.get(self.control.rollout_workers.remote()))

    # ------------------------------------------------------------------ one step
    def _timed(self, name: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self.timings[name] = time.perf_counter() - t
        return out

    def _rollouts(self, step: int, cursor: int) -> tuple[list, dict, object]:
        """Sample step `step` with the weights the workers hold: (units, results, score(*reward batch) -> Scored).
        Streaming, each unit's reward request goes out as its rollout returns; `score` then waits for them."""
        cfg = self.cfg
        units = make_units(cfg, step, cursor, self.items, self.tokenizer)
        if not cfg.loop.stream_rewards:
            results = self._timed("rollout", self.pool.run, units)
            return units, results, lambda *batch: self._timed("reward", self.rewards.score, *batch)
        stream = StreamedRewards(self.rewards, cfg.vmr.k)
        results = self._timed("rollout", self.pool.run, units, stream.submit)
        return units, results, lambda images, *_: self._timed("reward", stream.gather, units, len(images))

    def _overlaps(self, step: int) -> bool:
        """Off-policy: sample step + 1 during this learner step, unless a checkpoint follows this step (so a resumed
        run samples step + 1 with the checkpoint's weights, exactly as the uninterrupted run did)."""
        c = self.cfg
        return bool(c.loop.off_policy_steps) and step < c.steps and step % c.checkpoint.every != 0

    def step(self, state: DriverState) -> dict:
        cfg, step = self.cfg, state.step + 1
        self.doing = f"step {step}"
        t0 = time.perf_counter()
        units, results, score = self.prefetched.pop(step, None) or self._rollouts(step, state.cursor)
        rows = assemble_step(units, results, score, cfg.m, cfg.vmr, cfg.normalize_std, cfg.adv_eps, cfg.down_sample)
        trained_from = self.learner.version  # the weights this step's gradient is applied to
        stale = check_staleness(results, trained_from, cfg.loop.off_policy_steps)
        if self._overlaps(step):
            started = self.learner.start_step(rows.batch)
            self.prefetched = {step + 1: self._rollouts(step + 1, state.cursor + len(units))}
            learn = self._timed("learner", self.learner.finish_step, started)
        else:
            learn = self._timed("learner", self.learner.step, rows.batch)
        self._timed("sync", self.sync.push)
        if self.pool.version != step:
            raise RuntimeError(f"learner is at weight version {self.pool.version}, the driver at step {step}")
        state.step, state.cursor, state.version = step, state.cursor + len(units), step
        t_log = time.perf_counter()
        metrics = {**step_metrics(rows, self.pool.size), **{f"learner/{k}": v for k, v in learn.items()}, **stale,
                   **{f"pool/{k}": v for k, v in self.pool.stats.items()},
                   **({f"sync/{k}": v for k, v in self.sync.stats.items()} if self.sync.mode == "collective" else {})}
        with self._writing(f"the records of step {step}"):
            written = [write_step(self.run_dir, step, step_table(step, units, results, rows, trained_from))]
            if step % cfg.logging.grid_every == 0 or step == cfg.steps:
                n = min(cfg.logging.grid_size, len(rows.images))
                rewards = rows.prefix.rewards.view(-1).tolist()
                written.append(self.tracker.grid(step, rows.images[:n],
                                                 [f"{p} R={r:.2f}" for p, r in zip(rows.prompts, rewards)][:n]))
            self.timings["logging"] = time.perf_counter() - t_log
            metrics.update({f"time/{k}": v for k, v in self.timings.items()})
            metrics["time/step"] = time.perf_counter() - t0
            self.tracker.log(step, metrics)
            if step % cfg.logging.grid_every == 0 or step == cfg.steps:
                written.append(self.tracker.reward_curve())
            self.store.push(*[str(Path(w).relative_to(self.run_dir)) for w in written])
        return metrics

    def checkpoint(self, state: DriverState) -> Path | str:
        t = time.perf_counter()
        self.doing = f"checkpoint step {state.step}"
        with self._writing(self.doing):
            if self.store.remote is not None:  # ranks upload their own files, then the driver's manifest
                rel = self.store.rel(f"checkpoints/step_{state.step:06d}")
                files = self.learner.save_to(self.store.uri, f"{rel}/learner")
                path = self.store.commit_checkpoint(state.step, state.__dict__, files, self.cfg.checkpoint.keep)
            else:
                path = save_checkpoint(self.run_dir, state.step, state.__dict__, self.learner.save,
                                       self.cfg.checkpoint.keep)
        self.timings["checkpoint"] = time.perf_counter() - t
        return path

    # ------------------------------------------------------------------ evaluation and export
    def export_policy(self, name: str = "final_policy") -> Path:
        """The current policy as a policy directory (LoRA adapters merged): RUN/final_policy, written by the learner."""
        out = self.run_dir / name
        self.learner.export(out, *((self.store.uri, self.store.rel(name)) if self.store.remote else ()))
        return out

    def evaluate(self, policy_dir: str | Path, tag: str, step: int) -> dict:
        """Held-out score of a policy directory (RUN/eval_TAG/, by a Ray task); a line of RUN/eval_curve.jsonl."""
        from policy.evaluate import EvalConfig
        from rl.evaluation import evaluate_remote

        e = self.cfg.eval
        ecfg = EvalConfig(sample=self.cfg.rollout.sample, images_per_category=e.images_per_category,
                          seed=self.cfg.seed + 777)
        remote = (self.store.uri, self.store.rel(f"eval_{tag}")) if self.store.remote else ()
        result = evaluate_remote(policy_dir, ecfg, self.run_dir / f"eval_{tag}", f"eval {tag}",
                                 torch.get_num_threads(), *remote)
        with open(self.run_dir / "eval_curve.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "tag": tag, **result}) + "\n")
        self.store.push("eval_curve.jsonl")
        return result

    def compare_before_after(self) -> dict:
        """Paired change of each verdict (same prompts and seeds) and RUN/before_after.png, side by side."""
        from policy.evaluate import paired_comparison, side_by_side

        self.store.fetch_missing("eval_before", "eval_after")
        before, after = self.run_dir / "eval_before", self.run_dir / "eval_after"
        side_by_side(before, after, self.run_dir / "before_after.png")
        b, a = (json.loads((d / "scores.json").read_text()) for d in (before, after))
        return {key: paired_comparison(b, a, key) for key in ("strict", "template")}

    def periodic_eval(self, step: int) -> None:
        """eval.every: the learner's current weights on the held-out set, between steps."""
        self.doing = f"the held-out evaluation at step {step}"
        with self._writing(self.doing):
            result = self.evaluate(self.export_policy("eval_policy"), f"step_{step}", step)
            self.tracker.log(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)})

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        state, ckpt = self._prepare_run_dir()
        stop = StopFlag()
        bar = None
        try:
            self._start(state, ckpt)
            if self.cfg.eval.enabled and not state.eval_before:
                state.eval_before = self.evaluate(self.cfg.policy_path, "before", 0)
                with self._writing("metrics.jsonl"):
                    self.tracker.log(state.step, {f"eval/before/{k}": v for k, v in state.eval_before.items()})
            bar = tqdm(total=self.cfg.steps, initial=state.step, desc=f"prefix-GRPO {self.cfg.name}", unit="step")
            return self._loop(state, stop, bar)
        except (LearnerDied, RewardServiceError) as e:
            raise RunFailed(f"{e} in {self.doing}; the run stopped; {resume_hint(self.run_dir)}") from None
        finally:
            if bar is not None:
                bar.close()
            self.shutdown()

    def _loop(self, state: DriverState, stop: StopFlag, bar: tqdm) -> dict:
        cfg = self.cfg
        while state.step < cfg.steps:
            metrics = self.step(state)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", workers=self.pool.size)
            if state.step % cfg.checkpoint.every == 0 or state.step == cfg.steps or stop.stop:
                self.checkpoint(state)
            e = cfg.eval
            if e.enabled and e.every and state.step % e.every == 0 and state.step < cfg.steps and not stop.stop:
                self.periodic_eval(state.step)
            if stop.stop:
                print(f"stopping on signal after step {state.step} (checkpoint written)", flush=True)
                return {"stopped_at": state.step}
        self.doing = "the final_policy export"
        with self._writing("final_policy"):
            summary = {"steps": state.step, "eval_before": state.eval_before, "final_policy": str(self.export_policy())}
        if cfg.eval.enabled:
            with self._writing("eval_after"):
                summary["eval_after"] = self.evaluate(summary["final_policy"], "after", state.step)
                self.tracker.log(state.step, {f"eval/after/{k}": v for k, v in summary["eval_after"].items()})
                summary["paired"] = self.compare_before_after()
        with self._writing("summary.json"):
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
            self.store.push("summary.json", "before_after.png", "metrics.jsonl")
        return summary

    def shutdown(self) -> None:
        """Release actors, the service and files; each part on its own, so one failure does not hide the cause."""
        parts = [getattr(self, "pool", None), getattr(self, "learner", None), getattr(self, "tracker", None)]
        for close in [p.shutdown if hasattr(p, "shutdown") else p.close for p in parts if p is not None]:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - a full disk can also fail the last flush; the cause is raised above
                print(f"warning: shutdown: {last_line(e)}", flush=True)
        if getattr(self, "control", None) is not None:
            ray.kill(self.control)
        try:
            from ray import serve

            serve.delete(self.cfg.rewards.service.name)
        except Exception:  # the service may not have started
            pass
