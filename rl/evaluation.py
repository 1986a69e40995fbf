"""The held-out evaluation of a run in a Ray task, so the driver never loads model weights.

The task loads the policy folder, samples the evaluation set batch by batch (streaming a progress count back to
the driver's progress bar), judges the images, writes RUN/eval_TAG/ (uploaded to storage when the run has one)
and returns the summary. It reserves a quarter of a CPU (it runs between steps, while the rollout workers and the
learner wait) and uses `threads` torch threads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from rl.runstore import credential_env
from shapes.world import CATEGORIES


@ray.remote(num_returns="streaming")
def _evaluate(policy_dir: str, ecfg: dict, out_dir: str, threads: int, uri: str | None, rel: str):
    import torch

    from policy.evaluate import EvalConfig, eval_items, image_batches, judge_images, summarize, write_report
    from policy.io import Policy

    torch.set_num_threads(threads)
    cfg = EvalConfig.model_validate(ecfg)
    items = eval_items(cfg.images_per_category, cfg.seed)
    images = []
    for batch in image_batches(Policy.load(policy_dir), items, cfg):
        images.append(batch)
        yield len(batch)
    images = np.concatenate(images)
    records = judge_images(images, items)
    result = summarize(records)
    write_report(result, images, records, out_dir, cfg.grid_size)
    if uri is not None:
        from rl.storage import open_storage

        open_storage(uri, probe=False).upload(Path(out_dir), rel)
    yield result


def evaluate_remote(policy_dir: str | Path, ecfg, out_dir: Path, desc: str, threads: int,
                    uri: str | None = None, rel: str = "") -> dict:
    """Run the evaluation as a Ray task; a tqdm bar counts its images; returns the summary."""
    total = ecfg.images_per_category * len(CATEGORIES)
    env = {"runtime_env": {"env_vars": credential_env()}} if uri else {}  # the task uploads with the run's credentials
    gen = _evaluate.options(num_cpus=0.25, **env).remote(str(Path(policy_dir).resolve()), ecfg.model_dump(),
                                                   str(Path(out_dir).resolve()), threads, uri, rel)
    with tqdm(total=total, desc=desc, unit="img", leave=False) as bar:
        for ref in gen:
            out = ray.get(ref)
            if isinstance(out, dict):
                return out
            bar.update(out)
    raise RuntimeError(f"{desc}: the evaluation task ended without a result")
