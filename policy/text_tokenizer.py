"""Text tokenizers. Real runs use the backbone's `AutoTokenizer`; the shapes world uses a word-level one.

The word-level tokenizer is built with `tokenizers` and wrapped in transformers' `PreTrainedTokenizerFast`, so it
saves and loads exactly like a Hugging Face tokenizer (`AutoTokenizer.from_pretrained(dir)` works).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, UNK = "[PAD]", "[UNK]"


def train_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace-split word-level tokenizer over `words` (pad id 0, unk id 1)."""
    vocab = {PAD: 0, UNK: 1}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK)


def shapes_tokenizer() -> PreTrainedTokenizerFast:
    from shapes.world import vocabulary

    return train_word_tokenizer(vocabulary())


def load_text_tokenizer(path: str | Path):
    """Any Hugging Face tokenizer directory (the backbone's, or a saved word-level one)."""
    return AutoTokenizer.from_pretrained(str(path))


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids without special tokens (the sequence adds <boi> itself)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
