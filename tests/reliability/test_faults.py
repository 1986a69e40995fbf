"""Faults on a local Ray with real processes; every run ends with its weights compared against a fault-free run.

- SIGKILL of a rollout worker while it samples and of the reward replica while it scores a batch (one run), of the
  learner rank during a step (the run stops with one line and resumes from its last checkpoint);
- SIGKILL of the driver process in step 3 of an off-policy run and `resume=true` (RELIABILITY_LONG=1: also at 10
  random points of the on-policy run; the on-policy kill on S3 is in test_storage_faults.py);
- SIGKILL of a process between the files of a checkpoint: the previous checkpoint still loads, no partial one counts;
- a full run directory mid-run and a read-only one at start: a clear error, nothing written before is damaged.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml

from rl.checkpoint import latest_checkpoint, list_checkpoints, load_state
from rl.config import RunConfig
from rl.driver import Driver, RunFailed
from tests.conftest import assert_same_run, run_config

ROOT = Path(__file__).resolve().parents[2]
LONG = os.environ.get("RELIABILITY_LONG") == "1"
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ helpers
def slow_reward_config(assets: Path, tmp: Path, name: str, **over) -> dict:
    """run_config(), scored by the slowed verifier (same scores), so a batch is in flight long enough to kill."""
    cfg = run_config(assets, tmp, name, **over)
    cfg["rewards"]["rewards"][0] = {"name": "tests.reliability.slow_reward:SlowVerifier", "label": "verifier",
                                    "kwargs": {"marker_dir": str(tmp / f"markers-{name}"), "delay_s": 1.0}}
    cfg["rewards"]["service"]["runtime_env"] = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    return cfg


def in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def wait_for(cond, timeout: float = 300, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------------ actors
def test_rollout_worker_and_reward_replica_killed_mid_run(reference_run, rl_assets, tmp_path):
    """One run, two faults: a rollout worker SIGKILLed while it samples step 2 (its unit is re-run elsewhere) and
    the reward replica SIGKILLed while it scores step 2's batch (scored again, anew). Rewards are sequential here
    (one request per step, so call N is step N + 1's batch) while the reference run streams them per unit: also
    the check that streaming changes no reward, advantage or weight. Weights go over the collective (gloo) group
    here and through the object store in the reference: the same weights, bit for bit."""
    cfg = slow_reward_config(rl_assets, tmp_path, "faults", **{"loop.stream_rewards": False,
                                                                "rollout.weight_sync": "collective"})
    driver = Driver(RunConfig(**cfg))
    call = tmp_path / "markers-faults" / "call-1"   # the batch of step 2, in flight
    killed: dict[str, int] = {}

    def kill_worker():
        wait_for(lambda: hasattr(driver, "pool") and driver.pool.stats["units"] >= 4, what="sampling")
        pid = ray.get(next(iter(driver.pool.workers.values())).pid.remote())
        os.kill(pid, signal.SIGKILL)
        killed["worker"] = pid

    def kill_replica():
        wait_for(call.exists, what="the second reward batch")
        pid = int(call.read_text())
        os.kill(pid, signal.SIGKILL)
        killed["replica"] = pid

    threads = [in_thread(kill_worker), in_thread(kill_replica)]
    driver.run()
    for t in threads:
        t.join()
    calls = sorted((tmp_path / "markers-faults").glob("call-*"))
    assert set(killed) == {"worker", "replica"}
    assert driver.pool.stats["workers_lost"] >= 1 and driver.pool.stats["units"] == 3 * 3
    assert len(calls) == 4 and int(calls[-1].read_text()) != killed["replica"]  # step 2 scored again, anew
    assert_same_run(reference_run, driver.run_dir)
    assert driver.sync.stats["collective_workers"] >= 4 and driver.sync.stats["group_builds"] >= 2  # rebuilt


def test_learner_rank_killed_during_a_step_stops_cleanly_and_resumes(reference_run, rl_assets, tmp_path):
    cfg = run_config(rl_assets, tmp_path, "learner")
    driver = Driver(RunConfig(**cfg))
    killed = []

    def arm():  # SIGKILL rank 0 as the learner step of step 2 is under way
        wait_for(lambda: getattr(driver, "learner", None) is not None, what="the learner")
        learner, step = driver.learner, driver.learner.step
        pid = ray.get(learner.actors[0].pid.remote())

        def step_and_kill(batch):
            if learner.version == 1:
                threading.Timer(0.001, lambda: (os.kill(pid, signal.SIGKILL), killed.append(pid))).start()
            return step(batch)

        learner.step = step_and_kill

    t = in_thread(arm)
    with pytest.raises(RunFailed) as err:
        driver.run()
    t.join()
    message = str(err.value)
    assert killed and "\n" not in message
    assert "learner rank 0 died during a learner step (ActorDiedError) in step 2" in message
    assert "continue from checkpoint step 1" in message
    assert [r["step"] for r in map(json.loads, (driver.run_dir / "metrics.jsonl").read_text().splitlines())] == [1]
    Driver(RunConfig(**cfg, resume=True)).run()
    assert_same_run(reference_run, driver.run_dir)


# ------------------------------------------------------------------------------------------------ the driver
def kill_point(seed: int) -> tuple[int, float]:
    """(metrics rows to wait for, then seconds to wait): spreads kills over start-up, steps, checkpoints, export."""
    rng = random.Random(seed)
    return rng.randint(0, 3), rng.uniform(0.0, 2.5)


def kill_and_resume(cfg: dict, tmp_path: Path, rows: int, delay: float) -> Path:
    """`rl train` in a subprocess, SIGKILLed once metrics.jsonl has `rows` lines plus `delay` s, then resumed."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "rl", "train", str(path)]
    metrics = Path(cfg["runs_dir"]) / cfg["name"] / "metrics.jsonl"
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while first.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
        time.sleep(0.01)
    time.sleep(delay)
    first.send_signal(signal.SIGKILL)
    out = first.communicate()[0]
    print(f"{cfg['name']}: killed after {rows} steps + {delay:.2f} s (exit {first.returncode})")
    second = subprocess.run(cmd + ["resume=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, (out + second.stdout + second.stderr)[-3000:]
    return Path(cfg["runs_dir"]) / cfg["name"]


@pytest.mark.skipif(not LONG, reason="RELIABILITY_LONG=1: the default suite kills the driver in the off-policy test "
                                      "below and in tests/reliability/test_storage_faults.py (on-policy, S3)")
@pytest.mark.parametrize("seed", range(10))
def test_driver_sigkilled_at_a_random_point_resumes_identically(seed, reference_run, rl_assets, tmp_path):
    run = kill_and_resume(run_config(rl_assets, tmp_path, f"driver{seed}"), tmp_path, *kill_point(seed))
    assert_same_run(reference_run, run)


def test_off_policy_staleness_is_bounded_recorded_and_resume_is_identical(local_ray, rl_assets, tmp_path):
    """loop.off_policy_steps=1, checkpoints every 2 of 4 steps: steps 2 and 4 are sampled during the learner steps
    1 and 3 with the weights one version behind; a driver SIGKILLed in step 3 or 4 resumes to the same run."""
    over = {"steps": 4, "checkpoint.every": 2, "loop.off_policy_steps": 1}
    reference = Driver(RunConfig(**run_config(rl_assets, tmp_path / "a", "offref", **over)))
    reference.run()
    table = pq.read_table(reference.run_dir / "rollouts")
    per_step: dict[int, set] = {}
    for step, stale in zip(table["step"].to_pylist(), table["staleness"].to_pylist()):
        per_step.setdefault(step, set()).add(stale)
    assert per_step == {1: {0}, 2: {1}, 3: {0}, 4: {1}}
    rows = [json.loads(x) for x in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 0, 1]
    run = kill_and_resume(run_config(rl_assets, tmp_path / "b", "offkill", **over), tmp_path, 3, 0.0)
    assert_same_run(reference.run_dir, run)


# ------------------------------------------------------------------------------------------------ checkpoints
WRITER = """
import os, shutil, signal, sys
from pathlib import Path
from rl.checkpoint import save_checkpoint

run_dir, source, step, kill_after = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
files = sorted(p for p in source.rglob("*") if p.is_file())

def write_learner(dest):  # copies a real learner checkpoint file by file; SIGKILL before file number kill_after
    for i, f in enumerate(files + [None]):
        if i == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if f is not None:
            (dest / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest / f.relative_to(source))

save_checkpoint(run_dir, step, {"step": step}, write_learner, keep=2)
"""


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_crash_between_checkpoint_files_keeps_the_previous_one(reference_run, rl_assets, tmp_path):
    # the reference run, as it stood after step 2 plus the step-3 records that a crash would leave behind
    run_dir = tmp_path / "runs" / reference_run.name
    shutil.copytree(reference_run, run_dir, symlinks=True)
    source = run_dir / "checkpoints" / "step_000003"
    (tmp_path / "step3").mkdir()
    os.replace(source, tmp_path / "step3" / "step_000003")
    source = tmp_path / "step3" / "step_000003" / "learner"
    shutil.rmtree(run_dir / "final_policy")
    (run_dir / "summary.json").unlink()
    before = tree(run_dir / "checkpoints" / "step_000002")
    n_files = len([p for p in source.rglob("*") if p.is_file()])
    for kill_after in range(n_files + 1):
        proc = subprocess.run([sys.executable, "-c", WRITER, str(run_dir), str(source), "3", str(kill_after)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert [p.name for p in list_checkpoints(run_dir)] == ["step_000002"]
        assert latest_checkpoint(run_dir).name == "step_000002" and load_state(latest_checkpoint(run_dir))["step"] == 2
        assert tree(run_dir / "checkpoints" / "step_000002") == before
    print(f"checkpoint writer SIGKILLed at {n_files + 1} points between files: step 2 intact every time")
    # the partial step-3 folder is never picked up: resuming re-runs step 3 from step 2, identically
    Driver(RunConfig(**run_config(rl_assets, tmp_path, reference_run.name, resume=True))).run()
    assert not list((run_dir / "checkpoints").glob(".*"))
    assert_same_run(reference_run, run_dir)


# ------------------------------------------------------------------------------------------------ the disk
@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a given size (root and CAP_SYS_ADMIN, as in this project's containers), unmounted after."""
    mounts = []

    def mount(size: str) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def fill(disk: Path) -> Path:
    """Write one file until the device answers ENOSPC; returns it."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def test_disk_full_mid_run_is_a_clear_error_and_damages_nothing(reference_run, rl_assets, tmp_path, small_disk):
    disk = small_disk("64m")
    cfg = run_config(rl_assets, tmp_path, "full", runs_dir=str(disk))
    run_dir = disk / "full"
    fillers = []
    t = in_thread(lambda: (wait_for((run_dir / "checkpoints" / "step_000001" / "driver_state.json").exists,
                                    what="checkpoint 1"), fillers.append(fill(disk))))
    with pytest.raises(RunFailed) as err:
        Driver(RunConfig(**cfg)).run()
    t.join()
    message = str(err.value)
    print(f"disk full: {message}")
    assert "\n" not in message and "no space left on device" in message
    assert "continue from checkpoint step 1" in message
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    assert pq.read_table(run_dir / "rollouts" / "step_000001.parquet").num_rows == 12
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000001"]
    fillers[0].unlink()
    Driver(RunConfig(**cfg, resume=True)).run()
    assert_same_run(reference_run, run_dir)


def test_read_only_run_directory_is_refused_before_anything_starts(reference_run, tmp_path, small_disk):
    disk = small_disk("64m")
    shutil.copytree(reference_run, disk / reference_run.name, symlinks=True)
    before = tree(disk)
    remount(disk, "ro")
    cfg = yaml.safe_load((reference_run / "config.yaml").read_text()) | {"runs_dir": str(disk), "resume": True}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "rl", "train", str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert "runs_dir" in proc.stderr and "read-only" in proc.stderr
    assert tree(disk) == before
