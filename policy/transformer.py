"""The next-scale transformer: a Qwen2-family decoder (transformers' Qwen2.5-VL text model) with image inputs.

Vocabulary (one shared output head):   [text tokens | image codes | <boi> <eoi>]
                                        0 .. T-1      T .. T+V-1    T+V  T+V+1
Inputs at scale s >= 2 are the residual code features of scale s-1 upsampled to (h_s, w_s), projected to the
hidden size, plus a learnable scale embedding. Attention is block-causal and positions are multiscale 3D RoPE
(see policy/sequence.py). A Hugging Face Qwen2 / Qwen2.5 checkpoint initialises the backbone (`from_qwen2`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, Qwen2_5_VLTextModel

from policy.hf import MODEL_TYPE, NextScaleHFConfig
from policy.io import MAX_SHARD_SIZE
from policy.scales import Schedule, ScheduleField


class BackboneConfig(BaseModel):
    """The Qwen2 hyper-parameters we use (names as in transformers' Qwen2Config)."""
    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(128, description="model width")
    intermediate_size: int = Field(352, description="MLP width")
    num_hidden_layers: int = Field(4, description="decoder layers")
    num_attention_heads: int = Field(4, description="query heads")
    num_key_value_heads: int = Field(2, description="key/value heads (grouped-query attention)")
    rope_theta: float = Field(10000.0, description="RoPE base")
    rms_norm_eps: float = Field(1e-6, description="RMSNorm epsilon")
    tie_word_embeddings: bool = Field(False, description="share the input embedding and the output head")
    max_position_embeddings: int = Field(32768, description="longest position the RoPE tables cover")
    attn_implementation: str = Field("sdpa", description="transformers attention kernel (sdpa, eager, ...)")
    rope_interleave: bool = Field(False, description="deal the rotary frequencies round-robin over (scale, y, x) "
                                                     "(interleaved_inv_freq); off: Qwen2.5-VL's contiguous split, "
                                                     "which leaves x only the lowest frequencies")


class NextScaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backbone: BackboneConfig = BackboneConfig()
    schedule: ScheduleField
    text_vocab_size: int
    num_codes: int
    code_dim: int
    pad_token_id: int = 0

    @property
    def image_offset(self) -> int:
        return self.text_vocab_size

    @property
    def boi_id(self) -> int:
        return self.text_vocab_size + self.num_codes

    @property
    def vocab_size(self) -> int:
        return self.boi_id + 2  # <boi> and <eoi>


def mrope_section(head_dim: int) -> list[int]:
    """Split of the head_dim/2 rotary frequencies over (scale, y, x); Qwen2.5-VL's [16, 24, 24] at head_dim 128."""
    half = head_dim // 2
    hw = 3 * half // 8
    return [half - 2 * hw, hw, hw]


def interleaved_order(section: list[int]) -> list[int]:
    """Indices into RoPE frequencies sorted highest first, so that axis a's block (sizes `section`) gets every
    third one: the frequencies are dealt round-robin to the axes that still have room."""
    shares: list[list[int]] = [[] for _ in section]
    axis = 0
    for rank in range(sum(section)):
        while len(shares[axis]) == section[axis]:
            axis = (axis + 1) % len(section)
        shares[axis].append(rank)
        axis = (axis + 1) % len(section)
    return [rank for share in shares for rank in share]


def interleaved_inv_freq(inv_freq: torch.Tensor, section: list[int]) -> torch.Tensor:
    """Default RoPE frequencies (highest first) reordered by `interleaved_order`.

    Qwen2.5-VL's rotary embedding gives axis a the frequencies in block a of `inv_freq` (sizes `section`); in the
    default order the last axis (x) gets only the lowest ones, and on an 8-wide grid its positions turn by under
    0.03 rad: the model cannot tell columns apart. Reads no values, so it also works on the meta device.
    """
    return inv_freq[torch.tensor(interleaved_order(section), device=inv_freq.device)]


class InterleavedRotaryEmbedding(Qwen2_5_VLRotaryEmbedding):
    """Qwen2.5-VL's multimodal rotary embedding with `interleaved_inv_freq`. The order lives in the frequency
    function itself, so transformers' own re-initialisation of the buffer (AutoModel.from_pretrained) keeps it."""

    @staticmethod
    def compute_default_rope_parameters(config, *args, **kwargs) -> tuple[torch.Tensor, float]:
        inv_freq, scaling = Qwen2_5_VLRotaryEmbedding.compute_default_rope_parameters(config, *args, **kwargs)
        return interleaved_inv_freq(inv_freq, config.rope_parameters["mrope_section"]), scaling


def text_config(cfg: NextScaleConfig) -> Qwen2_5_VLTextConfig:
    b = cfg.backbone
    head_dim = b.hidden_size // b.num_attention_heads
    tc = Qwen2_5_VLTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_hidden_layers=b.num_hidden_layers,
        num_attention_heads=b.num_attention_heads,
        num_key_value_heads=b.num_key_value_heads,
        rms_norm_eps=b.rms_norm_eps,
        max_position_embeddings=b.max_position_embeddings,
        pad_token_id=cfg.pad_token_id, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": b.rope_theta, "mrope_section": mrope_section(head_dim)},
    )
    tc._attn_implementation = b.attn_implementation
    return tc


class NextScaleBody:
    """The modules and forward of the next-scale transformer. Two classes share them, with the same state-dict keys:
    `NextScaleLM` (a plain nn.Module: what the platform trains, samples and wraps with PEFT / DeepSpeed) and
    `NextScaleModel` (a transformers PreTrainedModel: what `AutoModel.from_pretrained(dir)` returns)."""

    def _build(self, cfg: NextScaleConfig) -> None:
        self.cfg = cfg
        self.schedule: Schedule = [tuple(s) for s in cfg.schedule]
        self.text_config = text_config(cfg)
        hidden = cfg.backbone.hidden_size
        self.backbone = Qwen2_5_VLTextModel(self.text_config)
        if cfg.backbone.rope_interleave:  # no weights: the frequencies are a non-persistent buffer
            self.backbone.rotary_emb = InterleavedRotaryEmbedding(self.text_config)
        self.lm_head = nn.Linear(hidden, cfg.vocab_size, bias=False)
        if cfg.backbone.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embed_tokens.weight
        self.in_proj = nn.Linear(cfg.code_dim, hidden)
        self.scale_embed = nn.Embedding(len(self.schedule), hidden)
        nn.init.normal_(self.scale_embed.weight, std=0.02)

    # ------------------------------------------------------------------ embeddings and heads
    def text_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed_tokens(ids)

    def boi_embeds(self, batch: int) -> torch.Tensor:  # (B, 1, D)
        ids = torch.full((batch, 1), self.cfg.boi_id, dtype=torch.long, device=self.lm_head.weight.device)
        return self.backbone.embed_tokens(ids)

    def image_embeds(self, feats: torch.Tensor, scale: int) -> torch.Tensor:
        """(B, n_s, code_dim) residual code features for scale `scale` (1-based) -> (B, n_s, D)."""
        return self.in_proj(feats) + self.scale_embed.weight[scale - 1]

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, V_img): the shared head restricted to the image-code rows."""
        lo = self.cfg.image_offset
        return nn.functional.linear(hidden, self.lm_head.weight[lo : lo + self.cfg.num_codes])

    def forward(self, embeds, mask, positions, cache=None) -> torch.Tensor:
        """Backbone over (B, L, D) embeddings with a 4-D additive mask and (3, B, L) positions -> hidden (B, L, D)."""
        out = self.backbone(
            inputs_embeds=embeds, attention_mask=mask.to(embeds.dtype), position_ids=positions,
            cache=cache, use_cache=cache is not None,
        )
        return out.last_hidden_state


class NextScaleLM(NextScaleBody, nn.Module):
    def __init__(self, cfg: NextScaleConfig):
        super().__init__()
        self._build(cfg)

    # ------------------------------------------------------------------ weight I/O
    def save_pretrained(self, path: str | Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
        """A folder transformers can open: config.json (with model_type) + safetensors, sharded above the size."""
        from policy.io import hf_config_dict, save_model_folder

        state = dict(self.state_dict())
        if self.cfg.backbone.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_model_folder(path, hf_config_dict(MODEL_TYPE, NextScaleModel.__name__, self.cfg), state, max_shard_size)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "NextScaleLM":
        """Strict load of a folder from `save_pretrained` (with or without model_type, one file or shards)."""
        from policy.io import load_state_strict, read_json_config

        path = Path(path)
        model = cls(read_json_config(path / "config.json", NextScaleConfig, model_type=MODEL_TYPE))
        ignore = {"lm_head.weight"} if model.cfg.backbone.tie_word_embeddings else set()
        load_state_strict(model, path, ignore_missing=ignore)
        return model.eval()

    @classmethod
    def from_qwen2(cls, path: str | Path, schedule: Schedule, num_codes: int, code_dim: int) -> "NextScaleLM":
        """Initialise from a Hugging Face Qwen2 / Qwen2.5 causal-LM directory, expanding the vocabulary."""
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_cfg = AutoConfig.from_pretrained(path)
        hf_cfg = getattr(hf_cfg, "text_config", hf_cfg)
        rope = getattr(hf_cfg, "rope_parameters", None) or {}
        backbone = BackboneConfig(
            hidden_size=hf_cfg.hidden_size, intermediate_size=hf_cfg.intermediate_size,
            num_hidden_layers=hf_cfg.num_hidden_layers, num_attention_heads=hf_cfg.num_attention_heads,
            num_key_value_heads=hf_cfg.num_key_value_heads, rms_norm_eps=hf_cfg.rms_norm_eps,
            rope_theta=rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0)),
            tie_word_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
            max_position_embeddings=hf_cfg.max_position_embeddings,
        )
        cfg = NextScaleConfig(backbone=backbone, schedule=schedule, text_vocab_size=hf_cfg.vocab_size,
                              num_codes=num_codes, code_dim=code_dim, pad_token_id=hf_cfg.pad_token_id or 0)
        model = cls(cfg)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        src = hf.state_dict()
        with torch.no_grad():
            for name, p in model.backbone.named_parameters():
                key = "model." + name
                if name == "embed_tokens.weight":
                    p[: hf_cfg.vocab_size] = src[key]
                else:
                    p.copy_(src[key])
            if not backbone.tie_word_embeddings:
                model.lm_head.weight[: hf_cfg.vocab_size] = src["lm_head.weight"]
        return model


class NextScaleModel(NextScaleBody, PreTrainedModel):
    """NextScaleLM as a transformers PreTrainedModel (registered with AutoModel by `import policy`): the same
    modules, weights and outputs, loaded by transformers' own `from_pretrained`."""
    config_class = NextScaleHFConfig
    _tied_weights_keys = {"lm_head.weight": "backbone.embed_tokens.weight"}  # only when tie_word_embeddings

    def __init__(self, config: NextScaleHFConfig):
        super().__init__(config)
        self._build(config.nextscale_config())
        self.post_init()
