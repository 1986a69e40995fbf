"""The command lines: `--help` (exit 0) lists the config's fields with type, default and description;
`--print-config` prints the resolved config and starts nothing; a bad field is one line naming it (exit 2).

`python -m rl train` runs in its own interpreter per case (it is torch-free until a run starts); the commands
whose config classes import torch run together in one interpreter (runpy, as `python -m` does) to pay for
torch once.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
POLICY = f"policy_path={ROOT / 'checkpoints/shapes-tiny/policy'}"


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}  # never join a cluster another test left running
    return subprocess.run([*args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def rl(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "rl", *args, cwd=cwd)


def field_line(text: str, name: str) -> str:
    """The help's row of one field: NAME  TYPE  DEFAULT  DESCRIPTION."""
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == [name]]
    assert len(rows) == 1, f"{name} not listed once in:\n{text[-3000:]}"
    return " ".join(rows[0])


def test_top_level_help_and_the_console_script():
    proc = rl("--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("train CONFIG", "eval ", "scale RUN")), proc
    script = Path(sys.executable).with_name("nextscale")  # [project.scripts], installed by `pip install -e .`
    assert script.is_file(), f"{script} missing: reinstall with pip install -e ."
    proc = run(str(script), "train", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: nextscale train CONFIG"), proc.stdout[:300]
    assert proc.stderr == ""
    assert rl().returncode == 2 and rl("fly").returncode == 2


def test_train_help_lists_every_field_with_type_default_and_description():
    proc = rl("train", "--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("usage: python -m rl train CONFIG") and "--print-config" in out
    assert field_line(out, "rollout.sample.top_k") == "rollout.sample.top_k int | list[int] 32 0: off; one value " \
                                                      "or one per scale"
    assert field_line(out, "steps").startswith("steps int required training steps")
    assert field_line(out, "logging.verbose").startswith("logging.verbose bool false show Ray's and Serve's")
    assert field_line(out, "logging.wandb").startswith("logging.wandb offline|online|disabled offline wandb mode")
    assert field_line(out, "rewards.rewards[].weight").startswith("rewards.rewards[].weight float 1.0 negative")
    assert field_line(out, "learner.lr").startswith("learner.lr float 1.0e-05 AdamW learning rate")


def test_print_config_prints_the_resolved_config_and_starts_nothing(tmp_path):
    proc = rl("train", str(ROOT / "configs/shapes-tiny.yaml"), "steps=7", POLICY, f"runs_dir={tmp_path / 'runs'}",
              "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["name"] == "shapes-tiny" and cfg["steps"] == 7 and cfg["rollout"]["sample"]["top_k"] == 32
    assert cfg["runs_dir"] == str(tmp_path / "runs") and cfg["prompts"]["split"] == "train"
    assert cfg["logging"]["verbose"] is False and cfg["vmr"] == {"k": 1, "eta": 1.0}  # defaults filled in
    assert list(tmp_path.iterdir()) == []  # no run directory, no Ray


def test_a_bad_field_or_option_is_one_line_and_exit_2(tmp_path):
    cases = [(["rollout.sample.top_k=many"], "config error: rollout.sample.top_k: "),
             (["rollout.smaple.top_k=3"], "config error: rollout.smaple: Extra inputs"),
             (["--verbose"], "error: unknown option --verbose")]
    for extra, start in cases:
        proc = rl("train", str(ROOT / "configs/shapes-tiny.yaml"), POLICY, *extra, "--print-config", cwd=tmp_path)
        line = proc.stderr.strip()
        assert proc.returncode == 2 and "\n" not in line and line.startswith(start), (extra, proc.stderr)
        assert proc.stdout == "" and list(tmp_path.iterdir()) == []


# The commands whose configs import torch, in one interpreter: (argv, what the output must contain).
TORCH_CLIS = [
    (["policy.evaluate", "--help"], ["usage: python -m policy.evaluate POLICY_DIR", "images_per_category",
                                     "image i is sampled with seed + i", "sample.top_k"]),
    (["rl", "eval", "--help"], ["usage: python -m rl eval POLICY_DIR", "grid_size"]),
    (["rl", "scale", "--help"], ["--rollout-workers", "the new number of rollout workers"]),
    (["policy.demo", "--help"], ["usage: python -m policy.demo CONFIG", "num_images", "where samples.png"]),
    (["policy.demo", "configs/shapes-sample.yaml", "num_images=3", "--print-config"], ["num_images: 3"]),
    (["policy.stages.tokenizer", "--help"], ["vq.num_codes", "restart_every", "dead-code restarts"]),
    (["policy.stages.reward_model", "--help"], ["model", "open_clip model config"]),
    (["policy.stages.pretrain", "--help"], ["phases[].freeze_backbone", "backbone.hidden_size", "self_correct",
                                            "run name: a rerun with the same name resumes"]),
    (["policy.stages.sft", "--help"], ["usage: python -m policy.stages.sft CONFIG", "categories"]),
    (["policy.stages.ship", "--help"], ["--runs", "the shipped folder"]),
]

RUN_ALL = """
import contextlib, io, json, runpy, sys
out = []
for argv in json.loads(sys.argv[1]):
    sys.argv = [argv[0], *argv[1:]]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
    out.append({"code": code, "text": buf.getvalue()})
print(json.dumps(out))
"""


def test_every_other_command_answers_help():
    proc = run(sys.executable, "-W", "ignore::RuntimeWarning", "-c", RUN_ALL, json.dumps([a for a, _ in TORCH_CLIS]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (argv, wants), got in zip(TORCH_CLIS, json.loads(proc.stdout.strip().splitlines()[-1])):
        assert got["code"] == 0, (argv, got["text"][-2000:])
        missing = [w for w in wants if w not in got["text"]]
        assert not missing, (argv, missing, got["text"][-2000:])
