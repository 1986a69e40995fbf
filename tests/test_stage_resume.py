"""Kill a stage's driver mid-run (SIGKILL of its process group) and rerun the same run name: it resumes."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from policy.tokenizer import MultiScaleVQ, VQConfig
from tests.conftest import SCHED

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def test_pretrain_stage_resumes_after_driver_kill(tmp_path):
    MultiScaleVQ(VQConfig(schedule=SCHED, channels=[8, 8, 8], code_dim=8, num_codes=32)).save_pretrained(tmp_path / "vq")
    cfg = {"name": "resume", "storage": str(tmp_path / "runs"), "vq_path": str(tmp_path / "vq"), "num_workers": 1,
           "batch_size": 4, "log_every": 10, "checkpoint_every": 10, "phases": [{"steps": 80}],
           "backbone": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "num_key_value_heads": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "policy.stages.pretrain", str(tmp_path / "cfg.yaml")]
    first = _run(cmd)
    run_dir = tmp_path / "runs" / "resume"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # written once a checkpoint is complete and registered
    deadline = time.time() + 240
    while time.time() < deadline and not snapshot.exists():  # a checkpoint_* folder alone may be half-written
        assert first.poll() is None, first.stdout.read()[-3000:]
        time.sleep(0.2)
    assert snapshot.exists(), "no registered checkpoint within the deadline"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (run_dir / "final").exists()

    second = _run(cmd)
    out, _ = second.communicate(timeout=400)
    assert second.returncode == 0, out[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", out)]
    assert resumed and resumed[0] >= 10 and resumed[0] % 10 == 0, out[-3000:]
    assert '"step": 80' in (run_dir / "final" / "metrics.json").read_text()
