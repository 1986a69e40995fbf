"""The reward protocol, output validation, and loading rewards by name, entry point or import path.

A reward is any callable `fn(images, prompts, metadata)` on a batch of B images:

    images    (B, H, W, 3) uint8 numpy array
    prompts   list of B strings
    metadata  list of B JSON-able dicts (the shapes world: {"spec": <Spec JSON>})

It returns B floats (any 1-D array-like), or a mapping {"score": B floats, <sub-score name>: B floats, ...}.
Scores must be finite; a sub-score may be NaN where it does not apply (e.g. "position" for a prompt without a
relation). A class reward is constructed once with its kwargs and then called per batch.

`load_reward(name, kwargs)` finds a reward by registry name (built-ins, `register`), then by entry point in the
group `nextscale.rewards` (how a user's own package adds rewards), then by import path `package.module:attr`.
"""
from __future__ import annotations

import functools
import importlib
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import numpy as np

ENTRY_POINT_GROUP = "nextscale.rewards"
REGISTRY: dict[str, str | Callable] = {  # name -> import path (imported on first use) or the object itself
    "verifier": "rewards.builtin:VerifierReward",
    "clip_score": "rewards.builtin:ClipScore",
    "http": "rewards.builtin:HttpReward",
    "colour_fraction": "rewards.builtin:ColourFraction",
    "vlm_judge": "rewards.vlm_judge:VlmJudge",
}


class RewardError(RuntimeError):
    """A reward failed: `reward '<name>': <cause>`."""

    def __init__(self, name: str, cause: str):
        super().__init__(f"reward {name!r}: {cause}")
        self.reward, self.cause = name, cause


@dataclass
class Batch:
    images: np.ndarray                 # (B, H, W, 3) uint8
    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)  # empty -> B empty dicts

    def __post_init__(self):
        if not self.metadata:
            self.metadata = [{} for _ in self.prompts]
        im = self.images
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] != 3:
            got = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
            raise ValueError(f"images: expected a (B, H, W, 3) uint8 array, got {got}")
        if not len(im) == len(self.prompts) == len(self.metadata):
            raise ValueError(f"batch: {len(im)} images, {len(self.prompts)} prompts, {len(self.metadata)} metadata")

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class RewardOutput:
    score: np.ndarray                                  # (B,) float64, finite
    subs: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (B,) float64, NaN = not applicable


# --------------------------------------------------------------------------------------------- validation
def _column(name: str, what: str, values, n: int, allow_nan: bool) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise RewardError(name, f"{what} is not numeric ({type(values).__name__})") from None
    if arr.ndim != 1:
        raise RewardError(name, f"{what} has shape {arr.shape}, expected ({n},)")
    if len(arr) != n:
        raise RewardError(name, f"returned {len(arr)} {what} for {n} images")
    bad = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RewardError(name, f"{what} for image {i} is {arr[i]} ({int(bad.sum())} non-finite of {n})")
    return arr


def check_output(name: str, out, n: int) -> RewardOutput:
    """Validate what reward `name` returned for n images; never fills in or drops a score."""
    if isinstance(out, Mapping):
        if "score" not in out:
            raise RewardError(name, f"returned a mapping without 'score' (keys: {sorted(out)})")
        subs = {str(k): _column(name, f"sub-scores {k!r}", v, n, True) for k, v in out.items() if k != "score"}
        return RewardOutput(_column(name, "scores", out["score"], n, False), subs)
    return RewardOutput(_column(name, "scores", out, n, False))


def call_with_timeout(fn: Callable, timeout_s: float | None, *args):
    """fn(*args), raising TimeoutError after timeout_s (the call keeps running in a daemon thread)."""
    if timeout_s is None:
        return fn(*args)
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"timed out after {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_reward(name: str, fn: Callable, batch: Batch, timeout_s: float | None = None) -> RewardOutput:
    """Call one reward on a batch; any failure becomes a RewardError naming it and the cause."""
    try:
        out = call_with_timeout(fn, timeout_s, batch.images, batch.prompts, batch.metadata)
    except TimeoutError as e:
        raise RewardError(name, str(e)) from None
    except Exception as e:
        raise RewardError(name, f"raised {type(e).__name__}: {e}") from e
    return check_output(name, out, len(batch))


# ---------------------------------------------------------------------------------------------- loading
def register(name: str, target: str | Callable) -> None:
    """Add a reward to the registry: a callable, a class, or an import path."""
    REGISTRY[name] = target


def import_path(name: str, path: str):
    """`package.module:attr.sub` -> the object."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise RewardError(name, f"import path {path!r} is not of the form 'package.module:attr'")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise RewardError(name, f"cannot import {module!r} ({e})") from None
    try:
        return functools.reduce(getattr, attr.split("."), obj)
    except AttributeError:
        raise RewardError(name, f"module {module!r} has no attribute {attr!r}") from None


def check_name(name: str) -> None:
    """Raise ValueError unless `name` can name a reward: registry, entry point, or 'package.module:attr'.

    Nothing is imported (config-time check; `resolve` does the loading).
    """
    if name in REGISTRY or entry_points(group=ENTRY_POINT_GROUP, name=name):
        return
    if ":" in name:
        module, _, attr = name.partition(":")
        ident = r"[A-Za-z_][A-Za-z0-9_]*"
        if not re.fullmatch(rf"{ident}(\.{ident})*", module) or not re.fullmatch(rf"{ident}(\.{ident})*", attr):
            raise ValueError(f"import path {name!r} is not of the form 'package.module:attr'")
        return
    raise ValueError(f"unknown reward {name!r}: not a built-in ({', '.join(sorted(REGISTRY))}), not an entry point "
                     f"in group {ENTRY_POINT_GROUP!r}, not an import path 'package.module:attr'")


def resolve(name: str):
    """The reward class or function for a registry name, an entry-point name, or an import path."""
    if name in REGISTRY:
        target = REGISTRY[name]
        return import_path(name, target) if isinstance(target, str) else target
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            return ep.load()
        except Exception as e:
            raise RewardError(name, f"entry point {ep.value!r} failed to load ({type(e).__name__}: {e})") from None
    if ":" in name:
        return import_path(name, name)
    raise RewardError(name, f"unknown: not a built-in ({', '.join(sorted(REGISTRY))}), not an entry point in "
                            f"group {ENTRY_POINT_GROUP!r}, not an import path 'package.module:attr'")


def load_reward(name: str, kwargs: dict | None = None) -> Callable:
    """A ready-to-call reward: classes are constructed once with kwargs, functions get kwargs bound."""
    obj, kwargs = resolve(name), kwargs or {}
    if isinstance(obj, type):
        try:
            return obj(**kwargs)
        except Exception as e:
            raise RewardError(name, f"could not construct {obj.__name__} ({type(e).__name__}: {e})") from e
    if not callable(obj):
        raise RewardError(name, f"{type(obj).__name__} object is not callable")
    return functools.partial(obj, **kwargs) if kwargs else obj
