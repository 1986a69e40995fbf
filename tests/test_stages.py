"""Each earlier stage runs a few steps as a real Ray Train job on a local Ray (2 CPU workers where it makes sense)."""
import json

import open_clip
import pytest
import torch

from policy.io import Policy
from policy.sampler import sample
from policy.stages.common import launch, lr_at, sample_specs, step_rng
from policy.stages.pretrain import Phase, PretrainConfig, build, make_optimizer, make_step_fn, phase_at
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
TINY_VQ = VQConfig(schedule=SCHED, channels=[8, 8, 8], code_dim=8, num_codes=32, sem_dim=8,
                   teacher="shapes-clip-tiny")  # with the semantic branch: its teacher rides along in DDP
TINY_BACKBONE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1)


@pytest.fixture(scope="module")
def stage_outputs(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    common = dict(storage=str(root), log_every=1)
    tok = launch(tokenizer_fn, TokenizerStageConfig(name="tok", num_workers=2, steps=3, batch_size=4,
                                                     checkpoint_every=3, vq=TINY_VQ, **common))
    pre = launch(pretrain_fn, pretrain_config(str(tok), storage=str(root)))
    sft = launch(pretrain_fn, SFTConfig(name="sft", num_workers=1, batch_size=4, policy_path=str(pre),
                                        phases=[Phase(steps=2, alpha=0.9)], **common))
    clip = launch(clip_fn, RewardModelConfig(name="clip", num_workers=2, steps=2, batch_size=8, checkpoint_every=2,
                                             **common))
    judge = launch(judge_fn, JudgeStageConfig(name="judge", num_workers=2, steps=2, batch_size=4, checkpoint_every=2,
                                              heldout_examples=8, **common))
    return {"tok": tok, "pre": pre, "sft": sft, "clip": clip, "judge": judge, "root": root}


def pretrain_config(vq_path: str, **over) -> PretrainConfig:  # 2 workers, a frozen-backbone phase, then the full schedule
    return PretrainConfig(name="pre", num_workers=2, batch_size=4, vq_path=vq_path, backbone=TINY_BACKBONE,
                          checkpoint_every=1, keep_checkpoints=4, log_every=1, weight_decay=0.05,
                          phases=[Phase(steps=2, scales=3, freeze_backbone=True), Phase(steps=2, alpha=0.9)], **over)


def _metrics(path):
    return json.loads((path / "metrics.json").read_text())


def test_tokenizer_stage(stage_outputs):
    out = stage_outputs["tok"]
    m = _metrics(out)
    assert m["step"] == 3 and "psnr" in m and all(f"usage/scale{s}" in m for s in range(1, 7))
    assert "semantic" in m and "sem_commit" in m
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


def hand_averaged_losses(cfg: PretrainConfig, ranks: int = 2) -> list[float]:
    """Rank 0's loss per step of the pre-DDP path, in one process: each rank's batch and seed as the workers draw
    them, gradients averaged by hand (a parameter no rank touched gets a zero gradient, as the old all-reduce gave)."""
    torch.manual_seed(cfg.seed)
    policy = build(cfg)
    opt, fns, losses = make_optimizer(cfg, policy.model), [make_step_fn(cfg, policy, r) for r in range(ranks)], []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        for rank, fn in enumerate(fns):
            torch.manual_seed(hash((cfg.seed, step, rank)) % 2**31)
            loss, _ = fn(step)
            (loss / ranks).backward()
            losses += [loss.item()] if rank == 0 else []
        params = [p for p in policy.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    return losses


def test_pretrain_on_ray_train_ddp_matches_hand_averaged_gradients(stage_outputs):
    """2 workers under Ray Train's DDP (prepare_model, gloo) follow the loss curve of the hand-averaged path,
    through a frozen-backbone phase and the switch to the full schedule."""
    runs = sorted((stage_outputs["root"] / "pre").glob("checkpoint_*/metrics.json"))
    ddp = [m["loss"] for m in sorted((json.loads(p.read_text()) for p in runs), key=lambda m: m["step"])]
    reference = hand_averaged_losses(pretrain_config(str(stage_outputs["tok"])))
    print("ddp", ddp, "hand-averaged", reference)
    assert len(ddp) == 4 and ddp == pytest.approx(reference, abs=1e-4)
    assert ddp[0] != pytest.approx(ddp[3], abs=1e-3)  # it trained
    alone = hand_averaged_losses(pretrain_config(str(stage_outputs["tok"])), ranks=1)  # rank 0 without averaging
    assert alone[1:] != pytest.approx(ddp[1:], abs=1e-4)  # so the comparison can tell averaged from not


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
