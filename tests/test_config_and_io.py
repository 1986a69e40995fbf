import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.config import ConfigError, apply_overrides, load_config, parse_override
from policy.demo import DemoConfig
from policy.io import Policy, PolicyConfig, build_policy
from policy.sampler import sample
from tests.conftest import TINY_POLICY

ROOT = Path(__file__).resolve().parents[1]


def test_overrides():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert apply_overrides({"a": {"c": 1}}, ["a.b=true", "d=hi"]) == {"a": {"c": 1, "b": True}, "d": "hi"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


def test_override_keeps_the_sections_own_defaults():
    """`sample.top_k=4` on the evaluation changes top_k only: guidance and top-p stay the evaluation's defaults
    (session 5 found the override silently dropping them to SampleConfig's class defaults)."""
    from policy.evaluate import EvalConfig

    cfg = load_config(EvalConfig, None, ["sample.top_k=4"])
    assert (cfg.sample.top_k, cfg.sample.cfg_scale, cfg.sample.guidance_schedule, cfg.sample.top_p) == \
        (4, 3.0, "linear", 0.95)
    assert load_config(EvalConfig, None, ["sample.cfg_scale=1.0"]).sample.top_k == 32
    assert load_config(EvalConfig, None, []).sample == EvalConfig().sample
    # the same from keyword arguments as from YAML / overrides (a run built in-process equals `rl train FILE`)
    assert EvalConfig(sample={"top_k": 4}).sample == cfg.sample
    from rl.config import RolloutConfig

    partial = RolloutConfig(sample={"cfg_scale": 2.0}).sample
    assert (partial.cfg_scale, partial.top_k, partial.guidance_schedule) == (2.0, 32, "linear")


def test_config_errors_name_the_field(tmp_path):
    cfg = load_config(DemoConfig, ROOT / "configs/shapes-sample.yaml", ["sample.cfg_scale=5", "num_images=2"])
    assert cfg.sample.cfg_scale == 5 and cfg.num_images == 2
    with pytest.raises(ConfigError, match=r"^sample.cfg_scale: "):
        load_config(DemoConfig, ROOT / "configs/shapes-sample.yaml", ["sample.cfg_scale=abc"])
    with pytest.raises(ConfigError, match=r"^sample.bogus: "):
        load_config(DemoConfig, None, ["sample.bogus=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(DemoConfig, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DemoConfig, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="first scale"):
        load_config(DemoConfig, None, ["policy.schedule=[[2, 2]]"])


def test_policy_save_load_and_corrupt_weights(tmp_path):
    policy = build_policy(PolicyConfig(**TINY_POLICY))
    policy.save(tmp_path / "p")
    loaded = Policy.load(tmp_path / "p")
    ids = policy.encode_prompts(["a red circle", "two blue squares"])
    assert ids == loaded.encode_prompts(["a red circle", "two blue squares"])
    a = sample(policy.model, policy.vq, ids, [1, 2])
    b = sample(loaded.model, loaded.vq, ids, [1, 2])
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes))
    weights = tmp_path / "p" / "transformer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Policy.load(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="policy.path"):
        Policy.load(tmp_path / "nope")


@pytest.mark.slow
def test_demo_command_writes_png(tmp_path):
    overrides = [f"out_dir={tmp_path}", "num_images=4", "batch_size=4"]
    overrides += [f"policy.vq.{k}={v}" for k, v in TINY_POLICY["vq"].items()]
    overrides += [f"policy.backbone.{k}={v}" for k, v in TINY_POLICY["backbone"].items()]
    proc = subprocess.run([sys.executable, "-m", "policy.demo", "configs/shapes-sample.yaml", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out strict verifier score" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "policy.demo", "configs/shapes-sample.yaml", "sample.top_k=x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "sample.top_k" in bad.stderr


def test_guided_scoring_config_is_checked():
    """loss.score: guided with greedy rollouts at a scored scale is a one-line error naming loss.score; a greedy
    scale past m is fine (it is not scored)."""
    from rl.config import RunConfig

    demo = ROOT / "configs/shapes-tiny.yaml"
    assert load_config(RunConfig, demo, ["loss.score=guided"]).loss.score == "guided"
    with pytest.raises(ConfigError, match=r"^loss.score: "):
        load_config(RunConfig, demo, ["loss.score=guided", "rollout.sample.temperature=0"])
    cfg = load_config(RunConfig, demo, ["loss.score=guided", "m=4", "rollout.sample.temperature=[1, 1, 1, 1, 0, 0]"])
    assert cfg.m == 4
    with pytest.raises(ConfigError, match=r"^loss.score: "):
        load_config(RunConfig, demo, ["loss.score=blend"])


def test_configs_on_a_trained_base_name_a_make_target_that_builds_it():
    """A config whose policy_path lies under runs/stages/ (not shipped) must be buildable: `make -n` of some Makefile
    target (-B: as on a clean clone) runs the stage that writes runs/stages/NAME/final."""
    import re

    import yaml

    targets = re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M)
    dry_run = ["make", "-n", "-B", "-C", str(ROOT), "-o", ".venv/.installed"]
    dry = "\n".join(subprocess.run(dry_run + [t], capture_output=True, text=True).stdout
                    for t in targets if t not in ("clean", "install"))
    needed = {p.name: yaml.safe_load(p.read_text()).get("policy_path", "") for p in (ROOT / "configs").glob("*.yaml")}
    needed = {k: v for k, v in needed.items() if str(v).startswith("runs/stages/")}
    assert needed, "no config starts from a trained base any more: drop this test"
    for config, path in needed.items():
        name = re.fullmatch(r"runs/stages/([\w.-]+)/final", path)
        assert name and f"name={name[1]} " in dry, f"{config}: no Makefile target builds {path}"
