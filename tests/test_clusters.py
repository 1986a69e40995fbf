"""Cluster definitions: the `ray up` YAML passes Ray's own schema; every entrypoint names a real module and config."""
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import validate_config

from core.config import load_config
from rl.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((ROOT / "clusters").glob("*.yaml"))
COMMAND = re.compile(r"python -m ([\w.]+) (\w+ )?(configs/[\w./-]+\.yaml)")


def test_ray_up_yaml_validates_against_rays_schema():
    cfg = yaml.safe_load((ROOT / "clusters/ray-up-gpu.yaml").read_text())
    validate_config(cfg)
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert {"rollout_gpu", "learner_gpu"} <= set(cfg["available_node_types"])
    rollout = cfg["available_node_types"]["rollout_gpu"]
    assert rollout["min_workers"] < rollout["max_workers"] and rollout["resources"]["GPU"] >= 1


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_specs(name):
    doc = yaml.safe_load((ROOT / "clusters" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert groups["rollout"]["minReplicas"] < groups["rollout"]["maxReplicas"]
    if doc["kind"] == "RayJob":
        assert COMMAND.search(doc["spec"]["entrypoint"])


def test_every_entrypoint_names_a_real_module_and_config():
    found = []
    for path in [*CLUSTERS, ROOT / "README.md"]:
        for module, sub, config in COMMAND.findall(path.read_text()):
            found.append((path.name, module, config))
            assert importlib.util.find_spec(module) is not None, (path.name, module)
            assert (ROOT / config).is_file(), (path.name, config)
            if module == "rl" and sub.strip() == "train":
                load_config(RunConfig, ROOT / config, context={"check_paths": False})
    assert any(m == "rl" for _, m, _ in found) and len(found) >= 3


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("nextflow-*.yaml")))
def test_nextflow_scale_configs_validate(config):
    cfg = load_config(RunConfig, ROOT / "configs" / config, context={"check_paths": False})
    assert cfg.m == 8 and cfg.group_size == 16 and cfg.prompts_per_step == 16
    assert cfg.rollout.sample.cfg_scale == 5.0 and cfg.rollout.sample.top_k == 2 and cfg.rollout.sample.top_p == 0.9
    assert cfg.learner.betas == (0.9, 0.95) or list(cfg.learner.betas) == [0.9, 0.95]


def test_documented_commands_parse():
    for line in (ROOT / "README.md").read_text().splitlines():
        if "ray job submit" in line:
            assert "RAY_AUTH_MODE=token" in line
            shlex.split(line.rstrip("\\"))
