"""One step's data, pure: work units from the prompt stream, and the rollouts -> rewards -> advantages -> learner
rows assembly, every row in unit order. `StreamedRewards` sends each unit's reward request as its rollout returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from rewards.combine import Scored
from rl.config import RunConfig, VMRConfig
from rl.grpo import group_advantages, max_variance_subset, zero_std_fraction
from rl.prompts import prompts_at
from rl.update import TrainBatch
from rl.vmr import PrefixScores, completion_batch, prefix_scores, vmr_metrics
from rollout.record import rollout_table
from rollout.units import UnitResult, WorkUnit, unit_seed


def make_units(cfg: RunConfig, step: int, cursor: int, items: list, tokenizer) -> list[WorkUnit]:
    picked = prompts_at(items, cfg.seed, cursor, cfg.prompts_per_step, balance=cfg.prompts.balance)
    ids = tokenizer([p for p, _ in picked], add_special_tokens=False)["input_ids"]
    return [WorkUnit(f"{step}/{i}", step, i, p, tuple(t), unit_seed(cfg.seed, step, i), cfg.group_size, meta)
            for i, ((p, meta), t) in enumerate(zip(picked, ids))]


def train_batch(units: list[WorkUnit], results: dict[str, UnitResult], advantages: torch.Tensor, m: int,
                keep: torch.Tensor) -> TrainBatch:
    """The learner's rows in unit order: row i's text, codes, old log-probs and advantage are those of sample i.
    keep (P, k): the samples of each unit that train (all G, or those down-sampling keeps), in that order."""
    rows = [results[u.uid] for u in units]
    text = [list(u.text_ids) for u in units for _ in range(keep.shape[1])]
    codes = [torch.from_numpy(np.concatenate([r.codes[s][j.numpy()] for r, j in zip(rows, keep)])) for s in range(m)]
    old = torch.from_numpy(np.concatenate([r.logprobs[j.numpy()] for r, j in zip(rows, keep)]))
    return TrainBatch(text_ids=text, codes=codes, old_logprobs=old,
                      advantages=advantages.gather(1, keep).reshape(-1).float())


@dataclass
class StepRows:
    """One step's B = P x G rows, all in unit order (row p * G + j = sample j of unit p)."""
    images: np.ndarray          # (B, H, W, 3) uint8 rollout images
    prompts: list[str]          # (B,)
    prefix: PrefixScores        # rewards / values (P, G), completions (P, G, K), components (B,)
    advantages: torch.Tensor    # (P, G); 0 for a sample left out by down-sampling
    batch: TrainBatch
    keep: torch.Tensor          # (P, k) the samples of each unit that are the batch's rows (k = G: all)


def assemble_step(units: list[WorkUnit], results: dict[str, UnitResult], score, m: int, vmr: VMRConfig,
                  normalize_std: bool, adv_eps: float, down_sample: int = 0) -> StepRows:
    """Rollouts -> reward batch -> `score(images, prompts, metadata)` -> prefix values -> advantages -> TrainBatch.
    down_sample k > 0: each group trains on its k samples of largest value variance, advantages within them.

    Every row follows `units`, never the order the results came back in (`results` is keyed by uid)."""
    images = np.concatenate([results[u.uid].images for u in units])
    prompts = [u.prompt for u in units for _ in range(u.group_size)]
    meta = [u.metadata for u in units for _ in range(u.group_size)]
    scored = score(*completion_batch(units, results, images, prompts, meta, vmr.k))     # B * K images (VMR)
    prefix = prefix_scores(scored.total, scored.components, len(units), units[0].group_size, vmr)
    keep = max_variance_subset(prefix.values, down_sample or units[0].group_size)      # all G when off
    adv = torch.zeros_like(prefix.values).scatter(
        1, keep, group_advantages(prefix.values.gather(1, keep), normalize_std, adv_eps))
    return StepRows(images, prompts, prefix, adv, train_batch(units, results, adv, m, keep), keep)


def step_table(step: int, units: list[WorkUnit], results: dict[str, UnitResult], rows: StepRows,
               learner_version: int | None = None):
    """The rollout record of a step (rollout/record.py), one row per sample in unit order, with a `trained` column
    (false: left out by down-sampling); with the learner's weight version at training, a `staleness` column
    (learner version - the sample's version)."""
    p = rows.prefix
    table = rollout_table(step, units, results, p.rewards.view(-1).numpy(), p.components,
                          rows.advantages.view(-1).numpy(), p.values.reshape(-1).numpy(),
                          p.completions.reshape(len(rows.images), -1).numpy())
    trained = torch.zeros_like(rows.advantages, dtype=torch.bool).scatter(1, rows.keep, True).reshape(-1).numpy()
    table = table.append_column("trained", pa.array(trained, pa.bool_()))
    if learner_version is None:
        return table
    return table.append_column("staleness", pa.array(learner_version - np.asarray(table["version"]), pa.int64()))


def check_staleness(results: dict[str, UnitResult], learner_version: int, bound: int) -> dict[str, float]:
    """Staleness of a step's samples (learner version - sample version): metrics, or RuntimeError past `bound`."""
    stale = np.array([learner_version - r.version for r in results.values()])
    if stale.max() > bound or stale.min() < 0:
        raise RuntimeError(f"off-policy: samples {int(stale.max())} version(s) behind the learner, bound {bound}")
    return {"rollout/staleness_max": float(stale.max()), "rollout/staleness_mean": float(stale.mean())}


def step_metrics(rows: StepRows, workers: int) -> dict[str, float]:
    """Reward, group and VMR statistics of one step (and the pool's size)."""
    p = rows.prefix
    return {"reward/mean": p.rewards.mean().item(), "reward/std": p.rewards.std().item(),
            "zero_std_groups": zero_std_fraction(p.values), "rollout/workers": workers, **vmr_metrics(p),
            **component_metrics(p.components)}


def component_metrics(components: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean and std of each reward component over the rows it applies to: NaN marks a row without it (a verifier
    check the prompt does not ask, e.g. "position" for "a circle"); a component no row has this step is left out."""
    out = {}
    for k, v in components.items():
        v = np.asarray(v, dtype=np.float64)
        v = v[~np.isnan(v)]
        if len(v):
            out[f"reward/{k}/mean"], out[f"reward/{k}/std"] = float(v.mean()), float(v.std())
    return out


class StreamedRewards:
    """Each unit's reward batch (its G images, or G x K completions under VMR) goes to the reward service as soon
    as its rollout returns (`submit`, the pool's per-unit callback), so requests of many units are in flight at
    once and the service batches them across replicas; `gather` waits for them and returns the step's Scored in
    unit order: the same rows as one request for the whole step (completion_batch is unit-major)."""

    def __init__(self, client, k: int):
        self.client, self.k = client, k
        self.pending: dict = {}

    def submit(self, unit: WorkUnit, result: UnitResult) -> None:
        g = unit.group_size
        batch = completion_batch([unit], {unit.uid: result}, result.images, [unit.prompt] * g, [unit.metadata] * g,
                                 self.k)
        self.pending[unit.uid] = self.client.submit(*batch)

    def gather(self, units: list[WorkUnit], n: int) -> Scored:
        scored = Scored.concat([self.pending.pop(u.uid).result() for u in units])
        if len(scored) != n:
            raise RuntimeError(f"streamed rewards: {len(scored)} scores for a reward batch of {n}")
        return scored
