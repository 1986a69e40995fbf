"""The one optimiser builder of every training loop (the stages before RL and the RL learner)."""
from __future__ import annotations

import torch
import torch.nn as nn


def configure_optimizers(module: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                         weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `module`; weight decay only on those with dim >= 2 (matrices and
    embeddings, not biases or norms; nanoGPT style). Groups in order: decayed, then not decayed (empty ones left out).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas))
