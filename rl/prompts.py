"""The prompt stream: an endless, seeded sequence of (prompt, metadata) with a cursor saved in checkpoints."""
from __future__ import annotations

import random

from rl.config import PromptsConfig


def load_prompts(cfg: PromptsConfig) -> list[tuple[str, dict]]:
    """From a Parquet file (`prompt` column, optional `spec`), or the shapes world's split.

    A bad file is a one-line ValueError naming `prompts.path` and the cause.
    """
    if cfg.path:
        items = _read_prompt_file(cfg.path)
    else:
        from policy.shapes import all_specs, caption, split_prompts

        specs = all_specs() if cfg.split == "all" else getattr(split_prompts(), cfg.split)
        items = [(caption(s), {"spec": s.to_json()}) for s in specs]
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
    specs = table["spec"].to_pylist() if "spec" in table.column_names else [None] * len(prompts)
    if not prompts:
        raise ValueError(f"prompts.path: no prompts in {path} (0 rows)")
    return [(p, {"spec": s} if s else {}) for p, s in zip(prompts, specs)]


def prompts_at(items: list, seed: int, cursor: int, n: int) -> list:
    """Items cursor .. cursor+n of the stream: each epoch is a fresh seeded permutation of `items`."""
    orders: dict[int, list[int]] = {}
    out = []
    for pos in range(cursor, cursor + n):
        epoch, i = divmod(pos, len(items))
        if epoch not in orders:
            orders[epoch] = list(range(len(items)))
            random.Random(f"{seed}/epoch{epoch}").shuffle(orders[epoch])
        out.append(items[orders[epoch][i]])
    return out


