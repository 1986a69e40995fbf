"""The reward service on a real local Ray + Serve: batching, plug-ins, weighted sum, failures, HTTP.

One deployment serves the whole module: the verifier, CLIP score (tiny, random), a reward from a tiny package that
the test really pip-installs (by entry point), a function from it (by import path), and a `faulty` reward that
misbehaves when a request's metadata asks it to.
"""
import importlib
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
from ray import serve

from rewards.base import RewardError
from rewards.builtin import VerifierReward
from rewards.client import RewardClient, RewardServiceError
from rewards.config import RewardsConfig
from rewards.service import start_service
from rewards.wire import batch_to_json, post_json
from test_rewards import make_batch
from tests.conftest import free_port

PLUGIN = '''
import time

import numpy as np


class Redness:
    """Entry point `redness`: scale * mean red value in [0, scale]; sub-score: green."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, images, prompts, metadata):
        return {"score": self.scale * images[..., 0].mean((1, 2)) / 255, "green": images[..., 1].mean((1, 2)) / 255}


def prompt_length(images, prompts, metadata):
    return [float(len(p)) for p in prompts]


def faulty(images, prompts, metadata):
    fault = next((m["fault"] for m in metadata if "fault" in m), None)
    if fault == "raise":
        raise ValueError("boom")
    if fault == "hang":
        time.sleep(3)
    scores = np.zeros(len(images))
    scores[0] = {"nan": np.nan, "inf": np.inf}.get(fault, 0.0)
    return scores[:-1] if fault == "count" else scores
'''
PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "nsr-test-plugin"
version = "0.1"

[project.entry-points."nextscale.rewards"]
redness = "nsr_test_plugin:Redness"

[tool.setuptools]
py-modules = ["nsr_test_plugin"]
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """pip-install the tiny plugin package into a fresh directory and put it on sys.path."""
    src, site = tmp_path_factory.mktemp("plugin_src"), tmp_path_factory.mktemp("plugin_site")
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "nsr_test_plugin.py").write_text(textwrap.dedent(PLUGIN))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))


@pytest.fixture(scope="module")
def cfg(plugin_site) -> RewardsConfig:
    return RewardsConfig.model_validate({
        "rewards": [
            {"name": "verifier", "weight": 1.0, "kwargs": {"mode": "partial"}},
            {"name": "clip_score", "weight": 0.1},
            {"name": "redness", "weight": 0.5, "kwargs": {"scale": 2.0}},          # entry point
            {"name": "nsr_test_plugin:prompt_length", "weight": 0.01},             # import path
            {"name": "nsr_test_plugin:faulty", "weight": 1.0, "timeout_s": 0.5},
        ],
        "service": {"num_cpus": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.2, "port": free_port(),
                    "max_request_bytes": 100_000, "timeout_s": 60, "retries": 1, "backoff_s": 0.05,
                    "runtime_env": {"env_vars": {"PYTHONPATH": str(plugin_site)}}},
    })


@pytest.fixture(scope="module")
def client(cfg):
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield RewardClient(start_service(cfg), cfg)
    finally:
        serve.shutdown()
        ray.shutdown()


def url(cfg) -> str:
    return f"http://127.0.0.1:{cfg.service.port}{cfg.service.route_prefix}"


def with_fault(batch, fault):
    batch.metadata = [{**m, "fault": fault} for m in batch.metadata]
    return batch


@pytest.mark.slow
def test_weighted_sum_with_entry_point_and_import_path_rewards(client):
    batch = make_batch(4)
    scored = client.score(batch.images, batch.prompts, batch.metadata)
    c = scored.components
    red = batch.images[..., 0].mean((1, 2)) / 255
    np.testing.assert_allclose(c["redness"], 2 * red)
    np.testing.assert_allclose(c["redness/green"], batch.images[..., 1].mean((1, 2)) / 255)
    assert c["prompt_length"].tolist() == [len(p) for p in batch.prompts]
    want = VerifierReward()(batch.images, batch.prompts, batch.metadata)
    assert c["verifier"].tolist() == want["score"] and np.all(np.abs(c["clip_score"]) <= 1)
    assert {"verifier/object", "verifier/count", "verifier/all"} <= c.keys()
    np.testing.assert_allclose(scored.total, c["verifier"] + 0.1 * c["clip_score"] + 0.5 * c["redness"]
                               + 0.01 * c["prompt_length"] + c["faulty"])


@pytest.mark.slow
def test_concurrent_calls_form_batches(client):
    batches = [make_batch(2, seed=s) for s in range(24)]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda b: client.score(b.images, b.prompts, b.metadata), batches))
    for b, r in zip(batches, results):  # each caller gets its own images' rewards back
        np.testing.assert_allclose(r.components["redness"], 2 * b.images[..., 0].mean((1, 2)) / 255)
    m = client.metrics()
    sizes = {int(k): v for k, v in m["requests_per_batch"].items()}
    print("requests per batch:", sizes, "| per reward:", m["rewards"])
    assert max(sizes) > 1 and m["rewards"]["verifier"]["max_batch"] > 2
    assert set(m["rewards"]) == {"verifier", "clip_score", "redness", "prompt_length", "faulty"}


@pytest.mark.slow
@pytest.mark.parametrize("fault, message", [
    ("raise", r"reward 'faulty': raised ValueError: boom"),
    ("hang", r"reward 'faulty': timed out after 0.5 s"),
    ("nan", r"reward 'faulty': scores for image 0 is nan \(1 non-finite of 3\)"),
    ("inf", r"reward 'faulty': scores for image 0 is inf \(1 non-finite of 3\)"),
    ("count", r"reward 'faulty': returned 2 scores for 3 images"),
])
def test_failing_reward_is_a_clear_error_after_retries(client, fault, message):
    batch = with_fault(make_batch(3), fault)
    with pytest.raises(RewardServiceError, match=f"^{message} \\(after 2 attempts\\)$"):
        client.score(batch.images, batch.prompts, batch.metadata)
    ok = make_batch(3)
    assert len(client.score(ok.images, ok.prompts, ok.metadata)) == 3  # the service keeps serving


@pytest.mark.slow
def test_client_timeout_names_the_service_and_its_rewards(client, cfg):
    impatient = RewardClient(client.handle, cfg.model_copy(update={"service": cfg.service.model_copy(
        update={"timeout_s": 0.2})}))
    batch = with_fault(make_batch(2), "hang")
    with pytest.raises(RewardServiceError, match=r"^reward service 'rewards' \(verifier, clip_score, redness, prompt_"
                                                 r"length, faulty\): no answer within 0.2 s \(after 2 attempts\)$"):
        impatient.score(batch.images, batch.prompts, batch.metadata)


@pytest.mark.slow
def test_http_scores_rejects_bad_payloads_and_keeps_serving(client, cfg):
    batch = make_batch(2)
    status, body = post_json(url(cfg), batch_to_json(batch), 30)
    assert status == 200
    by_handle = client.score(batch.images, batch.prompts, batch.metadata)
    np.testing.assert_allclose(body["score"], by_handle.total, rtol=1e-6)
    good = batch_to_json(batch)
    for payload, code, message in [
        (b"{not json", 400, "bad payload: request: not JSON"),
        (json.dumps({"prompts": ["a"]}).encode(), 400, "bad payload: images: Field required"),
        (json.dumps({**good, "images": ["%%%"] * 2}).encode(), 400, "bad payload: images.0: not a base64-encoded PNG"),
        (json.dumps({**good, "prompts": ["a"]}).encode(), 400, "bad payload: batch: 2 images, 1 prompts, 2 metadata"),
        (b"x" * 200_000, 413, "request larger than max_request_bytes=100000"),
        (json.dumps(batch_to_json(with_fault(make_batch(2), "count"))).encode(), 500,
         "reward 'faulty': returned 1 scores for 2 images"),
    ]:
        status, body = raw_post(url(cfg), payload)
        assert status == code and body["error"].startswith(message), (status, body)
    assert raw_post(url(cfg), json.dumps(good).encode())[0] == 200
    with urllib.request.urlopen(url(cfg), timeout=30) as resp:  # GET: metrics
        assert "verifier" in json.loads(resp.read())["rewards"]


def raw_post(address: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(address, body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_unknown_reward_fails_before_deploying(cfg):
    bad = cfg.model_copy(update={"rewards": [cfg.rewards[0], cfg.rewards[0].model_copy(update={"name": "nope"})]})
    with pytest.raises(RewardError, match=r"^reward 'nope': unknown"):
        start_service(bad)


def unit_and_result(i: int, g: int = 3, fault: str | None = None):
    """A work unit of G images of one prompt, and its rollout result (as a rollout worker returns it)."""
    from rollout.units import UnitResult, WorkUnit

    b = make_batch(g, seed=100 + i)
    meta = {**b.metadata[0], **({"fault": fault} if fault else {})}
    unit = WorkUnit(f"1/{i}", 1, i, b.prompts[0], (1, 2), 0, g, meta)
    return unit, UnitResult(unit.uid, [], b.images, np.zeros((g, 1), np.float32), 0, "w")


@pytest.mark.slow
def test_streamed_rewards_come_back_in_unit_order_equal_to_one_request(client):
    """Units arrive out of order, each is its own request (the service merges them); gather returns the step's
    rewards in unit order, exactly what one request for the whole step returns."""
    from rewards.combine import Scored
    from rl.step import StreamedRewards

    pairs = [unit_and_result(i) for i in range(5)]
    units = [u for u, _ in pairs]
    stream = StreamedRewards(client, k=1)
    for unit, result in reversed(pairs):  # arrival order is not unit order
        stream.submit(unit, result)
    streamed = stream.gather(units, 15)
    images = np.concatenate([r.images for _, r in pairs])
    whole = client.score(images, [u.prompt for u in units for _ in range(3)],
                         [u.metadata for u in units for _ in range(3)])
    for key in ("verifier", "redness", "prompt_length"):
        assert streamed.components[key].tolist() == whole.components[key].tolist(), key
    np.testing.assert_allclose(streamed.total, whole.total, rtol=1e-6)
    assert isinstance(streamed, Scored) and not stream.pending


@pytest.mark.slow
def test_a_streamed_unit_that_fails_is_retried_then_an_error_never_a_zero(client):
    from rl.step import StreamedRewards

    pairs = [unit_and_result(0), unit_and_result(1, fault="raise"), unit_and_result(2)]
    stream = StreamedRewards(client, k=1)
    for unit, result in pairs:
        stream.submit(unit, result)
    with pytest.raises(RewardServiceError, match=r"^reward 'faulty': raised ValueError: boom \(after 2 attempts\)$"):
        stream.gather([u for u, _ in pairs], 9)
