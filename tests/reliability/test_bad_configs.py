"""Malformed run configs for `python -m rl train`: each is a one-line error naming the field, exit code 2, and
nothing starts (no run directory, no Ray).

Most cases run in-process through `rl.__main__.main` (fast); two go through a real `python -m rl train`.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rl.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "checkpoints" / "shapes-tiny" / "policy"  # the shipped tiny policy: 6 scales


def base(runs_dir: Path) -> dict:
    """A valid run config (checked by test_the_base_config_is_valid)."""
    return {
        "name": "bad-config-run", "runs_dir": str(runs_dir), "steps": 2, "policy_path": str(POLICY), "m": 3,
        "group_size": 4, "prompts_per_step": 2,
        "learner": {"num_ranks": 1, "lr": 1e-4, "micro_batch_size": 4},
        "rollout": {"workers": 1, "min_workers": 1, "max_workers": 2},
        "rewards": {"rewards": [{"name": "verifier", "weight": 1.0}]},
        "eval": {"enabled": False},
    }


def drop(*keys):
    def f(cfg):
        node = cfg
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return f


def put(key: str, value):
    def f(cfg):
        node = cfg
        *path, last = key.split(".")
        for k in path:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[last] = value
    return f


def weights(*ws):
    return put("rewards.rewards", [{"name": "verifier", "weight": w, "label": f"v{i}"} for i, w in enumerate(ws)])


# (id, how the config is made: a function of the base dict / raw file text (str) / raw bytes, overrides,
#  the error's start: the field it names)
CASES = [
    ("steps-wrong-type", put("steps", "ten"), [], "steps: "),
    ("m-wrong-type-list", put("m", [3]), [], "m: "),
    ("section-wrong-type", put("rollout", 3), [], "rollout: "),
    ("unknown-top-level-key", put("stepz", 3), [], "stepz: Extra inputs"),
    ("unknown-nested-key", put("rollout.wrokers", 2), [], "rollout.wrokers: Extra inputs"),
    ("m-more-than-scales", put("m", 7), [], "m: 7 is more than the policy's 6 scales"),
    ("group-size-1", put("group_size", 1), [], "group_size: "),
    ("policy-dir-missing", put("policy_path", "/nonexistent/policy"), [], "policy_path: "),
    ("policy-dir-not-a-policy", put("policy_path", str(ROOT / "configs")), [], "policy_path: "),
    ("unknown-reward-name", put("rewards.rewards.0.name", "no_such_reward"), [], "rewards.rewards.0.name: "),
    ("reward-import-path-malformed", put("rewards.rewards.0.name", "pkg.mod:"), [], "rewards.rewards.0.name: "),
    ("reward-weights-all-zero", weights(0.0, 0.0), [], "rewards.rewards: "),
    ("reward-weight-negative-only", weights(-1.0), [], "rewards.rewards: "),
    ("reward-weight-nan", weights(1.0, float("nan")), [], "rewards.rewards.1.weight: "),
    ("reward-weight-inf", weights(float("inf")), [], "rewards.rewards.0.weight: "),
    ("reward-weight-string", weights("heavy"), [], "rewards.rewards.0.weight: "),
    ("rewards-empty-list", put("rewards.rewards", []), [], "rewards.rewards: "),
    ("reward-labels-duplicate", put("rewards.rewards", [{"name": "verifier"}, {"name": "verifier"}]), [],
     "rewards.rewards: "),
    ("service-port-out-of-range", put("rewards.service", {"port": 70000}), [], "rewards.service.port: "),
    ("override-without-equals", None, ["steps"], "override 'steps': expected key=value"),
    ("override-empty-key", None, ["=3"], "override '=3': empty key"),
    ("override-unknown-key", None, ["learner.lrr=1e-4"], "learner.lrr: Extra inputs"),
    ("override-into-a-scalar", None, ["steps.max=3"], "steps.max: steps is not a section"),
    ("override-bad-value", None, ["rollout.sample.top_k=many"], "rollout.sample.top_k"),
    ("yaml-not-a-mapping", "- name: a\n- steps: 3\n", [], "config: "),
    ("yaml-scalar", "just a string\n", [], "config: "),
    ("yaml-syntax-error", "name: [unclosed\nsteps: 3\n", [], "config: "),
    ("yaml-tab-indent", "rollout:\n\tworkers: 2\n", [], "config: "),
    ("empty-file", "", [], "name: Field required"),
    ("non-utf8-file", b"name: \xff\xfe\x00run\n", [], "config: "),
    ("missing-required-field", drop("policy_path"), [], "policy_path: Field required"),
    ("prompts-path-missing", put("prompts", {"path": "/nonexistent/prompts.parquet"}), [], "prompts.path: "),
    ("prompts-split-unknown", put("prompts", {"split": "validation"}), [], "prompts.split: "),
    ("workers-above-max", put("rollout.workers", 9), [], "rollout.workers: 9 is outside"),
    ("workers-zero", put("rollout.workers", 0), [], "rollout.workers: "),
    ("min-above-max-workers", put("rollout", {"workers": 2, "min_workers": 3, "max_workers": 2}), [],
     "rollout.workers: "),
    ("num-ranks-not-dividing-batch", put("learner.num_ranks", 3), [], "learner.num_ranks: 3 does not divide"),
    ("bad-name-pattern", put("name", "my run/1"), [], "name: "),
    ("empty-name", put("name", ""), [], "name: "),
    ("lr-negative", put("learner.lr", -1e-4), [], "learner.lr: "),
    ("betas-out-of-range", put("learner.betas", [0.9, 1.5]), [], "learner.betas: "),
    ("steps-zero", put("steps", 0), [], "steps: "),
    ("alpha-negative", put("alpha", -0.5), [], "alpha: "),
    ("checkpoint-keep-zero", put("checkpoint", {"keep": 0}), [], "checkpoint.keep: "),
    ("wandb-mode-unknown", put("logging", {"wandb": "cloud"}), [], "logging.wandb: "),
]


def write_config(tmp_path: Path, how) -> Path:
    path = tmp_path / "run.yaml"
    if isinstance(how, bytes):
        path.write_bytes(how)
    elif isinstance(how, str):
        path.write_text(how)
    else:
        cfg = base(tmp_path / "runs")
        if how is not None:
            how(cfg)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_the_base_config_is_valid(tmp_path):
    from core.config import load_config
    from rl.config import RunConfig

    cfg = load_config(RunConfig, write_config(tmp_path, None))
    assert cfg.m == 3 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("how, overrides, field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_naming_the_field(tmp_path, capsys, how, overrides, field):
    import ray

    path = write_config(tmp_path, how)
    rc = main(["train", str(path), *overrides])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err.strip()
    assert "\n" not in line and line.startswith(f"config error: {field}"), line
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not ray.is_initialized()


def test_config_is_a_directory_or_missing(tmp_path, capsys):
    for target, want in [(tmp_path, "config: "), (tmp_path / "nope.yaml", "config: file ")]:
        assert main(["train", str(target)]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and line.startswith(f"config error: {want}"), line


def test_bad_config_through_a_real_subprocess(tmp_path):
    """One case end to end (each start imports torch and transformers: ~10-30 s on 2 busy cores)."""
    _, how, overrides, field = next(c for c in CASES if c[0] == "workers-above-max")
    path = write_config(tmp_path, how)
    env = {**os.environ, "RAY_ADDRESS": ""}  # never join a cluster another test left running
    proc = subprocess.run([sys.executable, "-m", "rl", "train", str(path), *overrides], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(f"config error: {field}"), line
    assert proc.stdout == "" and not (tmp_path / "runs").exists() and list(tmp_path.iterdir()) == [path]
