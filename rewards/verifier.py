"""Deterministic GenEval-style verifier for the shapes world.

`detect(image)` finds coloured blobs (nearest palette colour, connected components) and classifies each blob's
shape by how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2). `score(image, spec)`
turns the detections into per-check results: object, colour, count, position (and two-object for two-object
prompts). Nothing here is learned, so a policy under training cannot fool it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy.shapes import BACKGROUND, PALETTE, Spec, relation_holds

MIN_AREA = 30          # blobs smaller than this are noise (the smallest rendered object covers ~45 px)
MAX_AREA = 400         # blobs larger than this are not one object (rendered objects are at most 16x16)
MAX_COLOUR_DIST = 90   # RGB distance to the nearest palette colour; farther is background / noise
_NAMES = list(PALETTE)
_COLOURS = np.array([PALETTE[n] for n in _NAMES] + [BACKGROUND], dtype=np.float32)  # (C+1, 3)


@dataclass(frozen=True)
class Blob:
    colour: str
    shape: str
    area: int
    centre: tuple[float, float]  # (x, y)


def colour_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) int: palette index of each pixel, -1 for background or far-from-palette pixels."""
    px = image.reshape(-1, 3).astype(np.float32)
    d = np.linalg.norm(px[:, None, :] - _COLOURS[None], axis=-1)  # (HW, C+1)
    idx = d.argmin(1)
    idx[(idx == len(_NAMES)) | (d.min(1) > MAX_COLOUR_DIST)] = -1
    return idx.reshape(image.shape[:2])


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (k, 2) array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.array(pts))
    return comps


def classify_shape(points: np.ndarray) -> str:
    """Shape from the fill ratio of its bounding box; "other" unless the box is about square and object-sized."""
    ys, xs = points[:, 0], points[:, 1]
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if len(points) > MAX_AREA or not 0.75 <= bh / bw <= 1.33:
        return "other"
    fill = len(points) / float(bh * bw)
    if fill > 0.9:
        return "square"
    if fill > 0.65:
        return "circle"
    return "triangle"


def detect(image: np.ndarray) -> list[Blob]:
    """Blobs of an (H, W, 3) uint8 image."""
    labels = colour_labels(np.asarray(image))
    blobs = []
    for ci, name in enumerate(_NAMES):
        for pts in connected_components(labels == ci):
            if len(pts) < MIN_AREA:
                continue
            centre = (float(pts[:, 1].mean()) + 0.5, float(pts[:, 0].mean()) + 0.5)
            blobs.append(Blob(name, classify_shape(pts), len(pts), centre))
    return blobs


def _matches(blob: Blob, shape: str, colour: str | None) -> bool:
    return blob.shape == shape and (colour is None or blob.colour == colour)


def score(image: np.ndarray, spec: Spec) -> dict[str, bool]:
    """Per-check results for one image; key "all" is the strict verdict (every check passed)."""
    blobs = detect(image)
    checks: dict[str, bool] = {}
    objs = spec.objects
    checks["object"] = all(any(b.shape == o.shape for b in blobs) for o in objs)
    if any(o.colour for o in objs):
        checks["colour"] = all(any(_matches(b, o.shape, o.colour) for b in blobs) for o in objs)
    checks["count"] = all(sum(_matches(b, o.shape, o.colour) for b in blobs) == o.count for o in objs)
    if spec.category == "two-object":
        checks["two-object"] = checks["colour"] and checks["count"]
    if spec.relation is not None:
        a = [b for b in blobs if _matches(b, objs[0].shape, objs[0].colour)]
        c = [b for b in blobs if _matches(b, objs[1].shape, objs[1].colour)]
        checks["position"] = bool(a and c) and all(
            relation_holds(spec.relation, x.centre, y.centre) for x in a for y in c
        )
    checks["all"] = all(checks.values())
    return checks


def partial_credit(checks: dict[str, bool]) -> float:
    """Fraction of passed checks (excluding the strict "all")."""
    vals = [v for k, v in checks.items() if k != "all"]
    return sum(vals) / len(vals)
