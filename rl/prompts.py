"""The prompt stream: an endless, seeded sequence of (prompt, metadata) with a cursor saved in checkpoints."""
from __future__ import annotations

import random

from rl.config import PromptsConfig


def load_prompts(cfg: PromptsConfig) -> list[tuple[str, dict]]:
    """From a Parquet file (`prompt` column, optional `spec`), or the shapes world's split."""
    if cfg.path:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(cfg.path)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise ValueError(f"prompts.path: {cfg.path} is not a readable Parquet file ({type(e).__name__})") from None
        if "prompt" not in table.column_names:
            raise ValueError(f"prompts.path: {cfg.path} has no 'prompt' column (columns: {table.column_names})")
        prompts = table["prompt"].to_pylist()
        specs = table["spec"].to_pylist() if "spec" in table.column_names else [None] * len(prompts)
        items = [(p, {"spec": s} if s else {}) for p, s in zip(prompts, specs)]
    else:
        from policy.shapes import all_specs, caption, split_prompts

        specs = all_specs() if cfg.split == "all" else getattr(split_prompts(), cfg.split)
        items = [(caption(s), {"spec": s.to_json()}) for s in specs]
    bad = [i for i, (p, _) in enumerate(items) if not isinstance(p, str) or not p.strip()]
    if not items or bad:
        raise ValueError(f"prompts: {'no prompts' if not items else f'empty prompt at row {bad[0]}'} in "
                         f"{cfg.path or cfg.split}")
    return items


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


