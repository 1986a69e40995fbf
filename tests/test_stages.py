"""Each earlier stage runs a few steps as a real Ray Train job on a local Ray (2 CPU workers where it makes sense)."""
import json

import open_clip
import pytest
import torch

from policy.io import Policy
from policy.sampler import sample
from policy.stages.common import launch, lr_at, sample_specs, step_rng
from policy.stages.pretrain import Phase, PretrainConfig, phase_at
from policy.stages.pretrain import train_fn as pretrain_fn
from policy.stages.reward_model import RewardModelConfig
from policy.stages.reward_model import train_fn as clip_fn
from policy.stages.sft import SFTConfig
from policy.stages.tokenizer import TokenizerStageConfig, psnr
from policy.stages.tokenizer import train_fn as tokenizer_fn
from policy.tokenizer import MultiScaleVQ, VQConfig
from rewards.judge_train import JudgeStageConfig
from rewards.judge_train import train_fn as judge_fn
from tests.conftest import SCHED

pytestmark = pytest.mark.slow
TINY_VQ = VQConfig(schedule=SCHED, channels=[8, 8, 8], code_dim=8, num_codes=32)
TINY_BACKBONE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1)


@pytest.fixture(scope="module")
def stage_outputs(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    common = dict(storage=str(root), log_every=1)
    tok = launch(tokenizer_fn, TokenizerStageConfig(name="tok", num_workers=2, steps=3, batch_size=4,
                                                     checkpoint_every=3, vq=TINY_VQ, **common))
    pre = launch(pretrain_fn, PretrainConfig(
        name="pre", num_workers=2, batch_size=4, vq_path=str(tok), backbone=TINY_BACKBONE, checkpoint_every=2,
        phases=[Phase(steps=2, scales=3, freeze_backbone=True), Phase(steps=2, alpha=0.9)], **common))
    sft = launch(pretrain_fn, SFTConfig(name="sft", num_workers=1, batch_size=4, policy_path=str(pre),
                                        phases=[Phase(steps=2, alpha=0.9)], **common))
    clip = launch(clip_fn, RewardModelConfig(name="clip", num_workers=2, steps=2, batch_size=8, checkpoint_every=2,
                                             **common))
    judge = launch(judge_fn, JudgeStageConfig(name="judge", num_workers=2, steps=2, batch_size=4, checkpoint_every=2,
                                              heldout_examples=8, **common))
    return {"tok": tok, "pre": pre, "sft": sft, "clip": clip, "judge": judge}


def _metrics(path):
    return json.loads((path / "metrics.json").read_text())


def test_tokenizer_stage(stage_outputs):
    out = stage_outputs["tok"]
    m = _metrics(out)
    assert m["step"] == 3 and "psnr" in m and all(f"usage/scale{s}" in m for s in range(1, 7))
    vq = MultiScaleVQ.from_pretrained(out)
    assert vq.cfg == TINY_VQ


def test_pretrain_and_sft_stages(stage_outputs):
    m = _metrics(stage_outputs["pre"])
    assert m["step"] == 4 and m["scales"] == 6 and all(f"ce/scale{s}" in m for s in range(1, 7))
    for key in ("pre", "sft"):
        policy = Policy.load(stage_outputs[key])
        out = sample(policy.model, policy.vq, policy.encode_prompts(["a red circle"]), [0])
        assert out.images.shape == (1, 3, 64, 64)
    assert _metrics(stage_outputs["sft"])["step"] == 2


def test_reward_model_stage_loads_in_open_clip(stage_outputs):
    path = stage_outputs["clip"]
    model = open_clip.create_model(f"local-dir:{path}")
    tok = open_clip.get_tokenizer(f"local-dir:{path}")
    with torch.no_grad():
        feats = model.encode_text(tok(["a red circle", "two blue squares"]))
    assert feats.shape == (2, 64)
    assert "i2t_acc" in _metrics(path)


def test_judge_stage_exports_a_folder_transformers_loads(stage_outputs):
    from transformers import Blip2ForConditionalGeneration

    from rewards.judge_model import load_processor

    path = stage_outputs["judge"]
    m = _metrics(path)
    assert m["step"] == 2 and 0.0 <= m["heldout_acc"] <= 1.0
    model = Blip2ForConditionalGeneration.from_pretrained(path)
    processor = load_processor(path)
    assert model.config.architectures == ["Blip2ForConditionalGeneration"]
    assert processor.tokenizer.convert_tokens_to_ids("yes") != processor.tokenizer.unk_token_id


def test_a_gpu_stage_on_a_cpu_cluster_is_one_line_naming_use_gpu(local_ray, tmp_path):
    with pytest.raises(ValueError, match=r"^use_gpu: asks for 2 GPU\(s\) .* the cluster has 0"):
        launch(clip_fn, RewardModelConfig(name="gpu", storage=str(tmp_path), num_workers=2, use_gpu=True))


def test_semantic_tokenizer_stage(local_ray, tmp_path):
    cfg = TokenizerStageConfig(name="sem", storage=str(tmp_path), num_workers=1, steps=2, batch_size=4, log_every=1,
                               vq=TINY_VQ.model_copy(update={"sem_dim": 8, "teacher": "shapes-clip-tiny"}))
    m = _metrics(launch(tokenizer_fn, cfg))
    assert "semantic" in m and "sem_commit" in m


def test_stage_helpers():
    cfg = PretrainConfig(name="x", vq_path="v", phases=[Phase(steps=3, scales=2), Phase(steps=5)],
                         lr=1.0, warmup_steps=2, min_lr_ratio=0.0)
    assert cfg.steps == 8 and phase_at(cfg.phases, 2).scales == 2 and phase_at(cfg.phases, 3).scales is None
    assert [lr_at(s, cfg) for s in (0, 1, 2)] == [0.5, 1.0, 1.0] and lr_at(8, cfg) == pytest.approx(0.0)
    a = sample_specs(step_rng(0, 5, 1), 8)
    assert a == sample_specs(step_rng(0, 5, 1), 8) and a != sample_specs(step_rng(0, 5, 0), 8)
    assert psnr(torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.1)).item() == pytest.approx(20.0)
    with pytest.raises(ValueError, match="policy_path"):
        SFTConfig(name="s")
    with pytest.raises(ValueError, match="vq_path"):
        PretrainConfig(name="p")
