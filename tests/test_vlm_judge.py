"""The `vlm_judge` reward: pure parts against hand-worked cases (fast), then a real vLLM engine on the CPU (slow).

The slow tests start ONE judge (a Serve application running `vllm.LLM` on the judge venv's Python) for the whole
module and share it: the batch through Serve, the reward inside the combined reward service, the one-line start-up
errors. They are skipped, with the reason, only where `.venv-judge` has not been built (`make judge-env`).
"""
import math
import random
import subprocess
import time

import numpy as np
import pytest

from rewards.vlm_judge import (DEFAULT_PYTHON, REPO, VlmJudge, check_template, normalise_token, question,
                               scores_from_logprobs, top_logprobs_from_openai, yes_probability)

LN = math.log


# ------------------------------------------------------------------------------------------------ pure parts
def test_question_template():
    assert question("does the image show {prompt} ?", "  a red circle ") == "does the image show a red circle ?"
    assert check_template("is this {prompt}?") == "is this {prompt}?"
    for bad in ("no field", "{prompt} {caption}", "{}"):
        with pytest.raises(ValueError, match="question_template"):
            check_template(bad)


def test_normalise_token():
    assert [normalise_token(t) for t in ("ĠYes", "▁yes", " YES.", "no", "No,", "Ġnothing")] == \
        ["yes", "yes", "yes", "no", "no", "nothing"]


def test_yes_probability_hand_worked():
    # P(yes) = 0.6, P(no) = 0.2 -> 0.75
    assert yes_probability({"yes": LN(0.6), "no": LN(0.2), "maybe": LN(0.1)}) == pytest.approx(0.75)
    # variants add up: P(yes) = 0.3 + 0.1 = 0.4, P(no) = 0.4 -> 0.5
    assert yes_probability({"Yes": LN(0.3), "Ġyes": LN(0.1), "▁No": LN(0.4)}) == pytest.approx(0.5)
    # only one of the two among the top tokens: certain
    assert yes_probability({"yes": LN(0.01), "circle": LN(0.9)}) == 1.0
    assert yes_probability({"no": LN(0.01), "circle": LN(0.9)}) == 0.0
    # neither: undefined
    assert yes_probability({"circle": LN(0.5), "square": LN(0.5)}) is None
    # custom words
    assert yes_probability({"oui": LN(0.3), "non": LN(0.1)}, yes=("oui",), no=("non",)) == pytest.approx(0.75)


def test_scores_from_logprobs_neutral_and_counter():
    answers = [{"yes": LN(0.9), "no": LN(0.1)}, {"red": 0.0}, {"no": LN(0.5)}]
    scores, neither = scores_from_logprobs(answers, neutral=0.5)
    assert scores == pytest.approx([0.9, 0.5, 0.0])
    assert neither.tolist() == [0.0, 1.0, 0.0]


def test_top_logprobs_from_openai():
    body = {"choices": [{"logprobs": {"content": [{"token": "yes", "logprob": -0.1, "top_logprobs": [
        {"token": "yes", "logprob": -0.1}, {"token": "no", "logprob": -2.4}]}]}}]}
    assert top_logprobs_from_openai(body) == {"yes": -0.1, "no": -2.4}
    with pytest.raises(ValueError, match="logprobs"):
        top_logprobs_from_openai({"choices": [{"message": {"content": "yes"}}]})


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="model / base_url"):
        VlmJudge()
    with pytest.raises(ValueError, match="^model: .*no config.json"):
        VlmJudge(model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neutral_score"):
        VlmJudge(base_url="http://127.0.0.1:1/v1", neutral_score=2)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="^python: "):
        VlmJudge(model=str(tmp_path), python=str(tmp_path / "nopython"))


def test_judge_examples_alternate_true_and_conflicting_captions():
    from policy.stages.common import sample_specs
    from rewards.judge_train import judge_examples
    from shapes.verifier import score
    from shapes.world import caption, split_prompts

    rng = random.Random(0)
    specs = sample_specs(rng, 12)
    images, questions, labels = judge_examples(rng, specs, "q {prompt} ?")
    assert labels == [1, 0] * 6 and images.shape == (12, 64, 64, 3)
    assert all(q == f"q {caption(s)} ?" for q, s, y in zip(questions, specs, labels) if y)
    assert all(q != f"q {caption(s)} ?" for q, s, y in zip(questions, specs, labels) if not y)
    assert all(score(im, s)["all"] for im, s in zip(images, specs))  # the scene shows its own spec
    # training: the conflicting captions are training prompts too (no "unfamiliar caption = no" shortcut)
    train = set(split_prompts().train)
    _, questions, labels = judge_examples(rng, sample_specs(rng, 200), "{prompt}", train)
    assert {q for q, y in zip(questions, labels) if not y} <= {caption(s) for s in train}


def test_answer_logits_read_the_token_after_each_question_whatever_the_padding():
    import torch
    from transformers import Blip2ForConditionalGeneration

    from rewards.judge_model import build_config, build_processor
    from rewards.judge_train import answer_logits

    processor = build_processor()
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(build_config(len(processor.tokenizer), 32, 1, 32, 1)).eval()
    images, _, _ = shapes_batch(2)
    questions = ["does the image show a red circle ?", "is this two blue squares left of a green triangle ?"]
    with torch.no_grad():
        batched = answer_logits(model, processor, images, questions)
        alone = torch.cat([answer_logits(model, processor, images[i:i + 1], questions[i:i + 1]) for i in range(2)])
        full = model(**processor(images=list(images[:1]), text=questions[:1], return_tensors="pt")).logits[0, -1]
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone[0], full)


# ------------------------------------------------------------------------------- a real vLLM engine (slow)
needs_judge_env = pytest.mark.skipif(not DEFAULT_PYTHON.exists(),
                                     reason=f"no judge venv at {DEFAULT_PYTHON.parent.parent} (run `make judge-env`)")
APP = "vlm_judge_test"


SHIPPED_JUDGE = REPO / "checkpoints" / "shapes-judge"


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """The shipped trained judge (checkpoints/shapes-judge, `make judge`); without it the tiny random judge, built
    by the judge venv's Python."""
    if (SHIPPED_JUDGE / "config.json").is_file():
        return SHIPPED_JUDGE
    out = tmp_path_factory.mktemp("judge") / "tiny-judge"
    subprocess.run([str(DEFAULT_PYTHON), "-m", "rewards.judge_model", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def judge(judge_dir):
    """ONE judge for the module: a Serve application whose replica runs vllm.LLM on the judge venv's Python."""
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    t0 = time.perf_counter()
    try:
        j = VlmJudge(model=str(judge_dir), app_name=APP, num_cpus=1, max_batch_size=8, batch_wait_timeout_s=0.2,
                     timeout_s=300)
        print(f"\njudge start (Serve app + vLLM engine in the replica): {time.perf_counter() - t0:.1f} s")
        yield j
    finally:
        serve.shutdown()
        ray.shutdown()


def shapes_batch(n: int, seed: int = 0):
    from rewards.builtin import shapes_metadata
    from shapes.world import all_specs, caption, render

    rng = random.Random(seed)
    specs = rng.sample(all_specs(), n)
    return np.stack([render(s, rng) for s in specs]), [caption(s) for s in specs], shapes_metadata(specs)


@pytest.mark.slow
@needs_judge_env
def test_judge_scores_a_batch_through_serve(judge):
    from ray import serve

    images, prompts, meta = shapes_batch(12)
    t0 = time.perf_counter()
    out = judge(images, prompts, meta)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = judge(images, prompts, meta)
    print(f"\n12 images: first call {first:.2f} s, second {time.perf_counter() - t0:.2f} s")
    scores = np.asarray(out["score"])
    assert scores.shape == (12,) and np.all((scores >= 0) & (scores <= 1))
    assert np.asarray(out["neither"]).shape == (12,)
    np.testing.assert_allclose(again["score"], scores, atol=1e-6)   # greedy, same engine: deterministic
    engine = serve.get_app_handle(APP)
    stats = engine.stats.remote().result(timeout_s=60)
    assert stats["python"].startswith(str(REPO / ".venv-judge")), stats   # the replica runs on the judge venv
    assert stats["images"] >= 24 and stats["max_batch"] > 1, stats      # requests were merged by serve.batch


@pytest.mark.slow
@needs_judge_env
def test_judge_inside_the_combined_reward_service(judge, judge_dir):
    from rewards.client import RewardClient
    from rewards.config import RewardsConfig
    from rewards.service import start_service
    from tests.conftest import free_port

    cfg = RewardsConfig.model_validate({
        "rewards": [{"name": "verifier", "weight": 1.0, "kwargs": {"mode": "partial"}},
                    {"name": "vlm_judge", "weight": 0.5, "label": "judge", "timeout_s": 300,
                     "kwargs": {"model": str(judge_dir), "app_name": APP}}],
        "service": {"num_cpus": 1, "max_batch_size": 4, "port": free_port(), "timeout_s": 300, "retries": 0}})
    client = RewardClient(start_service(cfg), cfg)
    images, prompts, meta = shapes_batch(6, seed=1)
    scored = client.score(images, prompts, meta)
    judge_scores = scored.components["judge"]
    assert np.all((judge_scores >= 0) & (judge_scores <= 1))
    assert "judge/neither" in scored.components and "verifier" in scored.components
    np.testing.assert_allclose(scored.total, scored.components["verifier"] + 0.5 * judge_scores)
    np.testing.assert_allclose(judge_scores, judge(images, prompts, meta)["score"], atol=1e-6)


@pytest.mark.slow
@needs_judge_env
def test_judge_cannot_start_names_the_field(judge, judge_dir):
    with pytest.raises(ValueError, match=r"^num_gpus: asks for 1 GPU\(s\) .* the cluster has 0"):
        VlmJudge(model=str(judge_dir), num_gpus=1, app_name="vlm_judge_gpu")


@pytest.fixture(scope="module")
def judge_server(judge_dir):
    """A real OpenAI-compatible judge server: vLLM's api_server on the judge venv, on loopback."""
    import os
    import urllib.request

    from rewards.vlm_judge import DEFAULT_CACHE, judge_env_vars
    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, **judge_env_vars(DEFAULT_CACHE)}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    proc = subprocess.Popen([str(DEFAULT_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model",
                             str(judge_dir), "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port",
                             str(port), "--enforce-eager", "--max-model-len", "256", "--max-logprobs", "20"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    try:
        while True:
            assert proc.poll() is None, f"vLLM's api_server exited with {proc.returncode}"
            assert time.perf_counter() - t0 < 600, "vLLM's api_server not up within 600 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        print(f"\njudge server up in {time.perf_counter() - t0:.1f} s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.slow
@needs_judge_env
def test_judge_through_an_openai_compatible_server(judge_server):
    images, prompts, meta = shapes_batch(6, seed=2)
    j = VlmJudge(base_url=judge_server, served_model="tiny-judge")
    out = j(images, prompts, meta)
    scores = np.asarray(out["score"])
    assert scores.shape == (6,) and np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(j(images, prompts, meta)["score"], scores, atol=1e-6)


@pytest.mark.slow
@needs_judge_env
@pytest.mark.skipif(not (SHIPPED_JUDGE / "config.json").is_file(), reason="no shipped judge (make judge)")
def test_the_trained_judge_tells_true_from_conflicting_captions_through_vllm(judge):
    """Held-out scenes asked about their own caption and about a conflicting one: P(yes) separates them."""
    from policy.stages.common import sample_specs
    from rewards.judge_train import judge_examples
    from shapes.world import caption

    rng = random.Random(7)
    specs = sample_specs(rng, 40, split="heldout")
    images, questions, labels = judge_examples(rng, specs, "{prompt}")    # the bare captions asked
    scores = np.asarray(judge(images, questions, [{}] * len(questions))["score"])
    labels = np.asarray(labels)
    accuracy = float(((scores > 0.5) == labels).mean())
    print(f"\njudge through vLLM, 40 held-out questions: accuracy {accuracy:.2f}, mean P(yes) true "
          f"{scores[labels == 1].mean():.2f} vs conflicting {scores[labels == 0].mean():.2f}")
    assert scores[labels == 1].mean() > scores[labels == 0].mean() + 0.2 and accuracy >= 0.75
    assert caption(specs[0]) in questions[0]


@pytest.mark.slow
@needs_judge_env
def test_a_judge_replica_killed_mid_batch_is_retried_never_a_silent_zero(judge):
    import os
    import signal
    import threading

    from ray import serve

    images, prompts, meta = shapes_batch(400, seed=5)   # ~50 serve batches of 8: a few seconds in the replica
    want = judge(images, prompts, meta)["score"]
    pid = serve.get_app_handle(APP).stats.remote().result(timeout_s=60)["pid"]
    retried = judge.retried
    out = {}
    t = threading.Thread(target=lambda: out.update(judge(images, prompts, meta)))
    t.start()
    time.sleep(0.5)                       # the requests are in the replica
    os.kill(pid, signal.SIGKILL)
    t.join(600)
    assert "score" in out, "the judge call did not come back"
    np.testing.assert_allclose(out["score"], want, atol=1e-6)   # the lost requests were asked again: same scores
    new_pid = serve.get_app_handle(APP).stats.remote().result(timeout_s=60)["pid"]
    assert new_pid != pid and judge.retried > retried


@pytest.mark.slow
@needs_judge_env
def test_one_rl_step_with_the_judge_as_the_reward(judge, judge_dir, rl_assets, tmp_path):
    import json

    from rl.config import RunConfig
    from rl.driver import Driver
    from tests.conftest import run_config

    cfg = run_config(rl_assets, tmp_path, "judge-rl", steps=1)
    cfg["rewards"]["rewards"] = [{"name": "vlm_judge", "weight": 1.0, "label": "judge", "timeout_s": 300,
                                  "kwargs": {"model": str(judge_dir), "app_name": APP}}]
    cfg["rewards"]["service"] |= {"timeout_s": 300}
    driver = Driver(RunConfig(**cfg))
    driver.run()
    row = json.loads((driver.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= row["reward/judge/mean"] <= 1.0 and "reward/judge/neither/mean" in row
    assert (driver.run_dir / "final_policy" / "transformer" / "config.json").is_file()
