"""The benchmark set at NextFlow-shaped sizes on one GPU: a Qwen2.5-7B-shaped backbone with random weights in
bf16, NextFlow's 18-scale 1024-px schedule (10,084 tokens), a 16,384-code head, KV-cached sampling with the
RL rollout settings (CFG 5, top-k 2, top-p 0.9). Prints one table; writes benchmarks/results/gpu_nextflow.{json,md}.

    python benchmarks/gpu_nextflow.py            # on a CUDA machine (H100/H200: ~80 GB peak), < 8 minutes
    python benchmarks/gpu_nextflow.py --smoke    # tiny sizes on the CPU: runs every code path (writes *_smoke)

Rows (each side timed with torch.cuda.synchronize around it, interleaved where there are two sides):
  - seconds per 1024^2 image (token grid; decoder left out): batch 1 and batch --batch, KV cache;
  - KV cache vs recomputing the prefix at each scale, batch 1;
  - next-scale vs raster-scan at 256 px (the first 12 scales, the same weights), batch 1;
  - achieved sampler FLOP/s (common.sampler_flops) vs a bf16 8192^3 matmul;
  - the learner step at m = 8 vs all 18 scales, same batch: forward + backward + AdamW through the learner's
    own micro-step (rl.update.micro_step: PrefixScorer and prefix-GRPO loss), LoRA r = 8 on every linear (full fine-tuning of a 7B model with AdamW
    needs ~120 GB of weights and optimiser state alone: the NextFlow config shards it with ZeRO-2 over 8 GPUs),
    gradient checkpointing on;
  - bytes of a weight update, full model vs LoRA adapters;
  - first, 3 steps of the real RL loop on the tiny shapes world, every actor on the one GPU, bf16
    (benchmarks/gpu_loop.py): fails when the first-pass ratio deviates from 1 by more than 1e-2.
The script exits 1 when any row failed, so it is also the GPU machine's check (README "Running on GPUs").
A measurement that fails (e.g. out of memory) or would start after --budget-s shows its error in the table.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (OUT, QWEN7B_BACKBONE, fmt, human_bytes, interleaved, learner_memory, md_table, prompts, rate,
                    ratio, sampler_flops, schedule_for, stats, update_bytes, write_result)
from gpu_loop import loop_rows

from policy.sampler import SampleConfig, sample, sample_raster
from policy.scales import prefix_tokens
from policy.tokenizer import MultiScaleVQ, VQConfig
from policy.transformer import BackboneConfig, NextScaleConfig, NextScaleLM

SAMPLE = SampleConfig(cfg_scale=5.0, top_k=2, top_p=0.9)


@dataclass
class Sizes:
    backbone: dict
    px: int              # the full schedule
    raster_px: int       # the schedule of the raster comparison (a truncation of the full one)
    num_codes: int
    code_dim: int
    text_vocab: int
    text_len: int
    batch: int           # sampling batch (prompts; x 2 rows with CFG)
    learner_rows: int
    m: int
    matmul: int
    repeats: int


GPU = Sizes(QWEN7B_BACKBONE, 1024, 256, 16384, 32, 152064, 32, 4, 4, 8, 8192, 2)
SMOKE = Sizes(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2), 256, 256, 64, 8, 64, 8, 2, 2, 8, 256, 1)


# ------------------------------------------------------------------------------------------------ set-up
def build(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> tuple[NextScaleLM, MultiScaleVQ]:
    """Random weights, created on the device (fp32 init, then cast: 7.6 B params = 30 GB peak, 15 GB in bf16)."""
    torch.manual_seed(0)
    sched = schedule_for(sizes.px)
    cfg = NextScaleConfig(backbone=BackboneConfig(**sizes.backbone), schedule=sched,
                          text_vocab_size=sizes.text_vocab, num_codes=sizes.num_codes, code_dim=sizes.code_dim)
    with torch.device(device):
        model = NextScaleLM(cfg).to(dtype).eval()
        vq = MultiScaleVQ(VQConfig(schedule=sched, image_size=16 * sched[-1][0], channels=[8, 8, 8, 8],
                                   code_dim=sizes.code_dim, num_codes=sizes.num_codes)).eval()
    return model, vq


def truncated(model: NextScaleLM, px: int) -> NextScaleLM:
    """The same weights on the first scales of the schedule (NextFlow at 256 px = its first 12 scales)."""
    short = copy.copy(model)                   # shallow: shares every parameter
    short.schedule = schedule_for(px)
    return short


class Runner:
    """Runs named measurements in order; one that fails or would start past the budget records why."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s, self.rows, self.data, self.failed = time.perf_counter(), budget_s, [], {}, []

    def __call__(self, name: str, fn) -> None:
        if time.perf_counter() - self.t0 > self.budget_s:
            self.rows.append([name, "skipped: time budget spent", "", ""])
            return
        try:
            rows, data = fn()
            self.rows += rows
            self.data[name] = data
        except Exception as e:  # OOM and friends: report, go on with the rest
            traceback.print_exc()
            self.failed.append(name)
            self.rows.append([name, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", "", ""])
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        print(f"[{time.perf_counter() - self.t0:.0f} s] {name} done", flush=True)


# ------------------------------------------------------------------------------------------------ measurements
def sampling_rows(model, vq, sizes: Sizes, sync) -> tuple[list, dict]:
    out = {}
    for b in sorted({1, sizes.batch}):
        text, seeds = prompts(b, sizes.text_len, sizes.text_vocab), list(range(b))
        t = interleaved({"kv": lambda: sample(model, vq, text, seeds, SAMPLE, decode=False)}, sizes.repeats,
                        sync=sync)["kv"]
        out[b] = stats([x / b for x in t])
    rows = [[f"next-scale sampling, {sizes.px} px, batch {b} (CFG)", f"{fmt(s)} s per image", "", ""]
            for b, s in out.items()]
    return rows, out


def kv_rows(model, vq, sizes: Sizes, sync) -> tuple[list, dict]:
    text, seeds = prompts(1, sizes.text_len, sizes.text_vocab), [0]
    t = interleaved({"cached": lambda: sample(model, vq, text, seeds, SAMPLE, decode=False),
                     "recompute": lambda: sample(model, vq, text, seeds, SAMPLE, decode=False, use_cache=False)},
                    sizes.repeats, warmup=0, sync=sync)
    r = ratio(t["recompute"], t["cached"])
    flop_ratio = (sampler_flops(model.cfg, sizes.text_len, 2, use_cache=False)
                  / sampler_flops(model.cfg, sizes.text_len, 2))
    return [[f"KV cache vs recompute, {sizes.px} px, batch 1", f"{fmt(stats(t['cached']))} s vs "
             f"{fmt(stats(t['recompute']))} s", f"{fmt(r)}x", f"FLOP ratio {flop_ratio:.2f}; goal >= 4x"]], \
        {"seconds": t, "speedup": r, "flop_ratio": flop_ratio}


def raster_rows(model, vq, sizes: Sizes, sync) -> tuple[list, dict]:
    short = truncated(model, sizes.raster_px)
    text, seeds = prompts(1, sizes.text_len, sizes.text_vocab), [0]
    t = interleaved({"next_scale": lambda: sample(short, vq, text, seeds, SAMPLE, decode=False),
                     "raster": lambda: sample_raster(short, vq, text, seeds, SAMPLE, decode=False)},
                    1, warmup=0, sync=sync)
    r = ratio(t["raster"], t["next_scale"])
    return [[f"next-scale vs raster, {sizes.raster_px} px ({len(short.schedule)} scales), batch 1",
             f"{t['next_scale'][0]:.3g} s vs {t['raster'][0]:.3g} s", f"{r['median']:.3g}x", "goal >= 20x"]], \
        {"seconds": t, "speedup": r}


def efficiency_rows(model, vq, sizes: Sizes, sync, device, dtype) -> tuple[list, dict]:
    text, seeds = prompts(sizes.batch, sizes.text_len, sizes.text_vocab), list(range(sizes.batch))
    n = sizes.matmul
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = interleaved({"sampler": lambda: sample(model, vq, text, seeds, SAMPLE, decode=False),
                     "matmul": lambda: [a @ b for _ in range(10)]}, sizes.repeats, sync=sync)
    fps = {"sampler": rate(t["sampler"], sampler_flops(model.cfg, sizes.text_len, 2 * sizes.batch)),
           "matmul": rate(t["matmul"], 10 * 2 * n**3)}
    eff = ratio(fps["sampler"], fps["matmul"])
    return [[f"sampler FLOP/s vs {n}^3 matmul, batch {sizes.batch}",
             f"{stats(fps['sampler'])['median'] / 1e12:.3g} vs {stats(fps['matmul'])['median'] / 1e12:.3g} TFLOP/s",
             f"{fmt(eff, 2)}", "goal >= 0.5"]], {"flop_per_s": fps, "fraction": eff}


def learner_rows(model, vq, sizes: Sizes, sync, device) -> tuple[list, dict]:
    from policy.weights import LoraSettings, apply_lora
    from rl.config import GRPOLossConfig
    from rl.strategy import LearnerConfig
    from rl.update import PrefixScorer, TrainBatch, learner_optimizer, micro_step, prefix_of

    sched, rows = model.schedule, sizes.learner_rows
    model.backbone.activation_checkpointing_enable({"use_reentrant": False})
    lora = apply_lora(model, LoraSettings()).train()
    g = torch.Generator().manual_seed(0)
    text = prompts(rows, sizes.text_len, sizes.text_vocab)
    codes = [torch.randint(0, sizes.num_codes, (rows, h, w), generator=g).to(device) for h, w in sched]
    adv = torch.tensor([1.0, -1.0], device=device).repeat(rows // 2 + 1)[:rows]
    ms = {"prefix": sizes.m, "full": len(sched)}
    scorers = {k: PrefixScorer(lora, vq, m) for k, m in ms.items()}
    prefixes = {k: prefix_of(sched, m, 0.0, device) for k, m in ms.items()}             # k_s = 1
    with torch.no_grad():                                          # old log-probs = the current policy's (rho = 1)
        batches = {k: TrainBatch(text, codes, scorers[k](text, codes)[0], adv) for k in ms}
    opt = learner_optimizer(lora, LearnerConfig(lr=1e-6))

    def step(k):                                                   # what a learner rank does with one micro-batch
        loss, _ = micro_step(scorers[k], batches[k], prefixes[k], GRPOLossConfig())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = interleaved({k: (lambda k=k: step(k)) for k in ms}, sizes.repeats, sync=sync)
    peak = {k: peak_bytes(lambda k=k: step(k)) for k in ms}
    estimate = {k: learner_memory(model.cfg, rows, sizes.text_len, m) for k, m in ms.items()}
    tokens = {k: prefix_tokens(sched, m) for k, m in ms.items()}
    r = ratio(t["full"], t["prefix"])
    token_ratio = tokens["full"] / tokens["prefix"]
    return [[f"learner step m = {ms['prefix']} vs {ms['full']} scales ({tokens['prefix']} vs {tokens['full']} "
             f"tokens), {rows} rows, LoRA", f"{fmt(stats(t['prefix']))} s vs {fmt(stats(t['full']))} s",
             f"{fmt(r)}x", f"token ratio {token_ratio:.1f}; time/token ratio {r['median'] / token_ratio:.2f} "
             "(goal >= 0.8)"]] + [
        [f"learner step memory, m = {m}, {rows} rows", f"peak {human_bytes(peak[k]) if peak[k] else 'n/a (CPU)'}",
         "", f"estimate {human_bytes(estimate[k]['total'])} (common.learner_memory; mask "
             f"{human_bytes(estimate[k]['mask'])} shared)"] for k, m in ms.items()], \
        {"seconds": t, "tokens": tokens, "time_ratio": r, "token_ratio": token_ratio, "peak_bytes": peak,
         "estimate_bytes": estimate}


def peak_bytes(fn) -> int:
    """Peak GPU memory allocated during one call (0 on the CPU)."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def bytes_rows(model) -> tuple[list, dict]:
    b = update_bytes(model.cfg, next(model.parameters()).dtype)
    return [["weight update bytes, LoRA r = 8 (policy.weights defaults)", f"{b['full'] / 2**30:.3g} GiB vs "
             f"{b['lora'] / 2**20:.3g} MiB", f"{100 * b['lora'] / b['full']:.2f} %", "goal <= 2 %"]], b


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (exercises every code path)")
    ap.add_argument("--budget-s", type=float, default=420, help="start no measurement after this many seconds")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--out", type=Path, default=OUT, help="where the result files go")
    args = ap.parse_args()
    sizes = SMOKE if args.smoke else GPU
    if args.batch:
        sizes.batch = args.batch
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_nextflow: no CUDA device (use --smoke to run the code path on the CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    sync = (lambda: None) if args.smoke else torch.cuda.synchronize
    if not args.smoke:
        torch.backends.cuda.matmul.allow_tf32 = True
    run = Runner(args.budget_s)
    run("rl_loop", lambda: loop_rows(gpu=not args.smoke))  # the correctness check first, on a free GPU
    t = time.perf_counter()
    model, vq = build(sizes, device, dtype)
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    with torch.no_grad():
        run("sampling", lambda: sampling_rows(model, vq, sizes, sync))
        run("kv_cache", lambda: kv_rows(model, vq, sizes, sync))
        run("raster", lambda: raster_rows(model, vq, sizes, sync))
        run("efficiency", lambda: efficiency_rows(model, vq, sizes, sync, device, dtype))
    run("weight_bytes", lambda: bytes_rows(model))
    run("learner", lambda: learner_rows(model, vq, sizes, sync, device))
    if torch.cuda.is_available():
        run.data["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    table = md_table([f"NextFlow-shaped ({'smoke, CPU' if args.smoke else torch.cuda.get_device_name()}, "
                      f"{params / 1e9:.2f} B)",
                      "measured", "ratio", "note"], run.rows)
    write_result("gpu_nextflow_smoke" if args.smoke else "gpu_nextflow",
                 {"sizes": sizes.__dict__, "results": run.data, "failed": run.failed,
                  "total_s": time.perf_counter() - run.t0}, table, args.out)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
