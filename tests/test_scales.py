import numpy as np
import pytest
import torch

from policy.scales import (
    nextflow_schedule, prefix_tokens, scale_index_per_token, scale_offsets, scale_weights, tiny_schedule,
    token_counts, validate_schedule,
)


def test_nextflow_token_counts():
    assert len(nextflow_schedule(1024)) == 18 and sum(token_counts(nextflow_schedule(1024))) == 10_084
    assert len(nextflow_schedule(256)) == 12 and sum(token_counts(nextflow_schedule(256))) == 900
    assert len(nextflow_schedule(512)) == 16 and sum(token_counts(nextflow_schedule(512))) == 3_684
    assert sum(token_counts(tiny_schedule())) == 130


def test_offsets_and_prefix():
    sched = tiny_schedule()
    assert scale_offsets(sched) == [0, 1, 5, 14, 30, 66, 130]
    assert prefix_tokens(sched, 4) == 30
    assert prefix_tokens(nextflow_schedule(1024), 8) == sum(s * s for s in range(1, 9)) == 204
    with pytest.raises(ValueError, match="m:"):
        prefix_tokens(sched, 7)
    idx = scale_index_per_token(sched)
    assert idx.tolist()[:6] == [0, 1, 1, 1, 1, 2] and idx[-1] == 5 and len(idx) == 130


def test_scale_weights_hand_worked():
    # n = [1, 4], alpha = 1: k ~ [1, 1/4]; sum n k' = 2, sum n = 5 -> k = [2.5, 0.625]
    k = scale_weights([(1, 1), (2, 2)], 1.0)
    assert torch.allclose(k, torch.tensor([2.5, 0.625]))
    assert torch.allclose(scale_weights(tiny_schedule(), 0.0), torch.ones(6))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.3])
def test_scale_weights_second_implementation(alpha):
    sched = nextflow_schedule(1024)
    n = np.array([h * w for h, w in sched], dtype=np.float64)
    raw = np.exp(-alpha * np.log(n))
    ref = raw / np.dot(raw, n) * n.sum()
    k = scale_weights(sched, alpha).double().numpy()
    np.testing.assert_allclose(k, ref, rtol=1e-6)
    assert abs(np.dot(k, n) - n.sum()) / n.sum() < 1e-6
    if alpha > 0:
        assert np.all(np.diff(k) < 0)  # coarse scales weigh more per token


def test_schedule_validation():
    with pytest.raises(ValueError, match="first scale"):
        validate_schedule([(2, 2), (4, 4)])
    with pytest.raises(ValueError, match="shrink"):
        validate_schedule([(1, 1), (4, 4), (2, 2)])
    with pytest.raises(ValueError, match="px"):
        nextflow_schedule(300)
