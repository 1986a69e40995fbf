"""The RL loop on a local Ray with real actors, Serve and DeepSpeed: layout, elastic workers, config errors
(two-rank ZeRO-2 steps: tests/test_learner.py).

Faults (killed workers, replica, learner rank, driver; disk) are in tests/reliability/test_faults.py."""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from safetensors.torch import load_file

from core.config import ConfigError, load_config
from rl.config import RunConfig
from rl.control import NAMESPACE, control_name
from rl.driver import Driver
from tests.conftest import final_weights, rewards_per_step, run_config, same_weights

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_one_step_layout_and_first_pass_ratio(reference_run):
    rows = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["learner/ratio_first_pass_max_abs_dev"] <= 1e-4
    assert all(np.isfinite(r["learner/loss"]) for r in rows)
    table = pq.read_table(reference_run / "rollouts")
    assert table.num_rows == 3 * 3 * 4 and {"reward/verifier", "reward/colour_fraction", "advantage", "image_png"} <= set(
        table.column_names)
    assert sorted(set(table["version"].to_pylist())) == [0, 1, 2]
    assert (reference_run / "reward_curve.png").exists() and (reference_run / "samples" / "step_000002.png").exists()
    assert (reference_run / "config.yaml").exists() and len(list((reference_run / "checkpoints").glob("step_*"))) == 2
    assert list((reference_run / "wandb").glob("offline-run-*"))
    w0 = load_file(Path(RunConfig.model_validate(yaml.safe_load((reference_run / "config.yaml").read_text())).policy_path)
                   / "transformer" / "model.safetensors")
    assert not same_weights(w0, final_weights(reference_run))


def _wait_for(cond, what: str, done: threading.Event, timeout: float = 300) -> None:
    """Poll `cond` until true; fail (instead of hanging) once the driver has stopped or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if done.is_set():
            raise RuntimeError(f"the driver stopped before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.05)


def test_elastic_resize_gives_the_same_weights(reference_run, local_ray, rl_assets, tmp_path):
    # 1 -> 2 -> 1 workers while the run goes on, through the run's named control actor
    cfg = RunConfig(**run_config(rl_assets, tmp_path, "elastic", **{"rollout.workers": 1}))
    driver = Driver(cfg)
    sizes, errors, done = [], [], threading.Event()

    def resize():
        try:
            _wait_for(lambda: hasattr(driver, "pool"), "rollout pool", done)
            control = ray.get_actor(control_name("elastic"), namespace=NAMESPACE)
            ray.get(control.set_rollout_workers.remote(2), timeout=60)
            _wait_for(lambda: driver.pool.size >= 2, "second worker", done)
            sizes.append(driver.pool.size)
            ray.get(control.set_rollout_workers.remote(1), timeout=60)
        except Exception as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    t = threading.Thread(target=resize, daemon=True)
    t.start()
    try:
        driver.run()
    finally:
        done.set()
        t.join(timeout=60)
    assert not t.is_alive() and not errors, errors
    assert sizes == [2] and driver.pool.stats["workers_added"] >= 2 and driver.pool.stats["workers_removed"] >= 1
    assert same_weights(final_weights(reference_run), final_weights(cfg.run_dir))
    assert rewards_per_step(reference_run) == rewards_per_step(cfg.run_dir)


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rl", "train", "configs/shapes-tiny.yaml", "group_size=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "group_size" in proc.stderr


def test_config_validation_catches_cross_field_errors(rl_assets, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(run_config(rl_assets, tmp_path, "v")))
    with pytest.raises(ConfigError, match="m: 9 is more than the policy's 6 scales"):
        load_config(RunConfig, path, ["m=9"])
    with pytest.raises(ConfigError, match="learner.num_ranks"):
        load_config(RunConfig, path, ["learner.num_ranks=5"])
    with pytest.raises(ConfigError, match="down_sample: 9 must lie in 2..group_size"):
        load_config(RunConfig, path, ["down_sample=9"])
    with pytest.raises(ConfigError, match="policy_path"):
        load_config(RunConfig, path, ["policy_path=/nonexistent"])


def test_gpu_shortfall_names_the_first_field_that_does_not_fit():
    from core.resources import gpu_shortfall

    asks = {"learner.use_gpu": 2.0, "rollout.gpus_per_worker": 1.0, "rewards.service.num_gpus": 0.0}
    assert gpu_shortfall(asks, 3) is None
    assert gpu_shortfall(asks, 2) == "rollout.gpus_per_worker: asks for 1 GPU(s) (learner.use_gpu 2, " \
                                     "rollout.gpus_per_worker 1 in all), the cluster has 2"
    assert gpu_shortfall(asks, 0).startswith("learner.use_gpu: asks for 2 GPU(s)")
    assert gpu_shortfall(asks, 0).endswith("set it to 0 (false) to run on CPUs")
    assert gpu_shortfall({"x": 0.0}, 0) is None


@pytest.mark.slow
def test_gpus_the_cluster_lacks_stop_the_run_before_any_actor(local_ray, rl_assets, tmp_path):
    """Asking a CPU cluster for GPUs is one line naming the field, at once (Ray would wait for them forever)."""
    for i, (field, over) in enumerate([("rollout.gpus_per_worker", {"rollout.gpus_per_worker": 1}),
                                       ("learner.use_gpu", {"learner.use_gpu": True}),
                                       ("rewards.service.num_gpus", {"rewards.service.num_gpus": 0.5})]):
        driver = Driver(RunConfig(**run_config(rl_assets, tmp_path, f"gpu{i}", **over)))
        t = time.perf_counter()
        with pytest.raises(ValueError, match=f"^{field}: asks for .* the cluster has 0"):
            driver.run()
        assert time.perf_counter() - t < 60 and not hasattr(driver, "pool")
