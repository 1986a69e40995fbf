"""The GPU machine's one-command check (`python benchmarks/gpu_nextflow.py`) in its CPU smoke form: the same code,
tiny sizes, every row including 3 steps of the real RL loop in bf16 (issue 14: the smoke run is in CI)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_smoke_runs_every_row_and_the_loop_keeps_the_ratio(local_ray, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_nextflow.py", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((tmp_path / "gpu_nextflow_smoke.json").read_text())
    assert result["failed"] == []
    assert {"sampling", "kv_cache", "raster", "efficiency", "weight_bytes", "learner", "rl_loop"} <= set(result["results"])
    loop = result["results"]["rl_loop"]
    assert loop["steps"] == 3 and loop["first_pass_max_abs_dev"] <= 1e-2
    assert loop["rollout_logp_max_abs_dev"] > 0  # bf16 rollouts: reported, and corrected by the recomputation
    table = (tmp_path / "gpu_nextflow_smoke.md").read_text()
    assert "RL loop on the tiny world" in table and "failed" not in table
