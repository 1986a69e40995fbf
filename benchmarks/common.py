"""Shared by the benchmark scripts: interleaved timing, median and spread, FLOP counts, benchmark models, output.

Every script measures its two sides in one process, alternating A, B, A, B, ... (so a load spike from other jobs
on the machine hits both), and reports the median with min-max of each side and the ratio of the medians (plus
the min-max of the per-repeat paired ratios). Results go to benchmarks/results/NAME.json and NAME.md;
`benchmarks/run_all.py` pastes every NAME.md into README.md between `<!-- bench:NAME -->` markers.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.atomic import atomic_write_text  # noqa: E402
from policy.scales import Schedule, nextflow_schedule, prefix_tokens, scale_offsets, tiny_schedule  # noqa: E402
from policy.transformer import BackboneConfig, NextScaleConfig, NextScaleLM  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
TINY_POLICY = ROOT / "checkpoints" / "shapes-tiny" / "policy"


# --------------------------------------------------------------------------------------------- timing
def interleaved(sides: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter,
                ) -> dict[str, list[float]]:
    """Seconds per call of each side, measured A, B, A, B, ... `repeats` times after `warmup` untimed rounds.

    `sync` runs before and after every timed call (torch.cuda.synchronize on a GPU). `clock`: wall time by
    default; `time.process_time` (CPU seconds of this process) for single-process CPU benchmarks on a machine
    shared with other jobs, where wall time mostly measures the others' load.
    """
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            sync()
            t = clock()
            fn()
            sync()
            times[name].append(clock() - t)
    return times


def stats(xs: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles of a list of measurements."""
    qs = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "q1": qs[0], "q3": qs[2], "n": len(xs)}


def ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """median(num) / median(den), and min-max of the per-repeat ratios num_i / den_i (the pairs are interleaved)."""
    paired = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(num) / statistics.median(den), "min": min(paired), "max": max(paired)}


def rate(per_call: list[float], items: float) -> list[float]:
    """Seconds per call -> items per second."""
    return [items / t for t in per_call]


def fmt(s: dict[str, float], digits: int = 3) -> str:
    """'median (min-max)' of a stats() or ratio() dict."""
    return f"{s['median']:.{digits}g} ({s['min']:.{digits}g}-{s['max']:.{digits}g})"


def goal_cell(value: float, goal: float, op: str = ">=", unit: str = "") -> str:
    met = value >= goal if op == ">=" else value <= goal
    return f"{'met' if met else 'MISSED'} ({op} {goal:g}{unit})"


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def cpu_threads(n: int = 1) -> None:
    """Single-process CPU benchmarks run on one torch thread and are timed in CPU seconds (see interleaved)."""
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------- output
def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_avg": os.getloadavg()}


def write_result(name: str, payload: dict, table: str, out: Path = OUT) -> None:
    """benchmarks/results/NAME.json (payload + machine) and NAME.md (the table); prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join(["python"] + sys.argv), "machine": machine()} | payload
    atomic_write_text(out / f"{name}.json", json.dumps(payload, indent=1, default=float) + "\n")
    atomic_write_text(out / f"{name}.md", table)
    print(table, flush=True)


# --------------------------------------------------------------------------------------------- FLOPs
def forward_flops(cfg: NextScaleConfig, n_tokens: int, n_ctx: int, head_tokens: int | None = None) -> int:
    """Matmul FLOPs (2 per multiply-add) of one backbone forward of n_tokens new tokens per row, each attending to
    n_ctx keys (masked keys included: the dense kernels compute them), plus the image head on head_tokens
    (default n_tokens). Embeddings, norms, RoPE and the softmax are left out (O(n * D), not matmuls).
    """
    b = cfg.backbone
    d, hd = b.hidden_size, b.hidden_size // b.num_attention_heads
    q_dim, kv_dim = b.num_attention_heads * hd, b.num_key_value_heads * hd
    proj = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * b.intermediate_size     # MACs per token per layer
    attn = 2 * n_ctx * q_dim                                                          # QK^T and AV per token
    head = cfg.num_codes * d * (n_tokens if head_tokens is None else head_tokens)
    return 2 * (b.num_hidden_layers * n_tokens * (proj + attn) + head)


def sampler_flops(cfg: NextScaleConfig, text_len: int, rows: int, use_cache: bool = True) -> int:
    """Transformer FLOPs of policy.sampler.sample for `rows` sequences (batch x 2 with CFG) of text_len tokens.

    Forward 1: text + <boi> (head on <boi>); forward s = 2..S: scale s's inputs; with the cache they attend to
    everything before, without it the whole prefix is run again (head only on the new block).
    """
    off = scale_offsets(cfg.schedule)                     # off[s] = tokens of scales 1..s
    total = forward_flops(cfg, text_len + 1, text_len + 1, head_tokens=1)
    for s in range(1, len(cfg.schedule)):
        end = text_len + off[s + 1]                       # text + <boi> + inputs of scales 2..s+1
        new = off[s + 1] - off[s]
        total += forward_flops(cfg, new if use_cache else end, end, head_tokens=new)
    return rows * total


# --------------------------------------------------------------------------------------------- models
SMALL_BACKBONE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2)
# Qwen2.5-7B's shape (random weights): 7.6 B parameters with NextFlow's 18-scale head.
QWEN7B_BACKBONE = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, rope_theta=1e6)


def update_bytes(cfg: NextScaleConfig, dtype=torch.bfloat16, lora=None) -> dict[str, int]:
    """Bytes of one weight update of a model of `cfg` in `dtype`: every weight vs the LoRA adapters (policy.weights
    LoraSettings, defaults r = 8 on the 7 Qwen2 linears); built on the meta device, nothing allocated."""
    from policy.weights import LORA_KEY, LoraSettings, apply_lora, state_bytes

    with torch.device("meta"):
        state = apply_lora(NextScaleLM(cfg), lora or LoraSettings()).to(dtype).state_dict()
    return {"full": state_bytes({k: v for k, v in state.items() if LORA_KEY not in k}),
            "lora": state_bytes({k: v for k, v in state.items() if LORA_KEY in k})}


def learner_memory(cfg: NextScaleConfig, rows: int, text_len: int, m: int, shared_mask: bool = True,
                   weight_bytes: int = 2) -> dict[str, int]:
    """Estimated bytes of one learner micro-step (bf16, gradient checkpointing, LoRA, a memory-efficient attention
    kernel that never holds L x L scores) over text + scales 1..m: the frozen weights; the additive mask (one
    (1, 1, L, L) shared, or one per row); the checkpointed layer inputs; one layer's recomputed activations
    (q, k, v, o and the MLP's gate, up and product); the image logits (bf16, their fp32 copy, the log-softmax).
    LoRA adapters and their AdamW state are left out (< 0.1% here). A floor, not a bound: allocator slack and
    kernel workspaces come on top."""
    b = cfg.backbone
    tokens = prefix_tokens(cfg.schedule, m)
    seq = text_len + tokens                                   # text + <boi> + inputs of scales 2..m
    params = sum(p.numel() for p in _meta_model(cfg).parameters())
    kv = b.num_key_value_heads * b.hidden_size // b.num_attention_heads
    out = {
        "weights": params * weight_bytes,
        "mask": (1 if shared_mask else rows) * seq * seq * 2,
        "layer_inputs": b.num_hidden_layers * rows * seq * b.hidden_size * 2,
        "one_layer": rows * seq * (2 * b.hidden_size + 2 * kv + 3 * b.intermediate_size) * 2,
        "logits": rows * tokens * cfg.num_codes * (2 + 4 + 4),
    }
    return out | {"total": sum(out.values()), "sequence": seq}


def _meta_model(cfg: NextScaleConfig) -> NextScaleLM:
    with torch.device("meta"):
        return NextScaleLM(cfg)


def qwen7b_config(px: int = 1024, num_codes: int = 16384, code_dim: int = 32) -> NextScaleConfig:
    """The NextFlow-shaped model: Qwen2.5-7B backbone and vocabulary, a 16,384-code image head."""
    return NextScaleConfig(backbone=BackboneConfig(**QWEN7B_BACKBONE), schedule=schedule_for(px),
                           text_vocab_size=152064, num_codes=num_codes, code_dim=code_dim)


def schedule_for(px: int | str) -> Schedule:
    """'tiny' -> the shapes world's 6 scales; 256 / 512 / 1024 -> NextFlow's 12 / 16 / 18 scales."""
    return tiny_schedule() if px == "tiny" else nextflow_schedule(int(px))


def random_model(schedule: Schedule, backbone: dict, num_codes: int = 1024, code_dim: int = 16,
                 text_vocab: int = 64, seed: int = 0) -> NextScaleLM:
    """A randomly initialised NextScaleLM (eval mode) with a slightly sharpened head so sampling is not uniform."""
    torch.manual_seed(seed)
    cfg = NextScaleConfig(backbone=BackboneConfig(**backbone), schedule=schedule, text_vocab_size=text_vocab,
                          num_codes=num_codes, code_dim=code_dim)
    model = NextScaleLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


def random_vq(schedule: Schedule, num_codes: int = 1024, code_dim: int = 16, seed: int = 0):
    """A random multi-scale VQ (16x downsample, narrow channels): the samplers only use its codebook lookup."""
    from policy.tokenizer import MultiScaleVQ, VQConfig

    torch.manual_seed(seed)
    side = schedule[-1][0]
    return MultiScaleVQ(VQConfig(schedule=schedule, image_size=16 * side, channels=[8, 8, 8, 8],
                                 code_dim=code_dim, num_codes=num_codes)).eval()


def world(name: str):
    """(model, vq) of a benchmark world: 'tiny' = the shipped shapes policy, '256' / '512' / '1024' = the small
    random backbone on NextFlow's 12 / 16 / 18-scale schedule."""
    if name == "tiny":
        from policy.io import Policy

        p = Policy.load(TINY_POLICY)
        return p.model.eval(), p.vq.eval()
    sched = schedule_for(name)
    return random_model(sched, SMALL_BACKBONE), random_vq(sched)


def policy_dir(name: str, root: Path) -> Path:
    """A policy directory of a benchmark world (for Ray actors that load one): the shipped one for 'tiny', else a
    random policy with the small backbone on the world's schedule, saved under `root`."""
    if name == "tiny":
        return TINY_POLICY
    from policy.io import PolicyConfig, build_policy

    sched = schedule_for(name)
    vq = {"image_size": 16 * sched[-1][0], "channels": [8, 8, 8, 8], "code_dim": 16, "num_codes": 1024}
    return build_policy(PolicyConfig(schedule=sched, vq=vq, backbone=SMALL_BACKBONE)).save(Path(root) / name)


def start_ray() -> None:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(num_cpus=4, include_dashboard=False, namespace="nextscale", logging_level="WARNING")


def prompts(n: int, length: int = 8, vocab: int = 64, seed: int = 0) -> list[list[int]]:
    """n random prompts of `length` text-token ids (ids 1..vocab-1; 0 is padding)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g).tolist()
