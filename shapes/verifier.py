"""Deterministic GenEval-style verifier for the shapes world.

`detect(image)` finds coloured blobs (nearest palette colour, connected components) and classifies each blob's
shape by how much of its object-sized bounding box it fills (FILL_BANDS around the rendered square 1, circle 0.81,
triangle 0.53). `score(image, spec)` turns the detections into per-check results: object, colour, count, position
(and two-object for two-object prompts). Nothing here is learned, but a fill ratio says nothing of the outline: a
blob of the right fill passes whatever its shape.

A second, stricter judge (`judge="template"`) classifies a blob by the IoU of its pixel mask with the ideal
circle / square / triangle drawn at the blob's bounding box (`classify_template`); all checks are shared. Use it
as a held-out judge that is not the training reward.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from shapes.world import BACKGROUND, PALETTE, SHAPES, Spec, relation_holds, shape_mask

MIN_AREA = 30          # blobs smaller than this are noise (the smallest rendered object covers ~45 px)
MAX_AREA = 400         # blobs larger than this are not one object (rendered objects are at most 16x16)
MAX_COLOUR_DIST = 90   # RGB distance to the nearest palette colour; farther is background / noise
TEMPLATE_IOU = 0.8     # template judge: the best template must overlap the blob at least this much ...
TEMPLATE_MARGIN = 0.05  # ... and beat the runner-up by this much (a blob between circle and square is "other")
OBJECT_SIDE = (12, 20)  # px: every rendered object's box is 16 (triangles 15) on a side
FILL_BANDS = {"square": (0.93, 1.0), "circle": (0.74, 0.89), "triangle": (0.45, 0.62)}  # else "other"
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


def _object_box(points: np.ndarray) -> tuple[int, int] | None:
    """(height, width) of the blob's bounding box; None unless the box is about square and object-sized."""
    ys, xs = points[:, 0], points[:, 1]
    bh, bw = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    if len(points) > MAX_AREA or not 0.75 <= bh / bw <= 1.33:
        return None
    return bh, bw


def classify_shape(points: np.ndarray) -> str:
    """Shape from the fill ratio of its bounding box (a band around the rendered shape's: circle 0.81, triangle
    0.53, square 1); "other" outside the bands, or unless the box is about square and object-sized (16 +- 4 px)."""
    box = _object_box(points)
    if box is None:
        return "other"
    if not all(OBJECT_SIDE[0] <= side <= OBJECT_SIDE[1] for side in box):
        return "other"
    fill = len(points) / float(box[0] * box[1])
    return next((shape for shape, (lo, hi) in FILL_BANDS.items() if lo <= fill <= hi), "other")


def blob_mask(points: np.ndarray) -> np.ndarray:
    """(h, w) bool: the blob's pixels cropped to its bounding box."""
    ys, xs = points[:, 0] - points[:, 0].min(), points[:, 1] - points[:, 1].min()
    out = np.zeros((ys.max() + 1, xs.max() + 1), dtype=bool)
    out[ys, xs] = True
    return out


@lru_cache(maxsize=256)
def ideal_mask(shape: str, side: int) -> np.ndarray:
    """(h, w) bool: the renderer's `shape` of side `side` (shapes.world.shape_mask), cropped to its bounding box."""
    n = side + 2
    m = shape_mask(shape, n / 2, n / 2, side, image_size=n)
    ys, xs = np.nonzero(m)
    out = m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    out.flags.writeable = False
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks, each centred on a common canvas (offset (H - h) // 2)."""
    h, w = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])

    def pad(m: np.ndarray) -> np.ndarray:
        out = np.zeros((h, w), dtype=bool)
        y, x = (h - m.shape[0]) // 2, (w - m.shape[1]) // 2
        out[y : y + m.shape[0], x : x + m.shape[1]] = m
        return out

    pa, pb = pad(a), pad(b)
    union = np.logical_or(pa, pb).sum()
    return float(np.logical_and(pa, pb).sum() / union) if union else 0.0


def template_ious(points: np.ndarray) -> dict[str, float]:
    """IoU of the blob with each ideal shape drawn at its bounding box (side = the box's longer side)."""
    mask = blob_mask(points)
    return {s: mask_iou(mask, ideal_mask(s, max(mask.shape))) for s in SHAPES}


def classify_template(points: np.ndarray, threshold: float = TEMPLATE_IOU, margin: float = TEMPLATE_MARGIN) -> str:
    """The shape whose template overlaps the blob best, if IoU >= threshold and it beats the runner-up by margin;
    "other" otherwise (and, as for the fill ratio, unless the box is about square and object-sized)."""
    if _object_box(points) is None:
        return "other"
    ranked = sorted(template_ious(points).items(), key=lambda kv: -kv[1])
    (best, iou), (_, second) = ranked[0], ranked[1]
    return best if iou >= threshold and iou - second >= margin else "other"


JUDGES: dict[str, Callable[[np.ndarray], str]] = {"fill": classify_shape, "template": classify_template}


def _classifier(judge: str | Callable[[np.ndarray], str]) -> Callable[[np.ndarray], str]:
    if callable(judge):
        return judge
    if judge not in JUDGES:
        raise ValueError(f"judge must be one of {sorted(JUDGES)}, got {judge!r}")
    return JUDGES[judge]


def detect(image: np.ndarray, judge: str | Callable[[np.ndarray], str] = "fill") -> list[Blob]:
    """Blobs of an (H, W, 3) uint8 image; `judge` names (JUDGES) or is the shape classifier of a blob's points."""
    classify = _classifier(judge)
    labels = colour_labels(np.asarray(image))
    blobs = []
    for ci, name in enumerate(_NAMES):
        for pts in connected_components(labels == ci):
            if len(pts) < MIN_AREA:
                continue
            centre = (float(pts[:, 1].mean()) + 0.5, float(pts[:, 0].mean()) + 0.5)
            blobs.append(Blob(name, classify(pts), len(pts), centre))
    return blobs


def _matches(blob: Blob, shape: str, colour: str | None) -> bool:
    return blob.shape == shape and (colour is None or blob.colour == colour)


def score(image: np.ndarray, spec: Spec, judge: str | Callable[[np.ndarray], str] = "fill",
          exclusive: bool = False) -> dict[str, bool]:
    """Per-check results for one image; key "all" is the strict verdict (every check passed).

    `judge`: "fill" (the bounding-box fill ratio, the training reward) or "template" (template IoU).
    `exclusive` adds the check "only": the image holds no blob beyond the objects asked (GenEval's checks ignore
    extra objects, so a policy can pass them by splashing many blobs and hoping one matches).
    """
    return checks_of(detect(image, judge), spec, exclusive)


def checks_of(blobs: list[Blob], spec: Spec, exclusive: bool = False) -> dict[str, bool]:
    """score's checks on blobs already detected."""
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
    if exclusive:
        checks["only"] = len(blobs) == sum(o.count for o in objs)
    checks["all"] = all(checks.values())
    return checks


def object_credit(blobs: list[Blob], spec: Spec, exclusive: bool = False) -> float:
    """Per-object credit on detected blobs: the fraction of the asked objects drawn with their shape, colour and
    exact count (with `exclusive`, "nothing else drawn" counts as one more item). Denser than the checks, whose
    colour and count pass only when every object does: one of two objects right earns half."""
    hits = [sum(_matches(b, o.shape, o.colour) for b in blobs) == o.count for o in spec.objects]
    if exclusive:
        hits.append(len(blobs) == sum(o.count for o in spec.objects))
    return sum(hits) / len(hits)


def partial_credit(checks: dict[str, bool]) -> float:
    """Fraction of passed checks (excluding the strict "all")."""
    vals = [v for k, v in checks.items() if k != "all"]
    return sum(vals) / len(vals)
