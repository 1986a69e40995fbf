"""A tiny vision-language judge that vLLM serves on a CPU, built from a config: no hub, no torchvision.

Architecture: transformers' `Blip2ForConditionalGeneration` = a BLIP vision tower (64 px, 8 px patches), a 1-layer
Q-Former with 8 query tokens (the image's tokens in the prompt), and an OPT text model (head_dim 32, which vLLM's
CPU attention supports); 0.45 M parameters, 1.8 MB. vLLM serves it as `Blip2ForConditionalGeneration`. Its
processor is `Blip2Processor` with transformers' PIL image processor (`BlipImageProcessorPil`: resize / normalise
in numpy) and a local word-level tokenizer (`tokenizers` WordLevel in `PreTrainedTokenizerFast`) over the shapes
world's words plus the judge's question words. The prompt is the question alone (the processor, and vLLM, put the
8 image tokens in front of it); the answer ("yes" / "no") is the next token. A text-only chat template lets
`vllm.LLM.chat` and an OpenAI-compatible server (`vllm serve`) build the same prompt.

Why BLIP-2: PyPI's torchvision is a CUDA build whose compiled ops do not load beside torch 2.13.0+cpu, so the
judge venv uninstalls it (the Makefile), and transformers then picks its PIL image processors. Without torchvision,
vLLM 0.32's LLaVA, PaliGemma, Gemma 3 and Qwen2-VL paths fail: they import transformers' Pixtral / Gemma 3 / Qwen2-VL
image processors (or `vision.get_vision_encoder_info`, which imports Pixtral's), which import torchvision at module
level. vLLM's BLIP-2 path (and Idefics3's) imports none of it.

    python -m rewards.judge_model OUT_DIR [--seed 0]     # random init (the untrained judge), saved as a HF folder
    python -m rewards.judge_model --ship SRC OUT_DIR     # ship a trained judge (make judge)

Runs in either venv (the main one: transformers 5.24; the judge one: transformers 5.16-5.19); build it with the
judge venv's Python when vLLM will load it, so the saved config is written by the transformers vLLM reads it with.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

IMAGE_TOKEN = "<image>"
PAD, UNK, BOS, EOS, NEWLINE = "<pad>", "<unk>", "<bos>", "<eos>", "\n"
SPECIALS = [PAD, UNK, BOS, EOS, IMAGE_TOKEN]            # ids 0..4
QUESTION_WORDS = ["?", ".", ",", ":", "does", "the", "image", "show", "is", "this", "an", "of", "there", "answer",
                  "yes", "no", "or", "in", "picture", "scene"]
DEFAULT_TEMPLATE = "does the image show {prompt} ? answer yes or no ."
IMAGE_SIZE, PATCH = 64, 8
QUERY_TOKENS = 8                                        # BLIP-2's Q-Former outputs: the image's tokens
# No roles: the prompt is the text of the user's turn; the processor puts the image's query tokens in front of it.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endif %}{% endfor %}"
)


def judge_words() -> list[str]:
    """Every word the judge's tokenizer knows (besides its special tokens)."""
    from shapes.world import vocabulary

    return sorted(set(vocabulary()) | set(QUESTION_WORDS))


def build_tokenizer():
    """Lower-casing word-level tokenizer; punctuation splits off words; `<image>` (id 4) and "\\n" are tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [NEWLINE])}
    for w in judge_words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()          # words and runs of punctuation
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens([AddedToken(NEWLINE, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   eos_token=EOS, extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   chat_template=CHAT_TEMPLATE)
    return fast


def build_processor(tokenizer=None):
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(),
                               num_query_tokens=QUERY_TOKENS, chat_template=CHAT_TEMPLATE)
    return with_image_token(processor)


def with_image_token(processor):
    """transformers 5.x's Blip2Processor.__call__ reads `image_token.content`, but takes the tokenizer's
    `image_token` (a str once saved and loaded): make it the AddedToken it expects."""
    from tokenizers import AddedToken

    if isinstance(processor.image_token, str):
        processor.image_token = AddedToken(processor.image_token, normalized=False, special=True)
    return processor


def load_processor(path: str | Path):
    """The judge's processor from its folder, ready to call."""
    from transformers import AutoProcessor

    return with_image_token(AutoProcessor.from_pretrained(str(path)))


def build_config(vocab_size: int, text_hidden: int = 128, text_layers: int = 2, vision_hidden: int = 64,
                 vision_layers: int = 2):
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                               num_hidden_layers=vision_layers, num_attention_heads=vision_hidden // 32,
                               image_size=IMAGE_SIZE, patch_size=PATCH,
                               initializer_range=0.02)  # BLIP's default 1e-10 starts the tower at ~0: dead, huge grads
    qformer = Blip2QFormerConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=1,
                                 num_attention_heads=vision_hidden // 32, encoder_hidden_size=vision_hidden,
                                 vocab_size=len(SPECIALS), layer_norm_eps=1e-6)  # 1e-12 and zero queries: 1e19 grads
    text = OPTConfig(vocab_size=vocab_size, hidden_size=text_hidden, ffn_dim=2 * text_hidden,
                     num_hidden_layers=text_layers, num_attention_heads=text_hidden // 32,
                     max_position_embeddings=256, word_embed_proj_dim=text_hidden, pad_token_id=0, bos_token_id=2,
                     eos_token_id=3)
    text.architectures = ["OPTForCausalLM"]
    cfg = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                      num_query_tokens=QUERY_TOKENS, image_token_index=SPECIALS.index(IMAGE_TOKEN))
    cfg.architectures = ["Blip2ForConditionalGeneration"]
    return cfg


def build_judge(seed: int = 0):
    """(model, processor): the tiny BLIP-2 judge with random weights (seeded)."""
    processor = build_processor()
    return init_judge(build_config(len(processor.tokenizer)), seed).eval(), processor


def init_judge(config, seed: int = 0):
    """A fresh `Blip2ForConditionalGeneration`; the Q-Former's query tokens drawn N(0, 0.02), as BLIP-2 trains
    them (transformers starts them at zero: the Q-Former's first LayerNorm then sees a constant input)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, config.initializer_range)
    return model


def save_judge(model, processor, out: str | Path, template: str = DEFAULT_TEMPLATE) -> Path:
    """A HF folder that vLLM and transformers load: config + safetensors + tokenizer + processor."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "judge.json").write_text(json.dumps({"question_template": template, "yes": "yes", "no": "no"}))
    return out


SHIP_LIMIT = 20 * 2**20   # issue 13: a shipped judge is at most 20 MB


def ship_judge(src: str | Path, dst: str | Path) -> Path:
    """Copy a trained judge folder (the judge stage's artefact) to `dst` with a README of its stage metrics."""
    import shutil

    from core.atomic import atomic_dir

    src, dst = Path(src), Path(dst)
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    if size > SHIP_LIMIT:
        raise ValueError(f"judge: {src} holds {size / 2**20:.1f} MB, more than the {SHIP_LIMIT // 2**20} MB to ship")
    metrics = json.loads((src / "metrics.json").read_text())
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        (tmp / "README.md").write_text(
            "# The trained tiny shapes judge\n\nA `Blip2ForConditionalGeneration` folder (`rewards/judge_model.py`) "
            "that vLLM serves as the `vlm_judge` reward's `model`; trained by `make judge` (rewards/judge_train.py, "
            f"configs/stages/shapes-judge.yaml). {size / 2**20:.1f} MB.\n\nFinal stage metrics: "
            f"`{json.dumps(metrics)}` (heldout_acc: yes/no accuracy on held-out prompts, half true captions, half "
            "conflicting ones).\n")
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ship", metavar="SRC", help="ship the trained judge folder SRC to OUT instead")
    args = ap.parse_args(argv)
    if args.ship:
        print(f"shipped {ship_judge(args.ship, args.out)}")
        return
    model, processor = build_judge(args.seed)
    path = save_judge(model, processor, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny judge ({n / 1e6:.2f} M parameters) -> {path}")


if __name__ == "__main__":
    main()
