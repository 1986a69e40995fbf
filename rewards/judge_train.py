"""Stage: train the tiny vision-language judge (`rewards/judge_model.py`) to answer yes/no about shapes scenes.

    python -m rewards.judge_train configs/stages/shapes-judge.yaml [key=value ...]

A Ray Train job like the other stages (`policy/stages/common.py`). Each example is a rendered scene of a training
prompt and a question `question_template.format(prompt=...)` about it: half the time its own caption (answer
"yes"), half the time the caption of `conflicting_spec` (one attribute changed: shape, colour, count or relation;
answer "no"). The loss is the cross-entropy of the answer token after the question over the whole vocabulary
(so a served judge's top log-probabilities hold "yes" and "no") plus the caption's language-modelling loss on the
true examples. The first `caption_steps` train the caption loss alone: in trials, a judge that could already
describe a scene learned the yes/no answer within 50 steps; one that could not stayed at chance (README). At every checkpoint rank 0
measures the yes/no accuracy on held-out prompts (never trained on), half true and half conflicting, fixed seed.

The artefact is a HF folder (`Blip2ForConditionalGeneration` + processor + word-level tokenizer) that
`vllm.LLM` loads as the `vlm_judge` reward's `model`.
"""
from __future__ import annotations

import random
import sys

import numpy as np
import torch
from pydantic import Field

from policy.optim import configure_optimizers
from policy.stages.common import StageConfig, device_of, main, sample_specs, step_rng, train_steps, world
from rewards.judge_model import (DEFAULT_TEMPLATE, QUERY_TOKENS, build_config, build_processor, init_judge,
                                 save_judge)
from shapes.world import Spec, caption, conflicting_spec, render, split_prompts


class JudgeStageConfig(StageConfig):
    question_template: str = Field(DEFAULT_TEMPLATE, description="the question; {prompt} is the caption asked about")
    text_hidden: int = Field(128, description="OPT text model width (a multiple of 32: vLLM's CPU head_dim)")
    text_layers: int = Field(2, description="OPT text model layers")
    vision_hidden: int = Field(64, description="vision tower and Q-Former width (a multiple of 32)")
    vision_layers: int = Field(2, description="vision tower layers")
    caption_steps: int = Field(500, ge=0, description="first steps: the caption loss alone (without it first, the "
                                                       "yes/no answer stayed at chance in trials)")
    caption_weight: float = Field(1.0, description="weight of the caption language-modelling loss on true examples")
    heldout_examples: int = Field(400, description="held-out yes/no questions scored at every checkpoint")


def judge_examples(rng: random.Random, specs: list[Spec], template: str, allowed: set[Spec] | None = None,
                   negatives: bool = True) -> tuple[np.ndarray, list[str], list[int]]:
    """Scenes of `specs`, each asked about its own caption (label 1) or a conflicting one (label 0), alternately
    (`negatives=False`: always its own caption).

    `allowed`: the conflicting captions come from this set too (training: the training prompts), else the judge
    learns that an unfamiliar caption means "no" and answers "no" to every held-out prompt."""
    images, questions, labels = [], [], []
    for i, spec in enumerate(specs):
        images.append(render(spec, rng))
        asked = spec
        if negatives and i % 2:
            asked = next((c for c in (conflicting_spec(spec, rng) for _ in range(50)) if allowed is None or
                          c in allowed), conflicting_spec(spec, rng))
        questions.append(template.format(prompt=caption(asked)))
        labels.append(int(asked == spec))
    return np.stack(images), questions, labels


def judge_forward(model, processor, images: np.ndarray, questions: list[str]):
    """(logits (B, L, V), input_ids (B, L), mask (B, L), last (B,)): `last` indexes each question's final token,
    whose logits predict the answer, as vLLM computes a one-token answer."""
    batch = processor(images=list(images), text=questions, return_tensors="pt", padding=True).to(device_of(model))
    logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"]
    last = mask.sum(1) - 1 if processor.tokenizer.padding_side == "right" else \
        torch.full((len(questions),), mask.shape[1] - 1, device=mask.device)
    return logits, batch["input_ids"], mask, last


def answer_logits(model, processor, images: np.ndarray, questions: list[str]) -> torch.Tensor:
    """(B, V) logits of the token after each question (the answer)."""
    logits, _, _, last = judge_forward(model, processor, images, questions)
    return logits[torch.arange(len(questions)), last]


def caption_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the question text of `rows` (true captions only): the image-grounded language
    modelling of BLIP-2's pre-training, a denser signal than the one yes/no bit. The image tokens and padding are
    not targets."""
    start = QUERY_TOKENS  # the image's query tokens come first
    pred, target = logits[:, start:-1], ids[:, start + 1:]
    keep = mask[:, start + 1:].bool() & rows[:, None]
    return torch.nn.functional.cross_entropy(pred[keep], target[keep]) if keep.any() else logits.sum() * 0


def yes_no_ids(processor) -> torch.Tensor:
    """Token ids of the answers [no, yes] (index = label)."""
    return torch.tensor(processor.tokenizer.convert_tokens_to_ids(["no", "yes"]))


@torch.no_grad()
def heldout_accuracy(model, processor, template: str, n: int, seed: int = 1234, batch: int = 50) -> float:
    """Fraction of n held-out questions (half true, half conflicting) where P(yes) > P(no) matches the truth."""
    rng, ids, hits = random.Random(f"judge-heldout/{seed}"), yes_no_ids(processor), 0
    was_training = model.training
    model.eval()
    for start in range(0, n, batch):
        images, questions, labels = judge_examples(rng, sample_specs(rng, min(batch, n - start), split="heldout"),
                                                   template)
        pick = answer_logits(model, processor, images, questions)[:, ids].argmax(1)
        hits += int((pick.cpu() == torch.tensor(labels)).sum())
    model.train(was_training)
    return hits / n


def train_fn(config: dict) -> None:
    cfg = JudgeStageConfig(**config)
    rank, _ = world()
    processor = build_processor()
    model = init_judge(build_config(len(processor.tokenizer), cfg.text_hidden, cfg.text_layers, cfg.vision_hidden,
                                    cfg.vision_layers), cfg.seed).train()
    opt = configure_optimizers(model, cfg.lr, weight_decay=cfg.weight_decay)
    train = set(split_prompts().train)

    def step_fn(step: int):
        rng = step_rng(cfg.seed, step, rank)
        captions_only = step < cfg.caption_steps
        images, questions, labels = judge_examples(rng, sample_specs(rng, cfg.batch_size), cfg.question_template,
                                                   train, negatives=not captions_only)
        full, input_ids, mask, last = judge_forward(model, processor, images, questions)
        labels, ids = torch.tensor(labels, device=full.device), yes_no_ids(processor).to(full.device)
        logits = full[torch.arange(len(labels), device=full.device), last]
        answer = torch.nn.functional.cross_entropy(logits, ids[labels])
        lm = caption_loss(full, input_ids, mask, labels.bool())
        loss = lm if captions_only else answer + cfg.caption_weight * lm
        metrics = {"acc": (logits[:, ids].argmax(1) == labels).float().mean(), "answer_loss": answer.detach(),
                   "caption_loss": lm.detach()}
        done = step + 1
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            metrics["heldout_acc"] = heldout_accuracy(model, processor, cfg.question_template, cfg.heldout_examples)
        return loss, metrics

    train_steps(cfg, {"judge": model}, opt, step_fn,
                export=lambda d: save_judge(model, processor, d, cfg.question_template))


if __name__ == "__main__":
    sys.exit(main(JudgeStageConfig, train_fn, sys.argv[1:]))
