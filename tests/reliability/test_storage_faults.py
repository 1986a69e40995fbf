"""Run storage on a real S3-compatible server on loopback (moto): 2 learner ranks upload their own files, a SIGKILLed
driver resumes from the store with an empty local disk, a cut upload never becomes the latest checkpoint, bad
settings are one line, and no credential reaches a file of the run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from rl.runstore import RunStore
from rl.storage import open_storage
from tests.conftest import assert_same_run, run_config
from tests.s3server import ACCESS_KEY, SECRET_KEY, bucket_uri, credentials_env, s3_server

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as ep:
        yield ep


@pytest.fixture(scope="module")
def creds():
    old = {k: os.environ.get(k) for k in credentials_env()}
    os.environ.update(credentials_env())
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def s3_config(assets, tmp, name, uri) -> dict:
    """run_config() with 2 learner ranks under ZeRO-1 (each rank writes its own optimiser shard) on `uri`."""
    cfg = run_config(assets, tmp, name)
    cfg["storage"] = uri
    cfg["learner"] |= {"num_ranks": 2, "cpus_per_rank": 0.5, "deepspeed": {"zero_optimization": {"stage": 1}}}
    cfg["eval"] = {"enabled": True, "images_per_category": 1}  # the evaluation task uploads RUN/eval_* too
    return cfg


def fetch_run(uri: str, name: str, dest: Path) -> Path:
    """The run's files as the store holds them, downloaded into `dest` (what a new machine would see)."""
    open_storage(uri, probe=False).download(name, dest)
    return dest


@pytest.fixture(scope="module")
def s3_reference(local_ray, rl_assets, endpoint, creds, tmp_path_factory):
    from rl.config import RunConfig
    from rl.driver import Driver

    uri = bucket_uri(endpoint, "nextscale-runs")
    tmp = tmp_path_factory.mktemp("s3ref")
    t = time.perf_counter()
    Driver(RunConfig(**s3_config(rl_assets, tmp, "s3ref", uri))).run()
    print(f"fault-free 3-step run with 2 ranks on S3: {time.perf_counter() - t:.1f} s")
    return uri, fetch_run(uri, "s3ref", tmp / "fetched")


def test_two_ranks_write_to_the_store(s3_reference):
    uri, run = s3_reference
    store = open_storage(uri, probe=False)
    ckpts = RunStore(run, "s3ref", uri).latest_checkpoint()
    assert ckpts and ckpts.endswith("step_000003")
    shards = [n for n in (run / "checkpoints" / "step_000003" / "learner" / "learner").iterdir()]
    names = " ".join(p.name for p in shards)
    assert "zero_pp_rank_0_" in names and "zero_pp_rank_1_" in names, names  # each rank uploaded its own shard
    for rel in ("final_policy/transformer/config.json", "metrics.jsonl", "config.yaml", "rollouts/step_000003.parquet",
                "eval_before/scores.json", "eval_after/scores.json", "before_after.png", "summary.json"):
        assert store.exists(f"s3ref/{rel}"), rel
    assert len(store.listdir("s3ref/checkpoints")) == 2  # keep: 2


def test_driver_sigkilled_resumes_from_the_store_on_an_empty_disk(s3_reference, rl_assets, tmp_path):
    uri, reference = s3_reference
    cfg = s3_config(rl_assets, tmp_path, "s3kill", uri)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "rl", "train", str(path)]
    metrics = Path(cfg["runs_dir"]) / "s3kill" / "metrics.jsonl"
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while first.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    out = first.communicate()[0]
    shutil.rmtree(cfg["runs_dir"])  # a new machine: nothing local
    t = time.perf_counter()
    second = subprocess.run(cmd + ["resume=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, (out + second.stdout + second.stderr)[-3000:]
    print(f"resume from S3 to the end of the run: {time.perf_counter() - t:.1f} s")
    assert_same_run(reference, fetch_run(uri, "s3kill", tmp_path / "fetched"))


CUT_UPLOAD = """
import os, signal, sys
from rl.storage import open_storage
store = open_storage(sys.argv[1], probe=False)
for i in range(4):
    store.write_bytes(f"s3ref/checkpoints/step_000009/learner/part{i}", b"x" * 1000)
    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_upload_killed_halfway_leaves_the_previous_checkpoint_latest(s3_reference):
    uri, _ = s3_reference
    before = RunStore(Path("/nonexistent"), "s3ref", uri).latest_checkpoint()
    proc = subprocess.run([sys.executable, "-c", CUT_UPLOAD, uri], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    store = RunStore(Path("/nonexistent"), "s3ref", uri)
    assert store.remote.exists("s3ref/checkpoints/step_000009/learner/part1")
    assert store.latest_checkpoint() == before


def test_no_credential_in_any_file_of_the_run(s3_reference):
    _, run = s3_reference
    for f in (p for p in run.rglob("*") if p.is_file()):
        data = f.read_bytes()
        assert SECRET_KEY.encode() not in data and ACCESS_KEY.encode() not in data, f


@pytest.mark.parametrize("case", ["relative", "no-credentials", "unreachable"])
def test_bad_storage_is_one_line_naming_storage(case, rl_assets, endpoint, tmp_path):
    cfg = run_config(rl_assets, tmp_path, "bad")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}
    if case == "relative":
        cfg["storage"] = "shared/runs"
    elif case == "no-credentials":
        cfg["storage"] = bucket_uri(endpoint, "nextscale-runs")
    else:
        env |= credentials_env()
        cfg["storage"] = "s3://nextscale-runs/x?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "rl", "train", str(path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "storage: " in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "runs" / "bad").exists()


def test_rl_eval_reads_a_policy_from_the_store(s3_reference, tmp_path):
    uri, _ = s3_reference
    base, query = uri.split("?", 1)
    policy_uri = f"{base}/s3ref/final_policy?{query}"
    proc = subprocess.run([sys.executable, "-m", "rl", "eval", policy_uri, "images_per_category=1",
                           f"out_dir={tmp_path / 'eval'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "eval" / "scores.json").is_file()
