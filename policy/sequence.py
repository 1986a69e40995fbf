"""The token sequence of next-scale prediction: layout, block-causal mask, multiscale 3D RoPE positions.

    [text (left-padded to T)] <boi> [inputs for scale 2] ... [inputs for scale k]
    index:  0 .. T-1            T    T+1 ...

The hidden state at <boi> predicts scale 1; the hidden states over the inputs of scale s predict scale s.
Pure functions of the text mask and the schedule, so the sampler (block by block, with a KV cache), the
teacher-forced scorer and the tests all use the same layout.
"""
from __future__ import annotations

import torch

from policy.scales import Schedule, scale_offsets


def sequence_length(text_len: int, schedule: Schedule, k: int) -> int:
    """Length of text + <boi> + inputs of scales 2..k."""
    return text_len + 1 + scale_offsets(schedule)[k] - 1


def block_ranges(text_len: int, schedule: Schedule, k: int) -> list[tuple[int, int]]:
    """[start, end) of the positions whose hidden states predict scale s, for s = 1..k.

    Scale 1 is predicted by <boi> (range [T, T+1)); scale s >= 2 by its own input block.
    """
    off = scale_offsets(schedule)
    return [(text_len + off[s], text_len + off[s + 1]) if s else (text_len, text_len + 1) for s in range(k)]


def group_ids(text_len: int, schedule: Schedule, k: int) -> torch.Tensor:
    """(L,) long: a position may attend to a key iff group[key] <= group[query].

    Text and <boi> get their own index (causal); every token of one scale's input block shares one id (full
    attention within a scale, causal across scales).
    """
    ids = [torch.arange(text_len + 1)]
    for s in range(2, k + 1):
        h, w = schedule[s - 1]
        ids.append(torch.full((h * w,), text_len + s - 1))
    return torch.cat(ids)


def mask_from_groups(text_mask: torch.Tensor, groups: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Additive 4-D mask (B, 1, L, L): 0 where group[key] <= group[query] and the key is real, dtype-min elsewhere.

    text_mask: (B, T) bool, True on real text tokens (left padding is False); positions past T are always real.
    A pad query attends to itself only, so no row is empty. Rows with one padding share one mask: (1, 1, L, L),
    broadcast over rows and heads (at 10k tokens a (B, 1, L, L) bf16 mask is 200 MB per row).
    """
    if bool((text_mask == text_mask[:1]).all()):
        text_mask = text_mask[:1]
    b, t = text_mask.shape
    n = groups.numel()
    allowed = groups[None, :] <= groups[:, None]                                            # (L, L)
    valid = torch.cat([text_mask, text_mask.new_ones(b, n - t)], dim=1)                     # (B, L)
    allowed = (allowed[None] & valid[:, None, :]) | torch.eye(n, dtype=torch.bool, device=text_mask.device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=text_mask.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def attention_mask(text_mask: torch.Tensor, schedule: Schedule, k: int, dtype=torch.float32) -> torch.Tensor:
    """Block-causal mask over text + <boi> + inputs of scales 2..k: (B, 1, L, L) additive; (1, 1, L, L) when every
    row has the same padding."""
    return mask_from_groups(text_mask, group_ids(text_mask.shape[1], schedule, k), dtype)


def same_padding_rows(text_mask: torch.Tensor) -> list[torch.Tensor]:
    """Row indices grouped by text length (in order of first appearance): each group shares one attention mask."""
    lengths = text_mask.sum(1)
    return [(lengths == n).nonzero().flatten() for n in dict.fromkeys(lengths.tolist())]


def position_ids(text_mask: torch.Tensor, schedule: Schedule, k: int) -> torch.Tensor:
    """(3, B, L) float multiscale 3D RoPE positions.

    Text token number t gets (t, t, t) and <boi> (P, P, P), P = number of real text tokens. An image token (i, j)
    of scale s gets (P + s, P + 1 + y_i, P + 1 + x_j) with y_i = (i + 0.5) * H / h_s - 0.5 (same for x): every scale
    spans the range of the final H x W grid, and the first axis carries the scale index.
    """
    b, t = text_mask.shape
    dev = text_mask.device
    text_pos = (text_mask.long().cumsum(1) - 1).clamp(min=0).float()                         # (B, T)
    p = text_mask.sum(1, keepdim=True).float()                                               # (B, 1)
    big_h, big_w = schedule[-1]
    rows = [[text_pos, p], [text_pos, p], [text_pos, p]]
    for s in range(2, k + 1):
        h, w = schedule[s - 1]
        y = ((torch.arange(h, device=dev) + 0.5) * big_h / h - 0.5)[:, None].expand(h, w).reshape(-1)
        x = ((torch.arange(w, device=dev) + 0.5) * big_w / w - 0.5)[None, :].expand(h, w).reshape(-1)
        rows[0].append((p + s).expand(b, h * w))
        rows[1].append(p + 1 + y[None])
        rows[2].append(p + 1 + x[None])
    return torch.stack([torch.cat([r.expand(b, -1) for r in row], dim=1) for row in rows])


def left_pad(batch: list[list[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids (B, T) long, mask (B, T) bool), left-padded to `length` (default: the longest)."""
    t = max([len(x) for x in batch] + [length or 0])
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.bool)
    for i, x in enumerate(batch):
        if x:
            ids[i, t - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, t - len(x):] = True
    return ids, mask
