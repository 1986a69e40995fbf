"""The reward service's request parser (rewards.wire.parse_request / batch_from_json), without a server.

Malformed requests of every kind are a PayloadError naming the field; a hypothesis fuzz run checks that nothing
else is ever raised and that an accepted request is always consistent (B images, B prompts, B metadata, uint8
(B, H, W, 3)). A few hundred examples by default; RELIABILITY_LONG=1 runs many more.
"""
import base64
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from rewards.wire import PayloadError, batch_from_json, parse_request

LONG = os.environ.get("RELIABILITY_LONG") == "1"
FUZZ = settings(max_examples=5000 if LONG else 300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def png(w=8, h=8, mode="RGB", fmt="PNG", seed=0) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def png_declaring(w: int, h: int) -> str:
    """A tiny PNG whose header declares w x h pixels (the pixel data is a few bytes: a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


GOOD = {"images": [png(seed=1), png(seed=2)], "prompts": ["a red circle", "two blue squares"],
        "metadata": [{"spec": None}, {}]}


def good(**over):
    return json.dumps({**GOOD, **over}).encode()


# (id, request body, the start of the PayloadError message)
BAD_BODIES = [
    ("empty-body", b"", "request: not JSON"),
    ("not-json", b"{images: [}", "request: not JSON"),
    ("invalid-utf8", b'{"images": ["\xff\xfe"], "prompts": ["a"]}', "request: not UTF-8 (byte 13)"),
    ("utf16-json", json.dumps(GOOD).encode("utf-16"), "request: not UTF-8"),
    ("nested-too-deeply", b"[" * 100_000 + b"]" * 100_000, "request: not JSON"),
    ("json-list", b"[1, 2]", "request: Input should be a valid dictionary"),
    ("json-string", b'"images"', "request: Input should be a valid dictionary"),
    ("json-null", b"null", "request: Input should be a valid dictionary"),
    ("missing-images", json.dumps({"prompts": ["a"]}).encode(), "images: Field required"),
    ("missing-prompts", json.dumps({"images": GOOD["images"]}).encode(), "prompts: Field required"),
    ("unknown-field", good(scores=[1, 2]), "scores: Extra inputs are not permitted"),
    ("images-not-a-list", good(images=GOOD["images"][0]), "images: Input should be a valid list"),
    ("images-empty", good(images=[], prompts=[], metadata=[]), "images: List should have at least 1 item"),
    ("image-a-number", good(images=[1, 2]), "images.0: Input should be a valid string"),
    ("prompt-a-number", good(prompts=["a", 2]), "prompts.1: Input should be a valid string"),
    ("metadata-not-objects", good(metadata=["a", "b"]), "metadata.0: Input should be a valid dictionary"),
    ("fewer-prompts", good(prompts=["a"]), "batch: 2 images, 1 prompts, 2 metadata"),
    ("more-metadata", good(metadata=[{}, {}, {}]), "batch: 2 images, 2 prompts, 3 metadata"),
    ("empty-metadata-list", good(metadata=[]), "batch: 2 images, 2 prompts, 0 metadata"),
    ("bad-base64", good(images=["%%%", "%%%"]), "images.0: not a base64-encoded PNG"),
    ("base64-of-text", good(images=[base64.b64encode(b"hello world").decode()] * 2),
     "images.0: not a base64-encoded PNG"),
    ("base64-with-newlines", good(images=[GOOD["images"][0][:10] + "\n" + GOOD["images"][0][10:]] * 2),
     "images.0: not a base64-encoded PNG"),
    ("jpeg-image", good(images=[png(fmt="JPEG")] * 2), "images.0: JPEG image, expected PNG"),
    ("gif-image", good(images=[png(mode="P", fmt="GIF")] * 2), "images.0: GIF image, expected PNG"),
    ("truncated-png", good(images=[png()[:60]] * 2), "images.0: "),
    ("mixed-sizes", good(images=[png(8, 8), png(9, 8)]), "images: all images of a request must have the same size"),
    ("huge-declared-image", good(images=[png_declaring(100_000, 100_000)] * 2), "images.0: "),
    ("over-pixel-limit", good(images=[png_declaring(5000, 4000)] * 2), "images.0: 5000x4000 exceeds"),
    ("request-pixel-limit", good(images=[png_declaring(4096, 4096)] * 5, prompts=["a"] * 5, metadata=[{}] * 5),
     "images: 83886080 pixels in all exceed"),
    ("bomb-with-bad-data", good(images=[png_declaring(64, 64)] * 2), "images.0: broken PNG"),
]


@pytest.mark.parametrize("body, message", [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_bad_request_is_a_payload_error_naming_the_field(body, message):
    with pytest.raises(PayloadError) as e:
        parse_request(body)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"])
def test_any_png_mode_becomes_rgb_uint8(mode):
    batch = parse_request(good(images=[png(6, 5, mode)] * 2))
    assert batch.images.shape == (2, 5, 6, 3) and batch.images.dtype == np.uint8


# -------------------------------------------------------------------------------------------------- fuzzing
json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_any = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)
real_png = st.builds(png, st.integers(1, 6), st.integers(1, 6), st.sampled_from(["RGB", "RGBA", "L", "P", "1"]),
                     st.just("PNG"), st.integers(0, 3))
image_text = (real_png | real_png.map(lambda s: s[: len(s) // 2]) | st.text(max_size=24)
              | st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())
              | st.builds(png_declaring, st.integers(0, 70_000), st.integers(0, 70_000)))
payloads = st.fixed_dictionaries(
    {"images": st.lists(image_text, max_size=3) | json_any, "prompts": st.lists(st.text(max_size=8), max_size=3)
     | json_any},
    optional={"metadata": st.none() | st.lists(st.dictionaries(st.text(max_size=4), json_leaf, max_size=2),
                                                max_size=3) | json_any,
              "extra": json_any})



@st.composite
def consistent(draw):
    """A well-formed request (B same-size PNGs of any mode, B prompts, B or no metadata): mostly accepted."""
    n, w, h = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    modes = st.sampled_from(["RGB", "RGBA", "L", "P", "1"])
    data = {"images": [png(w, h, draw(modes), "PNG", draw(st.integers(0, 3))) for _ in range(n)],
            "prompts": draw(st.lists(st.text(max_size=8), min_size=n, max_size=n))}
    if draw(st.booleans()):
        data["metadata"] = draw(st.lists(st.dictionaries(st.text(max_size=4), json_any, max_size=2), min_size=n,
                                         max_size=n))
    return data


requests = st.one_of(consistent(), payloads)


def check_consistent(data, batch):
    """An accepted request is exactly what was sent: B images, B prompts, B metadata, (B, H, W, 3) uint8."""
    assert isinstance(data, dict) and set(data) <= {"images", "prompts", "metadata"}
    n = len(data["images"])
    assert n >= 1 and batch.images.dtype == np.uint8 and batch.images.ndim == 4 and batch.images.shape[0] == n
    assert batch.images.shape[-1] == 3 and batch.prompts == data["prompts"] and len(batch.metadata) == n
    if data.get("metadata"):
        assert json.dumps(batch.metadata) == json.dumps(data["metadata"])  # (NaN != NaN, its text is equal)


def parsed_or_rejected(parse, payload):
    """parse(payload), or None after a one-line PayloadError; any other exception fails the example."""
    try:
        batch = parse(payload)
    except PayloadError as e:
        assert "\n" not in str(e)
        event(f"rejected: {str(e).split(':')[0]}")
        return None
    event("accepted")
    return batch


@FUZZ
@given(st.one_of(requests, json_any))
def test_fuzz_batch_from_json_only_raises_payload_error(data):
    batch = parsed_or_rejected(batch_from_json, data)
    if batch is not None:
        check_consistent(data, batch)


def mutate(body: bytes, cuts: list[int], flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(body)
    for pos, byte in flips:
        if b:
            b[pos % len(b)] = byte
    for cut in cuts:
        b = b[: cut % (len(b) + 1)]
    return bytes(b)


bodies = (st.binary(max_size=200)
          | st.builds(lambda d: json.dumps(d).encode(), requests)
          | st.builds(mutate, st.builds(lambda d: json.dumps(d).encode(), requests),
                      st.lists(st.integers(0, 10_000), max_size=1),
                      st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3)))


@FUZZ
@given(bodies)
def test_fuzz_parse_request_only_raises_payload_error(body):
    batch = parsed_or_rejected(parse_request, body)
    if batch is not None:
        check_consistent(json.loads(body), batch)
