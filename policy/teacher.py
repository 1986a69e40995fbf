"""Frozen semantic teachers for the dual-codebook tokenizer: an open_clip visual tower, by name.

`SemanticTeacher(name, pretrained)` maps images (B, 3, P, P) in [0, 1] to patch features resized to the tokenizer's
final grid, (B, D, H, W). The shapes world registers its tiny architectures (policy/open_clip_configs/) with
open_clip, so `shapes-clip-tiny` works offline (random, or with a checkpoint this repo trains).
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_DIR = Path(__file__).parent / "open_clip_configs"
open_clip.add_model_config(CONFIG_DIR)


class SemanticTeacher(nn.Module):
    def __init__(self, name: str, pretrained: str | None = None, grid: tuple[int, int] = (8, 8)):
        super().__init__()
        model = open_clip.create_model(name, pretrained=pretrained)
        self.visual = model.visual
        self.visual.output_tokens = True
        self.grid = grid
        mean = getattr(self.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(self.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.size = self.visual.image_size if isinstance(self.visual.image_size, tuple) else (self.visual.image_size,) * 2
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        return self.visual.transformer.width

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, P, P) in [0, 1] -> (B, D, H, W)
        x = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False)
        _, tokens = self.visual((x - self.mean) / self.std)            # (B, N, D) patch tokens
        side = int(tokens.shape[1] ** 0.5)
        fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        return F.interpolate(fmap, size=self.grid, mode="area") if fmap.shape[-2:] != self.grid else fmap

    def train(self, mode: bool = True):  # always frozen
        return super().train(False)
