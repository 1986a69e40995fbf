import math

import torch
import torch.nn.functional as F

from policy.losses import next_scale_loss
from policy.scales import scale_index_per_token, scale_weights, tiny_schedule


def test_next_scale_loss_hand_worked():
    # two scales of 1 and 2 tokens, uniform logits over 2 codes: every CE = log 2
    logits = torch.zeros(1, 3, 2)
    targets = torch.tensor([[0, 1, 0]])
    k = torch.tensor([1.5, 0.75])  # sum n_s k_s = 1.5 + 1.5 = 3 = sum n_s
    loss, per_scale = next_scale_loss(logits, targets, torch.tensor([0, 1, 1]), k)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert torch.allclose(per_scale, torch.full((2,), math.log(2)))


def test_next_scale_loss_second_implementation():
    torch.manual_seed(0)
    sched = tiny_schedule()
    n = 130
    logits, targets = torch.randn(3, n, 11), torch.randint(0, 11, (3, n))
    idx = scale_index_per_token(sched)
    k = scale_weights(sched, 0.9)
    loss, per_scale = next_scale_loss(logits, targets, idx, k)
    total, counts, sums = 0.0, [0] * 6, [0.0] * 6
    for b in range(3):
        for t in range(n):
            ce = -F.log_softmax(logits[b, t], -1)[targets[b, t]].item()
            total += k[idx[t]].item() * ce
            sums[idx[t]] += ce
            counts[idx[t]] += 1
    assert math.isclose(loss.item(), total / (3 * n), rel_tol=1e-5)
    assert torch.allclose(per_scale, torch.tensor([s / c for s, c in zip(sums, counts)]), rtol=1e-5)
