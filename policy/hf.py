"""The policy's model folders as the Hugging Face ecosystem sees them: config classes registered with transformers.

After `import policy`, `AutoConfig.from_pretrained(d)` and `AutoModel.from_pretrained(d)` open a transformer folder
written by `NextScaleLM.save_pretrained` (config.json with `model_type: "nextscale"`), giving a `NextScaleModel`
with the same weights and outputs; `AutoConfig` also opens a tokenizer (`vq/`) folder (`model_type:
"nextscale_vq"`). Only the light config classes are imported here, so `import policy` stays cheap: the model
class (transformers' modeling code) is registered with AutoModel the first time a nextscale config is built,
which `AutoModel.from_pretrained` always does before it looks the class up.
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

MODEL_TYPE, VQ_MODEL_TYPE = "nextscale", "nextscale_vq"


class NextScaleHFConfig(PretrainedConfig):
    """The fields of `policy.transformer.NextScaleConfig`, as transformers reads them from config.json."""
    model_type = MODEL_TYPE
    backbone: dict | None = None
    schedule: list | None = None
    text_vocab_size: int = 0
    num_codes: int = 0
    code_dim: int = 0
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool((self.backbone or {}).get("tie_word_embeddings", False))
        register_model()

    def nextscale_config(self):
        """-> NextScaleConfig (validated: a bad field is an error naming it)."""
        from policy.transformer import NextScaleConfig

        return NextScaleConfig(backbone=self.backbone or {}, schedule=self.schedule,
                               text_vocab_size=self.text_vocab_size, num_codes=self.num_codes,
                               code_dim=self.code_dim, pad_token_id=self.pad_token_id or 0)


class NextScaleVQHFConfig(PretrainedConfig):
    """The tokenizer folder's config.json for transformers (its fields stay as written; no model class)."""
    model_type = VQ_MODEL_TYPE


def register_model() -> None:
    """Register `NextScaleModel` with AutoModel (idempotent)."""
    from transformers import AutoModel

    from policy.transformer import NextScaleModel

    AutoModel.register(NextScaleHFConfig, NextScaleModel, exist_ok=True)


AutoConfig.register(MODEL_TYPE, NextScaleHFConfig, exist_ok=True)
AutoConfig.register(VQ_MODEL_TYPE, NextScaleVQHFConfig, exist_ok=True)
