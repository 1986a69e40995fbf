"""Built-in rewards: the shapes verifier, CLIP score (open_clip), a remote HTTP reward, and a colour fraction.

Each is a class: constructed once with its config, then called per batch as
`reward(images (B, H, W, 3) uint8, prompts [B], metadata [B]) -> {"score": (B,), <sub-score>: (B,), ...}`.
"""
from __future__ import annotations

import json

import numpy as np

from shapes.world import Spec
from rewards.base import Batch
from shapes.verifier import JUDGES, checks_of, detect, object_credit, partial_credit
from rewards.wire import batch_to_json, post_json

CHECKS = ("object", "colour", "count", "two-object", "position", "only", "all")  # every check it can report


def shapes_metadata(specs: list[Spec]) -> list[dict]:
    """Per-prompt metadata of the shapes world: {"spec": <Spec as a JSON object>}."""
    return [{"spec": json.loads(s.to_json())} for s in specs]


class VerifierReward:
    """GenEval-style verifier against metadata["spec"]: "partial" = fraction of checks passed, "strict" = all,
    "objects" = fraction of the asked objects drawn right (shapes.verifier.object_credit).

    Sub-scores: each check (object, colour, count, two-object, position, only, all) as 0/1, NaN where it does not
    apply. `judge`: the shape classifier, "fill" (bounding-box fill ratio) or "template" (stricter template IoU).
    `exclusive`: also check that nothing but the objects asked is drawn ("only"; shapes.verifier.score).
    """

    def __init__(self, mode: str = "partial", judge: str = "fill", exclusive: bool = False):
        if mode not in ("partial", "strict", "objects"):
            raise ValueError(f"mode must be 'partial', 'strict' or 'objects', got {mode!r}")
        if judge not in JUDGES:
            raise ValueError(f"judge must be one of {sorted(JUDGES)}, got {judge!r}")
        self.mode, self.judge, self.exclusive = mode, judge, bool(exclusive)

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> dict:
        checks, main = [], []
        for i, (img, meta) in enumerate(zip(images, metadata)):
            if "spec" not in meta:
                raise ValueError(f"metadata {i} has no 'spec'")
            spec, blobs = Spec.from_json(meta["spec"]), detect(img, self.judge)  # detected once for both
            checks.append(checks_of(blobs, spec, self.exclusive))
            main.append(object_credit(blobs, spec, self.exclusive) if self.mode == "objects"
                        else partial_credit(checks[-1]) if self.mode == "partial" else float(checks[-1]["all"]))
        keys = CHECKS if self.exclusive else [k for k in CHECKS if k != "only"]   # "only" exists only when asked
        return {"score": main, **{k: [float(c[k]) if k in c else np.nan for c in checks] for k in keys}}


def colour_fraction(images: np.ndarray, rgb: tuple[int, int, int], max_dist: float = 90.0) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B,): the fraction of each image's pixels within `max_dist` (RGB) of `rgb`."""
    d = np.linalg.norm(images.astype(np.float32) - np.asarray(rgb, dtype=np.float32), axis=-1)
    return (d <= max_dist).mean(axis=(1, 2))


class ColourFraction:
    """The easy reward of the learning test: how much of the image is one palette colour (default red)."""

    def __init__(self, colour: str = "red"):
        from shapes.world import PALETTE

        if colour not in PALETTE:
            raise ValueError(f"colour must be one of {sorted(PALETTE)}, got {colour!r}")
        self.rgb = PALETTE[colour]

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> np.ndarray:
        return colour_fraction(images, self.rgb)


class ClipScore:
    """Cosine similarity of open_clip image and prompt embeddings, (B,) in [-1, 1].

    `model` is any open_clip model name (`shapes-clip-tiny` is registered offline by policy.teacher);
    `pretrained` an open_clip tag, a checkpoint file path, or None for random weights.
    """

    def __init__(self, model: str = "shapes-clip-tiny", pretrained: str | None = None, device: str = "cpu"):
        import open_clip

        import policy.teacher  # noqa: F401  registers the shapes world's open_clip configs

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained,
                                                                               device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> np.ndarray:
        import torch
        import torch.nn.functional as F
        from PIL import Image

        with torch.no_grad():
            x = torch.stack([self.preprocess(Image.fromarray(im)) for im in images]).to(self.device)
            img = F.normalize(self.model.encode_image(x), dim=-1)                         # (B, D)
            txt = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)), dim=-1)
            return (img * txt).sum(-1).float().cpu().numpy()


class HttpReward:
    """A user's scoring server: POSTs the batch as JSON (base64 PNG images) to `url`.

    The server answers {"score": [B floats], <sub-score>: [B floats], ...}; any other status is an error.
    """

    def __init__(self, url: str, timeout_s: float = 60.0, headers: dict[str, str] | None = None):
        self.url, self.timeout_s, self.headers = url, timeout_s, headers or {}

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> dict:
        status, body = post_json(self.url, batch_to_json(Batch(images, prompts, metadata)), self.timeout_s,
                                 self.headers)
        if status != 200:
            detail = body.get("error", body) if isinstance(body, dict) else body
            raise RuntimeError(f"{self.url} answered HTTP {status}: {detail}")
        return body
