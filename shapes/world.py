"""The tiny "shapes" world: procedural 64x64 scenes of coloured shapes, their captions and specs.

A `Spec` is the structured meaning of a caption (GenEval-like): one or two object groups (shape, colour,
count) and, for position prompts, a relation between the two objects. `render(spec, rng)` draws a scene that
satisfies it; `shapes.verifier.score(image, spec)` checks an image against it.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64
CELL = 8                  # pixels per cell of the object lattice (= one token of the final 8x8 grid)
LATTICE = IMAGE_SIZE // CELL
OBJECT_CELLS = 2          # every object covers 2x2 cells
OBJECT_SIZE = OBJECT_CELLS * CELL
BACKGROUND = (245, 245, 245)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 190),
    "black": (30, 30, 30),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("object", "colour", "count", "two-object", "position")
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str | None = None  # None: any colour ("a circle")
    count: int = 1


@dataclass(frozen=True)
class Spec:
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None  # objects[0] <relation> objects[1]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str | dict) -> "Spec":
        d = json.loads(text) if isinstance(text, str) else text
        return Spec(d["category"], tuple(ObjectSpec(**o) for o in d["objects"]), d.get("relation"))


def caption(spec: Spec) -> str:
    def phrase(o: ObjectSpec) -> str:
        words = [NUMBERS[o.count]]
        if o.colour:
            words.append(o.colour)
        words.append(o.shape + ("s" if o.count > 1 else ""))
        return " ".join(words)

    parts = [phrase(o) for o in spec.objects]
    if spec.relation:
        return f"{parts[0]} {spec.relation} {parts[1]}"
    return " and ".join(parts)


def all_specs() -> list[Spec]:
    """Every prompt the world can ask for (the prompt universe before the train/held-out split)."""
    cols = list(PALETTE)
    specs = [Spec("object", (ObjectSpec(s),)) for s in SHAPES]
    specs += [Spec("colour", (ObjectSpec(s, c),)) for s in SHAPES for c in cols]
    specs += [Spec("count", (ObjectSpec(s, c, n),)) for s in SHAPES for c in cols for n in (2, 3, 4)]
    pairs = [(a, b) for a, b in itertools.permutations(itertools.product(SHAPES, cols), 2) if a[1] != b[1]]
    specs += [Spec("two-object", (ObjectSpec(*a), ObjectSpec(*b))) for a, b in pairs if a < b]
    specs += [Spec("position", (ObjectSpec(*a), ObjectSpec(*b)), r) for a, b in pairs for r in RELATIONS]
    return specs


# ---------------------------------------------------------------------------------------------- rendering
def shape_mask(shape: str, cx: float, cy: float, size: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(image_size, image_size) bool: the pixels of a `shape` of side `size` centred at (cx, cy)."""
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    xx, yy = xx + 0.5, yy + 0.5
    r = size / 2
    if shape == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "triangle":  # apex up, base at the bottom of the bounding box
        top, bottom = cy - r, cy + r
        half_width = (yy - top) / (2 * r) * r
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)
    raise ValueError(f"shape: unknown shape {shape!r}")


def _place(rng: random.Random, n: int, relation: str | None, tries: int = 500) -> list[tuple[float, float]]:
    """Centres of n objects on the cell lattice: each covers OBJECT_CELLS x OBJECT_CELLS whole cells, and any two
    are at least one empty cell apart (so they never touch); the relation holds for objects 0 and 1."""
    slots = LATTICE - OBJECT_CELLS + 1
    for _ in range(tries):
        corners = [(rng.randrange(slots), rng.randrange(slots)) for _ in range(n)]
        ok = all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) > OBJECT_CELLS
                 for a, b in itertools.combinations(corners, 2))
        centres = [((cx + OBJECT_CELLS / 2) * CELL, (cy + OBJECT_CELLS / 2) * CELL) for cx, cy in corners]
        if ok and relation is not None:
            ok = relation_holds(relation, centres[0], centres[1], margin=6)
        if ok:
            return centres
    raise RuntimeError("could not place objects without overlap")


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float = 2) -> bool:
    """Centre a is <relation> centre b (image coordinates: y grows downwards)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    return {"left of": dx < -margin, "right of": dx > margin, "above": dy < -margin, "below": dy > margin}[relation]


def render(spec: Spec, rng: random.Random) -> np.ndarray:
    """A (64, 64, 3) uint8 scene that satisfies `spec`; unspecified colours are drawn at random.

    Objects are OBJECT_SIZE px and sit on the CELL-px lattice (the tokenizer's final 8x8 grid), so every object
    is exactly 2x2 tokens: the world a tiny tokenizer can represent (see README, "the tiny world").
    """
    items: list[tuple[str, str]] = []
    for o in spec.objects:
        colour = o.colour or rng.choice(list(PALETTE))
        items += [(o.shape, colour)] * o.count
    centres = _place(rng, len(items), spec.relation)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for (shape, colour), (cx, cy) in zip(items, centres):
        img[shape_mask(shape, cx, cy, OBJECT_SIZE)] = PALETTE[colour]
    return img


# ------------------------------------------------------------------------------------------------ splits
@dataclass
class PromptSplits:
    train: list[Spec] = field(default_factory=list)
    heldout: list[Spec] = field(default_factory=list)


def split_prompts(heldout_fraction: float = 0.2, seed: int = 0) -> PromptSplits:
    """Deterministic train / held-out split, stratified by category."""
    rng = random.Random(seed)
    out = PromptSplits()
    specs = all_specs()
    for cat in CATEGORIES:
        group = [s for s in specs if s.category == cat]
        rng.shuffle(group)
        k = max(1, round(len(group) * heldout_fraction))
        out.heldout += group[:k]
        out.train += group[k:]
    return out


def write_prompts(specs: list[Spec], path: str | Path) -> None:
    """Parquet with columns prompt, category, spec (JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "prompt": [caption(s) for s in specs],
        "category": [s.category for s in specs],
        "spec": [s.to_json() for s in specs],
    })
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def read_prompts(path: str | Path) -> list[tuple[str, Spec]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"prompt", "spec"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: prompt file lacks column(s) {sorted(missing)}")
    return [(p, Spec.from_json(s)) for p, s in zip(table["prompt"].to_pylist(), table["spec"].to_pylist())]


def vocabulary() -> list[str]:
    """Every word a caption can use (the shapes world's word-level text vocabulary)."""
    words = set()
    for s in all_specs():
        words.update(caption(s).split())
    return sorted(words)


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def conflicting_spec(spec: Spec, rng: random.Random) -> Spec:
    """A spec that no scene rendered from `spec` satisfies (a hard negative): one attribute changed."""
    objs = list(spec.objects)
    used = {(o.shape, o.colour) for o in objs}
    i = rng.randrange(len(objs))
    o = objs[i]
    kinds = ["shape"] + (["colour"] if o.colour else []) + (["count"] if spec.category == "count" else [])
    kinds += ["relation"] if spec.relation else []
    kind = rng.choice(kinds)
    if kind == "relation":
        return Spec(spec.category, spec.objects, OPPOSITE[spec.relation])
    if kind == "count":
        objs[i] = ObjectSpec(o.shape, o.colour, rng.choice([n for n in (1, 2, 3, 4) if n != o.count]))
    elif kind == "colour":
        objs[i] = ObjectSpec(o.shape, rng.choice([c for c in PALETTE if (o.shape, c) not in used
                                                 and c not in {x.colour for x in objs}]), o.count)
    else:
        objs[i] = ObjectSpec(rng.choice([s for s in SHAPES if s not in {x.shape for x in objs}] or
                                        [s for s in SHAPES if s != o.shape]), o.colour, o.count)
    return Spec(spec.category, tuple(objs), spec.relation)
