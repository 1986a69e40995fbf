"""Scale schedules for next-scale prediction.

A schedule is a list of (h_s, w_s), s = 1..S, coarse to fine; scale s holds n_s = h_s * w_s tokens.
Everything here is pure Python / torch on small lists: no model state.
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import AfterValidator

Schedule = list[tuple[int, int]]

# NextFlow's 1:1 schedule, side length in tokens per scale (18 scales, 10,084 tokens at 1024 px).
NEXTFLOW_SIDES = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 48, 64]
NEXTFLOW_SCALES_AT_PX = {256: 12, 512: 16, 1024: 18}
# The embedded tiny "shapes" world: 64x64 px images, an 8x8 token grid (130 tokens).
TINY_SIDES = [1, 2, 3, 4, 6, 8]


def square_schedule(sides: list[int]) -> Schedule:
    return [(s, s) for s in sides]


def nextflow_schedule(px: int = 1024) -> Schedule:
    """NextFlow's 1:1 schedule at 256, 512 or 1024 px (its first 12, 16 or all 18 scales)."""
    if px not in NEXTFLOW_SCALES_AT_PX:
        raise ValueError(f"px: NextFlow schedules exist for {sorted(NEXTFLOW_SCALES_AT_PX)}, got {px}")
    return square_schedule(NEXTFLOW_SIDES[: NEXTFLOW_SCALES_AT_PX[px]])


def tiny_schedule() -> Schedule:
    return square_schedule(TINY_SIDES)


def validate_schedule(schedule: Schedule) -> Schedule:
    """Scale 1 must be a single token (the hidden state at <boi> predicts it); scales never shrink."""
    sched = [(int(h), int(w)) for h, w in schedule]
    if not sched:
        raise ValueError("schedule: empty")
    if sched[0] != (1, 1):
        raise ValueError(f"schedule: the first scale must be (1, 1), got {sched[0]}")
    for (h0, w0), (h1, w1) in zip(sched, sched[1:]):
        if h1 < h0 or w1 < w0:
            raise ValueError(f"schedule: scales must not shrink, ({h0}, {w0}) -> ({h1}, {w1})")
    return sched


# The one schedule field every config uses (policy, tokenizer, transformer): validated here and nowhere else.
ScheduleField = Annotated[list[tuple[int, int]], AfterValidator(validate_schedule)]


def token_counts(schedule: Schedule) -> list[int]:
    """n_s = h_s * w_s for each scale."""
    return [h * w for h, w in schedule]


def scale_offsets(schedule: Schedule) -> list[int]:
    """Start of each scale in the flat token sequence of all scales; last entry = total tokens."""
    offsets = [0]
    for n in token_counts(schedule):
        offsets.append(offsets[-1] + n)
    return offsets


def prefix_tokens(schedule: Schedule, m: int) -> int:
    """Number of image tokens in scales 1..m (what prefix-GRPO trains on)."""
    if not 1 <= m <= len(schedule):
        raise ValueError(f"m: must be in 1..{len(schedule)} (number of scales), got {m}")
    return scale_offsets(schedule)[m]


def scale_weights(schedule: Schedule, alpha: float) -> torch.Tensor:
    """k_s proportional to n_s^(-alpha), normalised so that sum_s n_s k_s = sum_s n_s.

    alpha = 0 gives k_s = 1 (plain per-token mean); larger alpha up-weights coarse scales.
    """
    n = torch.tensor(token_counts(schedule), dtype=torch.float64)
    k = n.pow(-alpha)
    return (k * n.sum() / (k * n).sum()).float()


def scale_index_per_token(schedule: Schedule) -> torch.Tensor:
    """(total_tokens,) long: 0-based scale index of each flat token."""
    return torch.repeat_interleave(torch.arange(len(schedule)), torch.tensor(token_counts(schedule)))
