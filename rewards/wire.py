"""The JSON wire format: images as base64 PNG, never pickle.

Request   {"images": [B base64 PNG strings], "prompts": [B strings], "metadata": [B objects] (optional)}
Response  {"score": [B floats], <name>: [B floats or null], ...}   (null = NaN = not applicable)
Error     {"error": "reward 'name': cause"}
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.config import format_validation_error
from policy.images import png_bytes
from rewards.base import Batch

MAX_PIXELS = 4096 * 4096          # per image; checked before a PNG is decompressed
MAX_REQUEST_PIXELS = 64 << 20     # all images of one request together (a small PNG can declare a huge image)


class PayloadError(ValueError):
    """A request that does not follow the wire format (the message says where)."""


class BatchPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1)
    prompts: list[str]
    metadata: list[dict[str, Any]] | None = None


def encode_images(images: np.ndarray) -> list[str]:
    """(B, H, W, 3) uint8 -> B base64 PNG strings."""
    return [base64.b64encode(png_bytes(im)).decode("ascii") for im in images]


def open_image(i: int, text: str) -> Image.Image:
    """One base64 PNG, opened lazily: only its header is read (size and format are known, nothing decoded)."""
    try:
        img = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    except Image.DecompressionBombError as e:
        raise PayloadError(f"images.{i}: {e}") from None
    except (binascii.Error, ValueError, OSError):
        raise PayloadError(f"images.{i}: not a base64-encoded PNG") from None
    if img.format != "PNG":
        raise PayloadError(f"images.{i}: {img.format} image, expected PNG")
    if img.width * img.height > MAX_PIXELS:
        raise PayloadError(f"images.{i}: {img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
    return img


def decode_image(i: int, text: str | Image.Image) -> np.ndarray:
    """One base64 PNG (or one opened by `open_image`) -> (H, W, 3) uint8."""
    img = open_image(i, text) if isinstance(text, str) else text
    try:
        return np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, zlib.error, ... on damaged data
        raise PayloadError(f"images.{i}: broken PNG ({type(e).__name__}: {str(e)[:200]})") from None


def batch_to_json(batch: Batch) -> dict:
    return {"images": encode_images(batch.images), "prompts": list(batch.prompts), "metadata": batch.metadata}


def batch_from_json(data: Any, max_request_pixels: int = MAX_REQUEST_PIXELS) -> Batch:
    """Validate a decoded JSON request into a Batch; PayloadError names the bad field."""
    try:
        p = BatchPayload.model_validate(data)
    except ValidationError as e:
        msg = format_validation_error(e)
        raise PayloadError(f"request{msg[len('config'):]}" if msg.startswith("config: ") else msg) from None
    n = len(p.images)
    if len(p.prompts) != n or (p.metadata is not None and len(p.metadata) != n):
        meta = n if p.metadata is None else len(p.metadata)
        raise PayloadError(f"batch: {n} images, {len(p.prompts)} prompts, {meta} metadata")
    opened = [open_image(i, s) for i, s in enumerate(p.images)]  # headers only: sizes are checked first
    if len({im.size for im in opened}) > 1:
        raise PayloadError("images: all images of a request must have the same size")
    total = sum(im.width * im.height for im in opened)
    if total > max_request_pixels:
        raise PayloadError(f"images: {total} pixels in all exceed {max_request_pixels} per request")
    images = [decode_image(i, im) for i, im in enumerate(opened)]
    try:
        return Batch(np.stack(images), p.prompts, p.metadata or [])
    except ValueError as e:
        raise PayloadError(str(e)) from None


def parse_request(body: bytes, max_request_pixels: int = MAX_REQUEST_PIXELS) -> Batch:
    """An HTTP request body -> Batch; anything malformed (encoding, JSON, wire format) is a PayloadError."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PayloadError(f"request: not UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise PayloadError(f"request: not JSON ({e})") from None
    except RecursionError:
        raise PayloadError("request: not JSON (nested too deeply)") from None
    return batch_from_json(data, max_request_pixels)


def floats_to_json(values: np.ndarray) -> list[float | None]:
    """(B,) floats -> JSON list, NaN as null (JSON has no NaN)."""
    return [None if np.isnan(v) else float(v) for v in values]


def post_json(url: str, payload: dict, timeout_s: float, headers: dict | None = None) -> tuple[int, Any]:
    """POST JSON, return (HTTP status, decoded JSON body); a non-JSON body raises ValueError."""
    req = urllib.request.Request(url, json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body)
    except ValueError:
        raise ValueError(f"{url} answered HTTP {status} with a non-JSON body: {body[:200]!r}") from None
