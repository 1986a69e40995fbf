"""The trainable weights that travel from the learner to the rollout workers (pure: no Ray, no DeepSpeed).

Without LoRA the trainable state is the whole model state dict. With LoRA it is only the adapter tensors
(`...lora_A.default.weight`, `...lora_B.default.weight`): the base weights never change, every worker already has
them from the policy directory.

LoRA uses PEFT's real API, `peft.get_peft_model`, on the plain `NextScaleLM` nn.Module (PEFT's "custom model"
path: no task type). It returns a `peft.PeftModel` that forwards attribute access and `forward` to the wrapped
NextScaleLM, so `policy.sampler.sample` and `policy.scoring.score_prefix` work on it unchanged, and it offers
`disable_adapter()`: the reference model of the KL term is the same model with its adapters switched off.

A rollout worker with LoRA on does, once:        model = apply_lora(policy.model, settings)
and for every new version:                       load_trainable_state(model, state)
`export_policy` writes the trained policy as a plain policy directory (adapters merged).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from core.settings import LoraSettings, QWEN2_LINEARS  # noqa: F401  (re-exported)

LORA_KEY = "lora_"  # every PEFT LoRA tensor name holds it (lora_A, lora_B, lora_embedding_A, ...)


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap `model` (a NextScaleLM) with fresh LoRA adapters; only the adapters stay trainable.

    The adapters start as an identity (PEFT initialises lora_B to zero), so the outputs are unchanged.
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(settings.target_modules), bias="none")
    return get_peft_model(model, cfg)


def has_lora(model: nn.Module) -> bool:
    return any(LORA_KEY in name for name, _ in model.named_parameters())


def own_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable tensors, sharing storage with its parameters (not copies)."""
    state = model.state_dict(keep_vars=False)
    if has_lora(model):
        state = {k: v for k, v in state.items() if LORA_KEY in k}
    return state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the trainable weights: all of them, or only the LoRA adapters."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in own_state(model).items()}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model` in place; the keys and shapes must match `trainable_state(model)` exactly.

    Everything is checked before any weight is touched (never a half-loaded model). Values are cast to the
    model's dtype and device.
    """
    own = own_state(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise ValueError(f"trainable state: missing tensor {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"trainable state: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"trainable state: tensor {k} has shape {tuple(v.shape)}, "
                             f"the model expects {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Payload size of a state dict in bytes (what one weight update sends to each worker)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def export_policy(policy, state: dict[str, torch.Tensor], lora: LoraSettings | None, out: str | Path) -> Path:
    """Write `policy` with the learner's trainable `state` applied as a plain policy directory at `out`.

    With LoRA the adapters are merged into the base weights (PEFT's merge_and_unload), so the result loads with
    Policy.load and needs no PEFT. `policy` (a policy.io.Policy) is modified in place. `Policy.save` writes it
    aside and swaps it in whole: a reader of `out` sees the previous export or this one, never neither.
    """
    model = apply_lora(policy.model, lora) if lora is not None else policy.model
    load_trainable_state(model, state)
    policy.model = model.merge_and_unload() if lora is not None else model
    return policy.save(out)
