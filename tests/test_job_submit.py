"""`ray job submit` against a `ray start --head` cluster with token auth on (as documented): a stage, and an RL
run that is resized while it goes on with `python -m rl scale`."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, run_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    temp_dir = Path("/tmp") / f"ray-test-{os.getpid()}"
    # every port of its own, so the head never collides with another local Ray on this machine
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    subprocess.run([BIN / "ray", "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", *ports, "--num-cpus=4", "--disable-usage-stats",
                    f"--temp-dir={temp_dir}"], env=env, check=True, capture_output=True, timeout=180)
    try:
        yield env, f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}"
    finally:
        # stop only this head: its processes are the ones whose command lines name its GCS port or temp dir
        for pattern in (f"127.0.0.1:{port}", f"gcs_server_port={port}", str(temp_dir)):
            subprocess.run(["pkill", "-9", "-f", pattern], check=False)


def submit(env, address, *entrypoint, wait=True) -> subprocess.CompletedProcess:
    """Submit, retrying while the head's job agent is still starting."""
    cmd = [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(ROOT)]
    cmd += ([] if wait else ["--no-wait"]) + ["--", sys.executable, *entrypoint]
    for _ in range(30):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in proc.stderr:
            return proc
        time.sleep(3)
    return proc


def test_rl_train_through_job_submit_and_scaled_live(head, rl_assets, tmp_path):
    env, address, gcs = head
    cfg = run_config(rl_assets, tmp_path, "job-grpo", steps=6, **{"rollout.workers": 1, "checkpoint.every": 3})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = submit(env, address, "-m", "rl", "train", str(tmp_path / "cfg.yaml"), wait=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    job_id = next(w for line in proc.stdout.splitlines() for w in line.split("'") if w.startswith("raysubmit_"))
    deadline, scaled = time.time() + 300, None
    while time.time() < deadline and scaled is None:
        r = subprocess.run([sys.executable, "-m", "rl", "scale", "job-grpo", "--rollout-workers", "2",
                            "--address", gcs], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        scaled = r.stdout if r.returncode == 0 else None
        time.sleep(1)
    assert scaled and "rollout workers -> 2" in scaled
    logs = subprocess.run([BIN / "ray", "job", "logs", "--follow", "--address", address, job_id], env=env,
                          capture_output=True, text=True, timeout=900)
    status = subprocess.run([BIN / "ray", "job", "status", "--address", address, job_id], env=env,
                            capture_output=True, text=True, timeout=120)
    assert "succeeded" in status.stdout.lower(), (logs.stdout + logs.stderr)[-3000:]
    run = tmp_path / "runs" / "job-grpo"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["rollout/workers"] == 2
    assert (run / "checkpoints" / "step_000006" / "driver_state.json").exists() and (run / "final_policy").is_dir()


def test_stage_runs_through_ray_job_submit(head, tmp_path):
    env, address, _ = head
    cfg = {"name": "job-tok", "storage": str(tmp_path / "runs"), "steps": 2, "batch_size": 4, "log_every": 1,
           "checkpoint_every": 2, "num_workers": 1,
           "vq": {"schedule": [[1, 1], [2, 2], [4, 4], [8, 8]], "image_size": 64, "channels": [8, 8, 8], "code_dim": 8,
                  "num_codes": 16}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = submit(env, address, "-m", "policy.stages.tokenizer", str(tmp_path / "cfg.yaml"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout
    assert (tmp_path / "runs" / "job-tok" / "final" / "model.safetensors").exists()
    # without the token the same cluster refuses: auth stays on
    no_auth = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    no_auth["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    refused = subprocess.run([BIN / "ray", "job", "list", "--address", address], env=no_auth,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
