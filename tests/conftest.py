import random

import numpy as np
import pytest
import torch

from policy.scales import tiny_schedule
from policy.shapes import all_specs, render
from policy.tokenizer import MultiScaleVQ, VQConfig
from policy.transformer import BackboneConfig, NextScaleConfig, NextScaleLM

SCHED = tiny_schedule()


def shapes_batch(n: int, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    specs = all_specs()
    imgs = np.stack([render(rng.choice(specs), rng) for _ in range(n)])
    return torch.tensor(imgs).permute(0, 3, 1, 2).float() / 255


def tiny_model(seed: int = 0, **backbone) -> NextScaleLM:
    torch.manual_seed(seed)
    cfg = NextScaleConfig(backbone=BackboneConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, **backbone),
                          schedule=SCHED, text_vocab_size=30, num_codes=64, code_dim=16)
    model = NextScaleLM(cfg).eval()
    with torch.no_grad():  # sharpen the random head a little so sampling is not uniform
        model.lm_head.weight.mul_(20)
    return model


def tiny_vq(seed: int = 0, **kw) -> MultiScaleVQ:
    torch.manual_seed(seed)
    return MultiScaleVQ(VQConfig(schedule=SCHED, channels=[16, 16, 16], code_dim=16, num_codes=64, **kw)).eval()


@pytest.fixture(scope="session")
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def vq():
    return tiny_vq()


@pytest.fixture(scope="session")
def trained_vq():
    """A tokenizer trained for a few dozen steps on shapes scenes (enough for reconstruction to be meaningful)."""
    torch.manual_seed(0)
    vq = MultiScaleVQ(VQConfig(schedule=SCHED, channels=[16, 16, 16], code_dim=16, num_codes=128))
    data = shapes_batch(256, seed=1)
    opt = torch.optim.Adam(vq.parameters(), 2e-3)
    for step in range(60):
        idx = torch.randint(0, len(data), (16,), generator=torch.Generator().manual_seed(step))
        loss = vq.losses(data[idx])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vq.eval()


PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12]]
