"""Images for people: uint8 conversion and captioned PNG sample grids."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from core.atomic import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, P, P) float in [0, 1] -> (B, P, P, 3) uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: np.ndarray, captions: list[str], path: str | Path, cols: int = 4, zoom: int = 2) -> Path:
    """A PNG grid of (B, P, P, 3) uint8 images, each with its (wrapped) caption underneath."""
    b, p = images.shape[0], images.shape[1] * zoom
    rows = (b + cols - 1) // cols
    font = ImageFont.load_default()
    wrap = max(8, p // 6)
    text_h = 12 * max((len(textwrap.wrap(c, wrap)) for c in captions), default=1) + 4
    grid = Image.new("RGB", (cols * (p + 4) + 4, rows * (p + text_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = 4 + (i % cols) * (p + 4), 4 + (i // cols) * (p + text_h + 4)
        grid.paste(Image.fromarray(img).resize((p, p), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(cap, wrap)):
            draw.text((x, y + p + 2 + 12 * j), line, fill="black", font=font)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
