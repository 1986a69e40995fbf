"""Reward functions without Ray: protocol checks, loading, built-ins, weighted sum, configs, wire format."""
import base64
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from core.config import ConfigError, load_config
from shapes.world import PALETTE, ObjectSpec, Spec, all_specs, caption, conflicting_spec, render, shape_mask
from rewards import base
from rewards.base import Batch, RewardError, check_output, load_reward, register, run_reward
from rewards.builtin import ClipScore, HttpReward, VerifierReward, shapes_metadata
from rewards.client import backoff_delay
from rewards.combine import CombinedReward, Scored, score_many
from rewards.config import RewardsConfig, ServiceConfig
from rewards.wire import PayloadError, batch_from_json, batch_to_json, decode_image


def make_batch(n: int, seed: int = 0) -> Batch:
    rng = random.Random(seed)
    specs = rng.sample(all_specs(), n)
    return Batch(np.stack([render(s, rng) for s in specs]), [caption(s) for s in specs], shapes_metadata(specs))


def brightness(images, prompts, metadata, scale=1.0):
    """Mean pixel value in [0, scale] (a function reward, loaded by import path in these tests)."""
    return scale * images.reshape(len(images), -1).mean(1) / 255


def rewards_config(tmp_path, text: str) -> RewardsConfig:
    (tmp_path / "rewards.yaml").write_text(text)
    return load_config(RewardsConfig, tmp_path / "rewards.yaml")


# --------------------------------------------------------------------------------------------- protocol
def test_check_output_accepts_arrays_and_mappings():
    out = check_output("r", [0.5, 1], 2)
    assert out.score.tolist() == [0.5, 1.0] and out.subs == {}
    out = check_output("r", {"score": np.ones(2), "position": [np.nan, 1]}, 2)
    assert np.isnan(out.subs["position"][0])  # NaN sub-score = not applicable


@pytest.mark.parametrize("out, message", [
    ([1.0, 2.0, 3.0], "reward 'r': returned 3 scores for 4 images"),
    ([1.0, np.nan, 0, 0], "reward 'r': scores for image 1 is nan"),
    ([np.inf, 0, 0, 0], "reward 'r': scores for image 0 is inf"),
    (np.ones((4, 2)), r"reward 'r': scores has shape \(4, 2\), expected \(4,\)"),
    (["a"] * 4, "reward 'r': scores is not numeric"),
    ({"scores": [1] * 4}, "reward 'r': returned a mapping without 'score'"),
    ({"score": [1] * 4, "x": [1]}, "reward 'r': returned 1 sub-scores 'x' for 4 images"),
    ({"score": [1] * 4, "x": [1, 1, -np.inf, 1]}, "reward 'r': sub-scores 'x' for image 2 is -inf"),
])
def test_check_output_names_reward_and_cause(out, message):
    with pytest.raises(RewardError, match="^" + message):
        check_output("r", out, 4)


def test_run_reward_failures_are_errors_not_zeros():
    batch = make_batch(2)

    def boom(*_):
        raise ValueError("boom")

    with pytest.raises(RewardError, match=r"^reward 'b': raised ValueError: boom$"):
        run_reward("b", boom, batch)
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"^reward 'h': timed out after 0.2 s$"):
        run_reward("h", lambda *_: time.sleep(2), batch, timeout_s=0.2)
    assert time.perf_counter() - t0 < 1.5
    assert run_reward("ok", brightness, batch, timeout_s=5).score.shape == (2,)


def test_batch_validation():
    with pytest.raises(ValueError, match=r"images: expected a \(B, H, W, 3\) uint8 array, got float64"):
        Batch(np.zeros((2, 8, 8, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="batch: 2 images, 1 prompts, 1 metadata"):
        Batch(np.zeros((2, 8, 8, 3), np.uint8), ["a"])
    assert Batch(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"]).metadata == [{}, {}]


# ---------------------------------------------------------------------------------------------- loading
def test_load_by_registry_import_path_and_errors(monkeypatch):
    monkeypatch.setattr(base, "REGISTRY", dict(base.REGISTRY))
    assert isinstance(load_reward("verifier", {"mode": "strict"}), VerifierReward)
    batch = make_batch(2)
    fn = load_reward("test_rewards:brightness", {"scale": 2.0})  # tests/ is on sys.path under pytest
    np.testing.assert_allclose(fn(batch.images, batch.prompts, batch.metadata), 2 * brightness(batch.images, [], []))
    register("bright", brightness)
    assert load_reward("bright") is brightness
    with pytest.raises(RewardError, match=r"^reward 'nope': unknown: not a built-in \(bright, clip_score, colour_fraction, http, "):
        load_reward("nope")
    with pytest.raises(RewardError, match=r"^reward 'no_such_pkg:f': cannot import 'no_such_pkg'"):
        load_reward("no_such_pkg:f")
    with pytest.raises(RewardError, match=r"^reward 'test_rewards:nothing': module 'test_rewards' has no attr"):
        load_reward("test_rewards:nothing")
    with pytest.raises(RewardError, match=r"^reward 'verifier': could not construct VerifierReward \(ValueError: "
                                          r"mode must be 'partial', 'strict' or 'objects'"):
        load_reward("verifier", {"mode": "lenient"})


# --------------------------------------------------------------------------------------------- built-ins
def test_verifier_reward_partial_strict_and_checks():
    rng = random.Random(3)
    spec = next(s for s in all_specs() if s.category == "position")
    img = render(spec, rng)
    wrong = Spec(spec.category, spec.objects, {"left of": "right of", "right of": "left of",
                                               "above": "below", "below": "above"}[spec.relation])
    images, meta = np.stack([img, img]), shapes_metadata([spec, wrong])
    partial = check_output("v", VerifierReward("partial")(images, ["", ""], meta), 2)
    strict = check_output("v", VerifierReward("strict")(images, ["", ""], meta), 2)
    assert partial.score.tolist() == [1.0, 0.75] and strict.score.tolist() == [1.0, 0.0]
    assert strict.subs["position"].tolist() == [1.0, 0.0] and strict.subs["object"].tolist() == [1.0, 1.0]
    assert np.isnan(strict.subs["two-object"]).all()  # not a two-object prompt
    with pytest.raises(ValueError, match="metadata 1 has no 'spec'"):
        VerifierReward()(images, ["", ""], [meta[0], {}])


def test_object_credit_counts_each_asked_object():
    """mode "objects" (shapes.verifier.object_credit), hand-worked on "a red circle and a blue square": a red circle
    and a green square earn 1 of 2 objects (1/2; exclusive: nothing else drawn is one more item, 2/3); with a stray
    yellow triangle 1/2 and 1/3; both right 1; the strict verdict passes none but the last."""
    spec = Spec("two-object", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")))
    img = np.full((64, 64, 3), 245, dtype=np.uint8)
    img[shape_mask("circle", 16, 16, 16)] = PALETTE["red"]
    half = img.copy()
    half[shape_mask("square", 48, 48, 16)] = PALETTE["green"]
    stray = half.copy()
    stray[shape_mask("triangle", 16, 48, 16)] = PALETTE["yellow"]
    right = img.copy()
    right[shape_mask("square", 48, 48, 16)] = PALETTE["blue"]
    images, meta = np.stack([half, stray, right]), shapes_metadata([spec] * 3)
    assert VerifierReward("objects")(images, [""] * 3, meta)["score"] == pytest.approx([1 / 2, 1 / 2, 1])
    exclusive = VerifierReward("objects", exclusive=True)(images, [""] * 3, meta)["score"]
    assert exclusive == pytest.approx([2 / 3, 1 / 3, 1])
    assert VerifierReward("strict")(images, [""] * 3, meta)["score"] == [0.0, 0.0, 1.0]


def test_verifier_reward_rejects_conflicting_specs():
    batch = make_batch(16, seed=4)
    rng = random.Random(4)
    conflicting = shapes_metadata([conflicting_spec(Spec.from_json(m["spec"]), rng) for m in batch.metadata])
    good = VerifierReward("strict")(batch.images, batch.prompts, batch.metadata)["score"]
    bad = VerifierReward("strict")(batch.images, batch.prompts, conflicting)["score"]
    assert sum(good) >= 15 and sum(bad) <= 1


def test_clip_score_open_clip_tiny_and_checkpoint_path(tmp_path):
    batch = make_batch(3)
    torch.manual_seed(0)
    clip = ClipScore("shapes-clip-tiny")  # random weights, offline config and tokenizer
    scores = check_output("clip_score", clip(batch.images, batch.prompts, batch.metadata), 3).score
    assert np.all(np.abs(scores) <= 1)
    torch.save(clip.model.state_dict(), tmp_path / "clip.pt")
    torch.manual_seed(1)
    loaded = ClipScore("shapes-clip-tiny", pretrained=str(tmp_path / "clip.pt"))
    np.testing.assert_allclose(loaded(batch.images, batch.prompts, batch.metadata), scores, atol=1e-6)
    other = clip(batch.images, batch.prompts[::-1], batch.metadata)
    assert not np.allclose(other, scores)  # the prompt matters


class ScoringServer(BaseHTTPRequestHandler):
    """A user's scoring server (stdlib): mean brightness of each PNG; /fail, /short, /html answer badly."""

    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        images = [decode_image(i, s) for i, s in enumerate(data["images"])]
        status, body = 200, {"score": [float(im.mean()) / 255 for im in images], "n": [len(data["prompts"])] * 2}
        if self.path == "/fail":
            status, body = 503, {"error": "model not loaded"}
        if self.path == "/short":
            body = {"score": body["score"][:-1]}
        payload = b"<html>oops</html>" if self.path == "/html" else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def scoring_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScoringServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_reward_posts_png_json(scoring_server):
    batch = make_batch(2)
    out = run_reward("remote", HttpReward(scoring_server + "/score"), batch)
    np.testing.assert_allclose(out.score, brightness(batch.images, [], []))
    assert out.subs["n"].tolist() == [2, 2]
    with pytest.raises(RewardError, match=r"^reward 'remote': raised RuntimeError: http://127.0.0.1:\d+/fail "
                                          r"answered HTTP 503: model not loaded$"):
        run_reward("remote", HttpReward(scoring_server + "/fail"), batch)
    with pytest.raises(RewardError, match=r"^reward 'remote': returned 1 scores for 2 images$"):
        run_reward("remote", HttpReward(scoring_server + "/short"), batch)
    with pytest.raises(RewardError, match=r"^reward 'remote': raised ValueError: http://127.0.0.1:\d+/html answered "
                                          r"HTTP 200 with a non-JSON body: b'<html>oops</html>'$"):
        run_reward("remote", HttpReward(scoring_server + "/html"), batch)
    with pytest.raises(RewardError, match=r"^reward 'remote': raised URLError"):
        run_reward("remote", HttpReward("http://127.0.0.1:9/x", timeout_s=2), batch)


# ------------------------------------------------------------------------------------------- combination
def test_weighted_sum_from_yaml_reports_every_component(tmp_path):
    cfg = rewards_config(tmp_path, """
rewards:
  - {name: verifier, weight: 2.0, kwargs: {mode: strict}}
  - {name: "test_rewards:brightness", weight: -0.5}
  - {name: "test_rewards:brightness", weight: 0.25, label: bright2, kwargs: {scale: 4}}
""")
    batch = make_batch(3)
    scored = CombinedReward(cfg.rewards)(batch)
    b = brightness(batch.images, [], [])
    assert set(scored.components) >= {"verifier", "verifier/all", "verifier/count", "brightness", "bright2"}
    np.testing.assert_allclose(scored.components["bright2"], 4 * b)
    np.testing.assert_allclose(scored.total, 2 * scored.components["verifier"] - 0.5 * b + 0.25 * 4 * b)
    assert scored.components["verifier"].tolist() == scored.components["verifier/all"].tolist()


def test_score_many_merges_requests_and_splits_in_order():
    reward = CombinedReward(RewardsConfig(rewards=[{"name": "verifier"},
                                                   {"name": "test_rewards:brightness"}]).rewards)
    small = Batch(np.zeros((1, 32, 32, 3), np.uint8), ["x"], shapes_metadata(all_specs()[:1]))
    batches = [make_batch(2, seed=1), small, make_batch(3, seed=2)]
    merged = score_many(reward, batches)
    for batch, got in zip(batches, merged):
        want = reward(batch)
        np.testing.assert_allclose(got.total, want.total)
        assert got.components.keys() == want.components.keys()
    assert reward.metrics.requests_per_batch == {3: 1}
    assert sorted(reward.metrics.images["verifier"][:2]) == [1, 5]  # one call per image size


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("where, value, message", [
    (("rewards", 0, "weight"), "abc", r"^rewards.0.weight: Input should be a valid number"),
    (("rewards", 0, "bogus"), 1, r"^rewards.0.bogus: Extra inputs are not permitted"),
    (("rewards", 0, "label"), "x/y", r"^rewards.0: label 'x/y': must not contain '/'"),
    (("rewards", 1, "label"), "verifier", r"^rewards: labels \['verifier'\] appear more than once"),
    (("service", "max_ongoing_requests"), 4, r"^service.max_ongoing_requests: must be >= max_batch"),
    (("service", "port"), 0, r"^service.port: Input should be greater than or equal to 1"),
    (("service", "route_prefix"), "rewards", r"^service.route_prefix: must start with '/'"),
])
def test_config_errors_name_the_field(tmp_path, where, value, message):
    data = {"rewards": [{"name": "verifier"}, {"name": "clip_score"}], "service": {"max_batch_size": 8}}
    assert rewards_config(tmp_path, json.dumps(data)).service.ongoing_requests == 16
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(ConfigError, match=message):
        rewards_config(tmp_path, json.dumps(data))


def test_service_defaults_and_backoff():
    svc = ServiceConfig()
    assert svc.host == "127.0.0.1" and svc.ongoing_requests >= svc.max_batch_size
    assert [backoff_delay(k, 0.5, 3.0) for k in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]


# --------------------------------------------------------------------------------------------------- wire
def test_wire_roundtrip_and_bad_payloads():
    batch = make_batch(3)
    back = batch_from_json(json.loads(json.dumps(batch_to_json(batch))))
    assert np.array_equal(back.images, batch.images) and back.prompts == batch.prompts
    assert back.metadata == batch.metadata
    scored = Scored(np.array([1.0, 2.0]), {"v/position": np.array([np.nan, 1.0])})
    again = Scored.from_json(json.loads(json.dumps(scored.to_json(), allow_nan=False)))
    assert np.isnan(again.components["v/position"][0]) and again.total.tolist() == [1.0, 2.0]

    good = batch_to_json(batch)
    jpeg = base64.b64encode(_jpeg_bytes()).decode()
    for payload, message in [
        ([1, 2], "^request: Input should be a valid dictionary"),
        ({**good, "images": []}, "^images: List should have at least 1 item"),
        ({"prompts": ["a"]}, "^images: Field required"),
        ({**good, "extra": 1}, "^extra: Extra inputs are not permitted"),
        ({**good, "images": ["%%%"] * 3}, "^images.0: not a base64-encoded PNG"),
        ({**good, "images": [good["images"][0], jpeg, jpeg]}, "^images.1: JPEG image, expected PNG"),
        ({**good, "prompts": ["a"]}, "^batch: 3 images, 1 prompts, 3 metadata"),
    ]:
        with pytest.raises(PayloadError, match=message):
            batch_from_json(payload)


def _jpeg_bytes() -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    return buf.getvalue()



def test_colour_fraction_counts_pixels_near_the_colour():
    from rewards.base import load_reward
    from rewards.builtin import colour_fraction

    img = np.full((2, 4, 4, 3), 245, dtype=np.uint8)
    img[0, :2] = (220, 40, 40)          # half red
    img[1, 0, 0] = (200, 60, 60)        # one reddish pixel (distance 34.6 <= 90)
    np.testing.assert_allclose(colour_fraction(img, (220, 40, 40)), [0.5, 1 / 16])
    reward = load_reward("colour_fraction", {"colour": "red"})
    np.testing.assert_allclose(reward(img, ["a", "b"], [{}, {}]), [0.5, 1 / 16])
    with pytest.raises(Exception, match="colour_fraction.*colour must be one of"):
        load_reward("colour_fraction", {"colour": "pink"})
