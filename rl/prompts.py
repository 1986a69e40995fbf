"""The prompt stream: an endless, seeded sequence of (prompt, metadata) with a cursor saved in checkpoints.

With balance="category" the stream cycles through the categories (metadata["category"]), each category going
through its own seeded permutation per epoch; position p of the stream depends only on (seed, p), so resuming at
a cursor continues the same stream.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rl.config reads prompt files through this module; the type only names its section
    from rl.config import PromptsConfig


def load_prompts(cfg: PromptsConfig) -> list[tuple[str, dict]]:
    """From a Parquet file (`prompt` column, optional `spec` and `category`), or the shapes world's split.

    Metadata: {"spec": ...} where known, and {"category": ...} (the shapes spec's, or the file's column).

    A bad file is a one-line ValueError naming `prompts.path` and the cause.
    """
    if cfg.path:
        items = _read_prompt_file(cfg.path)
    else:
        from shapes.world import all_specs, caption, split_prompts

        specs = all_specs() if cfg.split == "all" else getattr(split_prompts(), cfg.split)
        items = [(caption(s), {"spec": s.to_json(), "category": s.category}) for s in specs]
    bad = [i for i, (p, _) in enumerate(items) if not isinstance(p, str) or not p.strip()]
    if not items or bad:
        field = "prompts.path" if cfg.path else "prompts.split"
        raise ValueError(f"{field}: {'no prompts' if not items else f'empty prompt at row {bad[0]}'} in "
                         f"{cfg.path or cfg.split}")
    return items


def _read_prompt_file(path: str) -> list[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401  (pa.compute)
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        cause = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"prompts.path: {path} is not a readable Parquet file ({type(e).__name__}: {cause})") from None
    if "prompt" not in table.column_names:
        raise ValueError(f"prompts.path: {path} has no 'prompt' column (columns: {table.column_names})")
    col = table["prompt"]
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise ValueError(f"prompts.path: {path}: column 'prompt' holds {col.type}, expected strings")
    if col.null_count:
        row = pa.compute.index(col.is_null(), True).as_py()
        raise ValueError(f"prompts.path: {path}: prompt at row {row} is null ({col.null_count} null in all)")
    try:
        prompts = col.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException) as e:
        raise ValueError(f"prompts.path: {path}: column 'prompt' is not valid UTF-8 ({type(e).__name__})") from None
    if not prompts:
        raise ValueError(f"prompts.path: no prompts in {path} (0 rows)")
    specs, cats = (table[c].to_pylist() if c in table.column_names else [None] * len(prompts)
                   for c in ("spec", "category"))
    return [(p, {**({"spec": s} if s else {}), **({"category": str(c)} if c is not None else {})})
            for p, s, c in zip(prompts, specs, cats)]


def _permuted(n: int, key: str, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{key}/epoch{epoch}").shuffle(order)
    return order


def _stream_index(n: int, key: str, pos: int, orders: dict) -> int:
    """Index into a list of n items at position pos of its endless stream: a seeded permutation per epoch."""
    epoch, i = divmod(pos, n)
    if (key, epoch) not in orders:
        orders[key, epoch] = _permuted(n, key, epoch)
    return orders[key, epoch][i]


def _category(item) -> str | None:
    meta = item[1] if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict) else {}
    return meta.get("category")


def category_groups(items: list) -> dict[str, list[int]] | None:
    """{category: indices of its items} in sorted category order; None unless every item has metadata["category"]."""
    cats = [_category(it) for it in items]
    if not cats or any(c is None for c in cats):
        return None
    return {c: [i for i, x in enumerate(cats) if x == c] for c in sorted(set(cats))}


def prompts_at(items: list, seed: int, cursor: int, n: int, balance: str = "none") -> list:
    """Items cursor .. cursor+n of the stream.

    balance="none": each epoch is a fresh seeded permutation of `items`. balance="category" (items are
    (prompt, metadata) with metadata["category"]; otherwise as "none"): position p takes category p mod K of the
    K sorted categories and item p div K of that category's own stream (a seeded permutation per epoch).
    """
    if balance not in ("none", "category"):
        raise ValueError(f"prompts.balance must be 'none' or 'category', got {balance!r}")
    groups = category_groups(items) if balance == "category" else None
    orders: dict = {}
    if groups is None:
        return [items[_stream_index(len(items), str(seed), pos, orders)] for pos in range(cursor, cursor + n)]
    cats = list(groups)
    out = []
    for pos in range(cursor, cursor + n):
        k, j = pos % len(cats), pos // len(cats)
        group = groups[cats[k]]
        out.append(items[group[_stream_index(len(group), f"{seed}/{cats[k]}", j, orders)]])
    return out
