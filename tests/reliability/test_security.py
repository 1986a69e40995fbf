"""Security defaults: loopback listeners, Ray token auth in every documented command, no unsafe deserialisation or
code execution on data, reward code loaded only from what the config names, and no secrets in run directories."""
import ast
import json
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.config import load_config
from rewards.config import RewardsConfig, ServiceConfig
from rl.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["policy", "rollout", "rewards", "rl"]
SECRET = "a-secret-value"


# ------------------------------------------------------------------------------------------------- listeners
def test_reward_service_binds_loopback_unless_configured():
    assert ServiceConfig().host == "127.0.0.1"
    assert RewardsConfig(rewards=[{"name": "verifier"}]).service.host == "127.0.0.1"
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "rewards" in data and "steps" in data:
            cfg = load_config(RunConfig, path, context={"check_paths": False})
            assert cfg.rewards.service.host == "127.0.0.1", path.name


def source_files():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_no_code_binds_all_interfaces():
    """Nothing in the packages listens on 0.0.0.0 / :: (Serve's HTTP host comes from ServiceConfig.host; the
    dashboard of a local Ray is Ray's default, 127.0.0.1)."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in source_files() for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"""["'](0\.0\.0\.0|::)["']|dashboard_host""", line)]
    assert not hits, hits


# ---------------------------------------------------------------------------------------------- Ray token auth
DOCS = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "clusters").glob("*.yaml"))]


def test_every_documented_ray_command_keeps_token_auth_on():
    commands = []
    for path in DOCS:
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE\s*=\s*(disabled|none|off)", text, re.I), path.name
        fenced = False
        for i, line in enumerate(text.splitlines(), 1):
            fenced ^= line.startswith("```")
            if path.suffix == ".md" and not fenced:  # prose may name a command; the examples are fenced
                continue
            if re.search(r"\bray (start|job submit)\b", line) or re.search(r"/ray (start|job submit)\b", line):
                commands.append(f"{path.name}:{i}")
                assert "RAY_AUTH_MODE=token" in line, f"{path.name}:{i}: {line.strip()}"
    assert len(commands) >= 5, commands  # README (stages, cluster) and ray-up-gpu.yaml's head and workers


def test_cluster_files_enable_token_auth_and_expose_the_dashboard_only_with_it():
    for path in sorted((ROOT / "clusters").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") in ("RayCluster", "RayJob"):
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            assert spec["authOptions"]["mode"] == "token", path.name
        else:  # ray up: every ray start with token auth, the dashboard on the head's loopback
            starts = doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]
            assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c), path.name
            assert all("--dashboard-host=127.0.0.1" in c for c in doc["head_start_ray_commands"] if "ray start" in c)


# ------------------------------------------------------------------------- deserialisation and code execution
def call_name(node: ast.Call) -> str:
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    parts.append(f.id if isinstance(f, ast.Name) else "<expr>")  # x.y().eval() is a method, not the builtin
    return ".".join(reversed(parts))


def kwarg(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def is_true(value) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def unsafe(node: ast.Call) -> str | None:
    name = call_name(node)
    last = name.rsplit(".", 1)[-1]
    if name in ("eval", "exec", "compile", "__import__", "os.system", "os.popen", "input"):
        return name
    if re.match(r"(c?pickle|dill|cloudpickle|marshal|shelve|joblib)\.", name):
        return name
    if name.startswith("yaml.") and last in ("load", "load_all", "unsafe_load", "full_load", "unsafe_load_all"):
        loader = kwarg(node, "Loader")
        if not (last in ("load", "load_all") and isinstance(loader, ast.Attribute) and "Safe" in loader.attr):
            return name
    if name.endswith("torch.load"):
        if not is_true(kwarg(node, "weights_only")):
            return f"{name} without weights_only=True"
    if re.match(r"(np|numpy)\.load$", name) and is_true(kwarg(node, "allow_pickle")):
        return f"{name}(allow_pickle=True)"
    if name.startswith("subprocess.") and is_true(kwarg(node, "shell")):
        return f"{name}(shell=True)"
    if name in ("importlib.import_module", "import_module") or name.endswith("ep.load"):
        return name
    return None


# (file, call) -> why it is allowed. Nothing else in the packages may deserialise or execute code.
ALLOWED = {
    ("rewards/base.py", "importlib.import_module"): "loads the reward the config names (an import path), by design",
    ("rewards/base.py", "ep.load"): "loads the reward the config names (an entry point), by design",
    ("policy/stages/common.py", "importlib.import_module"): "re-imports the stage's own __main__ module by its name",
}


def test_no_unsafe_deserialisation_or_code_execution_in_the_packages():
    found = {}
    for path in source_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (what := unsafe(node)):
                found.setdefault((str(path.relative_to(ROOT)), what), []).append(node.lineno)
    bad = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not bad, bad
    assert set(ALLOWED) <= set(found)  # the allow-list stays exact


def test_the_scanner_catches_what_it_should():
    src = textwrap.dedent("""
        import pickle, yaml, torch, subprocess, numpy as np
        pickle.loads(b""); eval("1"); exec("x=1"); yaml.load(s); yaml.unsafe_load(s); torch.load(f)
        torch.load(f, weights_only=False); np.load(f, allow_pickle=True); subprocess.run("ls", shell=True)
        yaml.load(s, Loader=yaml.SafeLoader); yaml.safe_load(s); torch.load(f, weights_only=True); model.eval()
    """)
    flagged = [unsafe(n) for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)]
    assert sorted(filter(None, flagged)) == sorted([
        "pickle.loads", "eval", "exec", "yaml.load", "yaml.unsafe_load", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "np.load(allow_pickle=True)", "subprocess.run(shell=True)"])


# ------------------------------------------------------------------------------- reward code only from config
def test_reward_code_runs_only_when_the_config_names_it_and_loads(tmp_path, monkeypatch):
    """Validating a config imports nothing; only resolving a reward the config names runs its module."""
    from rewards.base import resolve

    marker = tmp_path / "imported"
    (tmp_path / "side_effect_reward.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n\ndef side(images, prompts, metadata):\n    return [1.0] * len(prompts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RewardsConfig(rewards=[{"name": "side_effect_reward:side"}])
    assert not marker.exists() and "side_effect_reward" not in sys.modules  # config time: syntax only
    assert resolve(cfg.rewards[0].name)([], ["a"], [{}]) == [1.0] and marker.exists()
    sys.modules.pop("side_effect_reward", None)


def test_a_request_cannot_choose_the_reward():
    from rewards.wire import PayloadError, batch_from_json, encode_images

    payload = {"images": encode_images(np.zeros((1, 4, 4, 3), np.uint8)), "prompts": ["a"]}
    assert len(batch_from_json(payload)) == 1
    for key in ("reward", "rewards", "name", "kwargs"):
        with pytest.raises(PayloadError, match=f"^{key}: Extra inputs are not permitted"):
            batch_from_json({**payload, key: "os:system"})


def test_readme_says_reward_names_are_code():
    text = (ROOT / "README.md").read_text()
    rewards = " ".join(text[text.index("## Rewards"):text.index("## Earlier stages")].split())
    assert "runs its code, by design" in rewards and "only what the config names is loaded" in rewards
    assert "a request cannot choose" in rewards


# ------------------------------------------------------------------------------------------------- secrets
def test_secrets_never_reach_the_run_directory(tmp_path, monkeypatch, capfd):
    """WANDB_API_KEY in the environment (and the same value pasted into a reward's headers): the run directory
    (config.yaml, metrics.jsonl, wandb's offline run, PNGs) never holds it, nor does the output."""
    from rl.driver import Driver
    from rl.tracking import Tracker

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_TOKEN", "another-" + SECRET)
    cfg = RunConfig.model_validate({
        "name": "secrets", "runs_dir": str(tmp_path / "runs"), "steps": 1, "policy_path": str(tmp_path), "m": 1,
        "group_size": 2, "prompts_per_step": 1, "logging": {"wandb": "offline"},
        "rewards": {"rewards": [
            {"name": "verifier"},
            {"name": "http", "weight": 0.5, "kwargs": {"url": "http://127.0.0.1:9/score",
                                                       "headers": {"Authorization": f"Bearer {SECRET}"}}}],
            "service": {"runtime_env": {"env_vars": {"HF_TOKEN": "another-" + SECRET}}}},
    }, context={"check_paths": False})
    assert cfg.rewards.rewards[1].kwargs["headers"]["Authorization"] == f"Bearer {SECRET}"  # in memory: usable
    assert cfg.rewards.model_dump()["rewards"][1]["kwargs"]["headers"]["Authorization"] == f"Bearer {SECRET}"
    driver = Driver(cfg)
    driver._prepare_run_dir()  # writes RUN/config.yaml the way every run does
    tracker = Tracker(cfg.run_dir, cfg.name, cfg.logging.project, "offline", None, cfg.model_dump(mode="json"))
    tracker.log(1, {"reward/mean": 0.5, "reward/verifier/mean": 0.5})
    tracker.grid(1, np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"])
    tracker.reward_curve()
    tracker.close()
    dumped = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    assert dumped["rewards"]["rewards"][1]["kwargs"]["headers"]["Authorization"] == "Bearer <$WANDB_API_KEY>"
    files = [p for p in cfg.run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".wandb" for p in files), files
    leaks = [str(p.relative_to(cfg.run_dir)) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
    out = capfd.readouterr()
    assert SECRET not in out.out and SECRET not in out.err
    assert json.loads((cfg.run_dir / "metrics.jsonl").read_text().splitlines()[0])["reward/mean"] == 0.5
