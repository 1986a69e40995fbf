import torch

from policy.scales import scale_offsets, tiny_schedule
from policy.sequence import (attention_mask, block_ranges, group_ids, left_pad, position_ids, same_padding_rows,
                             sequence_length)

SCHED = tiny_schedule()


def _allowed(text_mask, k):
    return attention_mask(text_mask, SCHED, k)[:, 0] == 0  # (B, L, L) bool


def test_block_causal_mask():
    ids, tmask = left_pad([[5, 6, 7], [8]], pad_id=0)
    k = len(SCHED)
    allowed = _allowed(tmask, k)
    t = ids.shape[1]
    blocks = block_ranges(t, SCHED, k)
    assert allowed.shape[-1] == sequence_length(t, SCHED, k) == t + 130
    for s, (a, b) in enumerate(blocks[1:], start=2):
        # every position of a scale block attends to its whole own block ...
        assert allowed[:, a:b, a:b].all()
        # ... and to no later scale
        assert not allowed[:, a:b, b:].any()
        # ... and to all real text, <boi> and earlier blocks
        assert allowed[0, a:b, :a].all()
    # <boi> and text are causal
    assert not allowed[0, :t + 1, :t + 1][torch.triu(torch.ones(t + 1, t + 1, dtype=torch.bool), 1)].any()
    # padding: pad keys are never attended except by the pad query itself
    assert not allowed[1, t:, : t - 1].any()
    assert allowed[1, 0, 0] and not allowed[1, 1, 0]


def test_mask_independent_check_via_scale_of_each_position():
    """Second construction: allowed iff scale(key) <= scale(query), with text/<boi> causal as scale 0."""
    tmask = torch.ones(1, 2, dtype=torch.bool)
    allowed = _allowed(tmask, 4)[0]
    off = scale_offsets(SCHED)
    scale_of = [0, 0, 0] + [s for s in range(2, 5) for _ in range(off[s] - off[s - 1])]
    for q in range(len(scale_of)):
        for kk in range(len(scale_of)):
            if scale_of[q] == 0 or scale_of[kk] == 0:
                expect = kk <= q
            else:
                expect = scale_of[kk] <= scale_of[q]
            assert bool(allowed[q, kk]) == expect, (q, kk)


def test_positions_multiscale_rope():
    ids, tmask = left_pad([[5, 6, 7], [8]], pad_id=0)
    pos = position_ids(tmask, SCHED, len(SCHED))
    t = ids.shape[1]
    assert pos.shape == (3, 2, t + 130)
    # text (t, t, t) counted from the first real token; <boi> at P = text length
    assert pos[:, 0, :t + 1].tolist() == [[0, 1, 2, 3]] * 3
    assert pos[:, 1, t - 1 : t + 1].tolist() == [[0, 1]] * 3
    blocks = block_ranges(t, SCHED, len(SCHED))
    for s, (a, b) in enumerate(blocks[1:], start=2):
        p = pos[:, 0, a:b]
        assert (p[0] == 3 + s).all()  # scale index on the first axis
        # every scale spans the same normalised range: centred on the grid centre
        assert torch.allclose(p[1].mean(), torch.tensor(3 + 1 + 3.5)) and torch.allclose(p[2].mean(), torch.tensor(7.5))
    last = pos[:, 0, blocks[-1][0] : blocks[-1][1]]
    assert last[1].min() == 4 and last[1].max() == 11  # final 8x8 grid at integer coordinates


def test_group_ids_share_within_scale():
    g = group_ids(2, SCHED, 3)
    assert g.tolist() == [0, 1, 2] + [3] * 4 + [4] * 9


def test_rows_with_one_padding_share_one_mask_and_scores_match_per_row_masks():
    """(1, 1, L, L) for rows of one text length; the scorer runs one forward per length, and its logits equal
    those of the per-row (B, 1, L, L) mask of before, row for row."""
    from policy.scoring import teacher_forced_logits
    from tests.conftest import tiny_model, tiny_vq

    _, same = left_pad([[5, 6], [7, 8]], pad_id=0)
    assert attention_mask(same, SCHED, 4).shape[:2] == (1, 1)
    _, mixed = left_pad([[5, 6], [7]], pad_id=0)
    assert attention_mask(mixed, SCHED, 4).shape[:2] == (2, 1)
    assert [g.tolist() for g in same_padding_rows(left_pad([[1], [2, 3], [4], [5, 6, 7]], 0)[1])] == [[0, 2], [1], [3]]

    model, vq, k = tiny_model(), tiny_vq(), 4
    text = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12], [6, 9]]
    g = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, 64, (4, h, w), generator=g) for h, w in SCHED]
    with torch.no_grad():
        grouped = teacher_forced_logits(model, vq, text, codes, k)
        ids, tmask = left_pad(text, model.cfg.pad_token_id)
        per_row = torch.cat([attention_mask(tmask[i:i + 1], SCHED, k) for i in range(4)])       # (B, 1, L, L)
        parts = [model.text_embeds(ids), model.boi_embeds(4)]
        parts += [model.image_embeds(vq.scale_inputs(codes[s - 2], SCHED[s - 1]), s) for s in range(2, k + 1)]
        hidden = model(torch.cat(parts, 1), per_row, position_ids(tmask, SCHED, k))
        before = model.image_logits(hidden[:, ids.shape[1]:])
    assert grouped.shape == before.shape and (grouped - before).abs().max() < 1e-5
