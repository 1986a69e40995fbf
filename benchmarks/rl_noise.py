"""Signal or noise? The prefix-GRPO update on the shipped policy with real, shuffled and negated advantages.

    .venv/bin/python benchmarks/rl_noise.py [--steps 80] [--lr 1e-4] [--arms real,shuffled,negated,positive]
                                            [--lora R] [--beta B] [--cfg W] [--optimizer adam|sgd] [--m M]
                                            [--reward strict|demo] [--eval] [--tag NAME]
                                            [--split train|heldout] [--prompt TEXT ...] [--probe TEXT ...]
                                            [--score conditional|guided]
    .venv/bin/python benchmarks/rl_noise.py --pool TAG [TAG ...]     # pooled held-out change of --eval runs

A Ray-free loop over the same pure pieces the learner actor runs (policy.sampler.sample, the strict verifier,
rl.grpo.group_advantages, rl.update.micro_step): P prompts x G samples per step from the training stream
(balanced by category), one optimiser step per batch (on-policy: the first-pass ratio is 1). Every arm starts
from the shipped policy and sees the same prompts and sampling seeds; only the advantages differ:
- real: the group-normalised advantages;
- shuffled: the same values permuted across the batch (noise of the same size; zero-mean over the batch, not
  per group);
- negated: -real (the update pushes the reward down);
- positive: max(real, 0) (only the better-than-average samples are pushed up: filtered self-imitation; not
  centred, so with guided rollouts it also pulls the policy towards its own guided samples).
If "real" falls like "shuffled", the update's noise outweighs its signal at this learning rate and batch size.
`--reward demo` trains on the demo's reward (exclusive strict + 0.25 x exclusive partial credit) instead of the
strict verdict; the windows always show the strict verdict. `--eval` scores each arm's final policy on the fixed
held-out set (policy.evaluate: 480 images) against the shipped policy on the same (prompt, seed) pairs.
`--score guided` makes the loss score the CFG-guided distribution the rollouts sample (loss.score: guided).
`--split heldout` trains on the held-out prompts themselves (no transfer needed: the evaluation's own prompts);
`--prompt TEXT` (repeatable) trains on only these prompts; `--probe TEXT` (repeatable) samples 128 images of each
probe prompt from the starting and from each arm's final policy (same seeds; at the rollout settings and at the
evaluation's, CFG 3) and reports the paired change: does what one prompt learns carry to its neighbours?
Writes benchmarks/results/rl_noise[_TAG].{json,md,png}: the training reward per step of each arm, the KL to the
starting policy (k3, per token, when --beta > 0) and the held-out change.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from common import OUT, ROOT, TINY_POLICY, write_result
from core.config import load_config
from core.settings import LoraSettings, SampleConfig
from policy.evaluate import EvalConfig, evaluate, paired_difference, wilson_interval
from policy.images import to_uint8
from policy.io import Policy
from policy.optim import configure_optimizers
from policy.sampler import sample
from policy.weights import apply_lora
from rewards.base import Batch
from rewards.builtin import shapes_metadata
from rewards.combine import CombinedReward
from rewards.config import RewardEntry
from rl.config import GRPOLossConfig, PromptsConfig, RunConfig
from rl.grpo import group_advantages
from rl.prompts import load_prompts, prompts_at
from rl.update import PrefixScorer, TrainBatch, learner_old_logprobs, loss_guidance, micro_step, prefix_of
from shapes.verifier import score
from shapes.world import Spec, caption

ARMS = ("real", "shuffled", "negated", "positive")
DEMO_CONFIG = ROOT / "configs" / "shapes-tiny.yaml"


def arm_advantages(adv: torch.Tensor, arm: str, gen: torch.Generator) -> torch.Tensor:
    """(B,) advantages of an arm: real, shuffled (a seeded permutation of the same values), negated or positive."""
    if arm not in ARMS:
        raise ValueError(f"arms: {arm!r} is not one of {ARMS}")
    if arm == "shuffled":
        return adv[torch.randperm(len(adv), generator=gen)]
    return {"real": adv, "negated": -adv, "positive": adv.clamp(min=0)}[arm]


def world_prompts(prompts: list[str], field: str) -> list[tuple[str, dict]]:
    """(prompt, metadata) of these prompts, from any split; an unknown one is a one-line error naming `field`."""
    known = dict(load_prompts(PromptsConfig(split="all")))
    missing = [p for p in prompts if p not in known]
    if missing:
        raise ValueError(f"{field}: {missing[0]!r} is not a prompt of the shapes world")
    return [(p, known[p]) for p in prompts]


def training_prompts(args) -> list[tuple[str, dict]]:
    """The training stream's items: the --split's prompts, or only the --prompt ones (looked up in every split)."""
    return world_prompts(args.prompt, "prompt") if args.prompt else load_prompts(PromptsConfig(split=args.split))


def loss_config(args) -> GRPOLossConfig:
    return GRPOLossConfig(beta=args.beta, score=args.score)


def setup(args) -> tuple:
    """The shipped policy (LoRA on request), its scorer, a frozen reference scorer (beta > 0) and the optimiser."""
    policy = Policy.load(TINY_POLICY)
    model = policy.model
    if args.lora:
        model = apply_lora(model, LoraSettings(r=args.lora, alpha=2.0 * args.lora))
    guidance = loss_guidance(loss_config(args), rollout_settings(args), model.schedule, args.m)
    scorer = PrefixScorer(model, policy.vq, args.m, guidance)
    ref = PrefixScorer(copy.deepcopy(model).eval(), policy.vq, args.m, guidance) if args.beta else None
    opt = (configure_optimizers(scorer, args.lr) if args.optimizer == "adam"
           else torch.optim.SGD([p for p in scorer.parameters() if p.requires_grad], lr=args.lr))
    return policy, scorer, ref, opt


def strict_verdicts(images: np.ndarray, specs: list[Spec]) -> torch.Tensor:
    """(B,) 0/1: the strict verifier's verdict of each image (the held-out metric's check)."""
    return torch.tensor([float(score(img, spec)["all"]) for img, spec in zip(images, specs)])


def reward_fn(kind: str) -> Callable[[np.ndarray, list[Spec]], torch.Tensor]:
    """(images, specs) -> (B,) rewards the update sees: the strict verdict, or the demo's own reward (the rewards
    section of configs/shapes-tiny.yaml run in-process by rewards.combine.CombinedReward, as its Serve replica
    does: exclusive strict + 0.25 x exclusive partial credit), or ("objects") the demo's plus 0.5 x the per-object
    credit (shapes.verifier.object_credit, exclusive)."""
    if kind == "strict":
        return strict_verdicts
    entries = load_config(RunConfig, DEMO_CONFIG, context={"check_paths": False}).rewards.rewards
    if kind == "objects":  # + 0.5 x per-object credit: one of two objects right earns a share
        entries = [*entries, RewardEntry(name="verifier", weight=0.5, label="objects",
                                         kwargs={"mode": "objects", "exclusive": True})]
    combined = CombinedReward(entries)
    return lambda images, specs: torch.from_numpy(
        combined(Batch(images, [caption(s) for s in specs], shapes_metadata(specs))).total)


def rollout(policy: Policy, scorer: PrefixScorer, items: list, step: int, args, reward) -> tuple:
    """One step's P x G samples (seeded by step): the train batch without advantages, the strict verdicts and the
    training rewards (`reward`, see reward_fn)."""
    picked = prompts_at(items, 0, step * args.prompts, args.prompts, balance="category")
    text = [ids for ids in policy.encode_prompts([p for p, _ in picked]) for _ in range(args.group)]
    seeds = [args.seed * 10_000_000 + step * 100_000 + i for i in range(len(text))]  # seed 0: as before
    scorer.model.eval()
    with torch.no_grad():
        out = sample(scorer.model, policy.vq, text, seeds, rollout_settings(args), m=args.m)
    images = to_uint8(out.images)
    specs = [Spec.from_json(meta["spec"]) for _, meta in picked for _ in range(args.group)]
    strict = strict_verdicts(images, specs)
    return text, out, strict, strict if args.reward == "strict" else reward(images, specs)


def rollout_settings(args) -> SampleConfig:
    return SampleConfig(cfg_scale=args.cfg, guidance_schedule="linear", top_k=args.top_k, top_p=args.top_p)


def run_arm(arm: str, items: list, args) -> dict:
    """Train one arm for args.steps steps; its reward per step (mean over P x G) and the update's metrics."""
    torch.manual_seed(args.seed)
    policy, scorer, ref_scorer, opt = setup(args)
    prefix, loss_cfg = prefix_of(policy.model.schedule, args.m, args.alpha), loss_config(args)
    gen, reward = torch.Generator().manual_seed(args.seed), reward_fn(args.reward)
    before = held_out(policy, "before") if args.eval else None
    probes_before = probe(policy, scorer.model, args) if args.probe else None
    rewards, kls, curve = [], [], []
    for step in tqdm(range(args.steps), desc=arm, leave=False):
        text, out, strict, r = rollout(policy, scorer, items, step, args, reward)
        adv = group_advantages(r.view(args.prompts, args.group), not args.no_std).reshape(-1)
        adv = arm_advantages(adv, arm, gen)
        batch = TrainBatch(text, list(out.codes[: args.m]), out.logprobs.float(), adv.float())
        if scorer.guidance is not None:  # the rollouts log conditional log-probs; the loss scores the guided ones
            batch = learner_old_logprobs(scorer, batch)[0]
        ref = ref_scorer(batch.text_ids, batch.codes)[0].detach() if ref_scorer is not None else None
        scorer.model.train()
        opt.zero_grad()
        loss, metrics = micro_step(scorer, batch, prefix, loss_cfg, ref, first_pass=True)
        loss.backward()
        opt.step()
        rewards.append(strict.tolist())
        kls.append(metrics.get("kl_ref", float("nan")))
        if args.eval and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            scorer.model.eval()
            curve.append({"step": step + 1, **held_out_change(before, held_out(policy, f"step {step + 1}"))})
    scorer.model.eval()
    after = held_out(policy, "after") if args.eval else None
    probes = probe_change(probes_before, probe(policy, scorer.model, args)) if args.probe else {}
    curve += [{"step": args.steps, **held_out_change(before, after)}] if curve else []
    return {"arm": arm, "rewards": rewards, "kl_ref": kls, **held_out_change(before, after), **probes,
            **({"curve": [{k: c[k] for k in ("step", "held_out", "paired")} for c in curve]} if curve else {})}


PROBE_IMAGES = 128


def probe(policy: Policy, model: torch.nn.Module, args) -> dict[str, dict[str, list[float]]]:
    """{probe prompt: {"rollout" | "eval": strict verdicts of PROBE_IMAGES images}}: the same seeds every call, at
    the rollout's sampling settings and at the held-out evaluation's (EvalConfig: CFG 3, top-k 32, top-p 0.95;
    sampled once when they are the same)."""
    rollout_cfg, eval_cfg = rollout_settings(args), EvalConfig().sample
    seeds = [777_000 + i for i in range(PROBE_IMAGES)]
    out: dict[str, dict[str, list[float]]] = {}
    model.eval()
    for p, meta in world_prompts(args.probe, "probe"):
        text, specs = policy.encode_prompts([p]) * PROBE_IMAGES, [Spec.from_json(meta["spec"])] * PROBE_IMAGES
        with torch.no_grad():
            verdicts = lambda cfg: strict_verdicts(  # noqa: E731
                to_uint8(sample(model, policy.vq, text, seeds, cfg).images), specs).tolist()
            at_rollout = verdicts(rollout_cfg)
            out[p] = {"rollout": at_rollout, "eval": at_rollout if eval_cfg == rollout_cfg else verdicts(eval_cfg)}
    return out


def probe_change(before: dict, after: dict) -> dict:
    """{"probes": {prompt: {setting: [rate before, rate after, paired change]}}} of two probe() results."""
    return {"probes": {p: {k: [float(np.mean(before[p][k])), float(np.mean(after[p][k])),
                               paired_difference(before[p][k], after[p][k])] for k in before[p]} for p in before}}


def held_out(policy: Policy, desc: str) -> list[dict]:
    """Per-image verdicts of the policy on the fixed held-out set (policy.evaluate's 480 images)."""
    return evaluate(policy, EvalConfig(), desc=desc)[2]


def held_out_change(before: list[dict] | None, after: list[dict] | None) -> dict:
    """Held-out strict rate before and after, and the paired change (same prompt and seed per image)."""
    if before is None:
        return {}
    b, a = [r["strict"] for r in before], [r["strict"] for r in after]
    return {"held_out": [float(np.mean(b)), float(np.mean(a))], "paired": paired_difference(b, a),
            "held_out_strict": {"before": b, "after": a},
            "template_paired": paired_difference([r["template"] for r in before], [r["template"] for r in after])}


def pooled_change(tags: list[str]) -> dict:
    """The paired held-out change of the first arm of several --eval runs (results/rl_noise_TAG.json), pooled over
    all their images: paired_difference on the concatenated per-image strict verdicts."""
    runs = [json.loads((OUT / f"rl_noise_{t}.json").read_text())["results"][0] for t in tags]
    if any("held_out_strict" not in r for r in runs):
        raise ValueError(f"pool: every run needs per-image verdicts (an --eval run); tags {tags}")
    return paired_difference([x for r in runs for x in r["held_out_strict"]["before"]],
                             [x for r in runs for x in r["held_out_strict"]["after"]])


def window(rewards: list[list[float]], lo: int, hi: int) -> tuple[float, float, float]:
    """Pooled strict reward of steps lo..hi-1 with its 95% Wilson interval (the samples are 0/1)."""
    xs = [x for step in rewards[lo:hi] for x in step]
    k = int(round(sum(xs)))
    return (k / len(xs), *wilson_interval(k, len(xs)))


def table(results: list[dict], args) -> str:
    w = max(1, min(args.window, args.steps // 2))  # one step at least (a 1-step run: both windows are that step)
    lines = [f"Ray-free prefix-GRPO on the shipped policy: {args.steps} steps of {args.prompts} prompts x G = "
             f"{args.group}, {args.optimizer} lr {args.lr:g}, m = {args.m}, CFG {args.cfg:g}, {args.reward} reward"
             + (", the loss scores the guided distribution" if args.score == "guided" else "")
             + (", advantages not divided by the group's std" if args.no_std else "")
             + (f", LoRA r = {args.lora}" if args.lora else "") + (f", KL beta {args.beta:g}" if args.beta else "")
             + f"; training strict reward (95% Wilson) over the first and last {w} steps "
             f"({w * args.prompts * args.group} samples each); KL to the starting policy per token (k3) after the "
             f"first update and at the last step"
             + ("; held-out strict (480 images) before -> after, paired change (95%)" if args.eval else "") + ".", "",
             "| advantages | first steps | last steps | change | KL after 1 step | KL at the end |"
             + (" held-out | paired change | template judge |" if args.eval else ""),
             "|---|---|---|---|---|---|" + ("---|---|---|" if args.eval else "")]
    for res in results:
        a, b = window(res["rewards"], 0, w), window(res["rewards"], args.steps - w, args.steps)
        kl = res["kl_ref"]
        row = (f"| {res['arm']} | {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] | {b[0]:.3f} [{b[1]:.3f}, {b[2]:.3f}] "
               f"| {b[0] - a[0]:+.3f} | {kl[min(1, len(kl) - 1)]:.3g} | {kl[-1]:.3g} |")
        if "paired" in res:
            p, t = res["paired"], res["template_paired"]
            row += (f" {res['held_out'][0]:.3f} -> {res['held_out'][1]:.3f} | {p['diff']:+.3f} [{p['ci'][0]:+.3f}, "
                    f"{p['ci'][1]:+.3f}] | {t['diff']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}] |")
        lines.append(row)
    return "\n".join(lines) + "\n" + probe_table(results) + curve_table(results)


def curve_table(results: list[dict]) -> str:
    """--eval-every: the held-out strict rate and its paired change (95%) against the start, every N steps."""
    if not any("curve" in r for r in results):
        return ""
    lines = ["", "Held-out strict during training (480 images, the same pairs as before training):", "",
             "| advantages | step | held-out | paired change |", "|---|---|---|---|"]
    for res in results:
        for c in res.get("curve", []):
            p = c["paired"]
            lines.append(f"| {res['arm']} | {c['step']} | {c['held_out'][1]:.3f} | {p['diff']:+.3f} "
                         f"[{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] |")
    return "\n".join(lines) + "\n"


def probe_table(results: list[dict]) -> str:
    """The probes' strict rate before -> after and paired change, per arm, at the rollout and evaluation settings."""
    if not any("probes" in r for r in results):
        return ""
    lines = ["", f"Probes ({PROBE_IMAGES} images each, same seeds before and after; strict rate, paired change 95%):",
             "", "| advantages | probe prompt | at the rollout settings | at the evaluation's (CFG 3) |",
             "|---|---|---|---|"]
    for res in results:
        for p, d in res.get("probes", {}).items():
            cells = [f"{b:.3f} -> {a:.3f}, {c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
                     for b, a, c in (d["rollout"], d["eval"])]
            lines.append(f"| {res['arm']} | {p} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = any("curve" in r for r in results)
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(12 if curves else 7, 4), squeeze=False)
    for res in results:
        means = [float(np.mean(r)) for r in res["rewards"]]
        smooth = [float(np.mean(means[max(0, i - 9): i + 1])) for i in range(len(means))]
        axes[0, 0].plot(smooth, label=res["arm"])
        if "curve" in res:
            steps = [0] + [c["step"] for c in res["curve"]]
            axes[0, 1].errorbar(steps, [res["held_out"][0]] + [c["held_out"][1] for c in res["curve"]],
                                yerr=[0] + [(c["paired"]["ci"][1] - c["paired"]["ci"][0]) / 2 for c in res["curve"]],
                                marker="o", capsize=3, label=res["arm"])
    axes[0, 0].set(xlabel="step", ylabel="training strict reward (10-step mean)", title="signal or noise")
    axes[0, 0].legend()
    if curves:
        axes[0, 1].set(xlabel="step", ylabel="held-out strict (480 images; bar: paired 95%)", title="held-out")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--arms", default="real,shuffled,negated")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: all weights)")
    ap.add_argument("--beta", type=float, default=0.0, help="KL weight towards the starting policy")
    ap.add_argument("--cfg", type=float, default=3.0, help="rollout guidance (linear schedule); 1: on-policy")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--score", choices=["conditional", "guided"], default="conditional",
                    help="loss.score: the policy the loss scores (guided: the CFG distribution the rollouts sample)")
    ap.add_argument("--no-std", action="store_true", help="normalize_std=false: advantages centred, not divided by "
                                                          "the group's std (Dr. GRPO)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="seeds the rollouts (a new sample stream) and the shuffles")
    ap.add_argument("--reward", choices=["strict", "demo", "objects"], default="strict",
                    help="strict verdict; the demo's exclusive strict + 0.25 x partial credit; objects: the demo's + "
                         "0.5 x per-object credit (exclusive)")
    ap.add_argument("--eval", action="store_true", help="paired held-out evaluation of each arm's final policy")
    ap.add_argument("--eval-every", type=int, default=0, help="with --eval: also score the held-out set every N steps")
    ap.add_argument("--window", type=int, default=10, help="steps pooled at the start and at the end")
    ap.add_argument("--tag", default="")
    ap.add_argument("--split", choices=["train", "heldout"], default="train", help="the prompts trained on")
    ap.add_argument("--prompt", action="append", help="train on only this prompt (repeatable)")
    ap.add_argument("--probe", action="append", help="after training, score this prompt (repeatable)")
    ap.add_argument("--pool", nargs="+", metavar="TAG", help="only pool the held-out change of these --eval runs")
    args = ap.parse_args()
    if args.pool:
        d = pooled_change(args.pool)
        print(f"pooled held-out change over {d['n']} pairs: {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] "
              f"(gained {d['gained']}, lost {d['lost']})")
        return
    items = training_prompts(args)
    results = [run_arm(arm, items, args) for arm in args.arms.split(",")]
    name = "rl_noise" + (f"_{args.tag}" if args.tag else "")
    write_result(name, {"args": vars(args), "results": results}, table(results, args))
    plot(results, OUT / f"{name}.png")


if __name__ == "__main__":
    main()
