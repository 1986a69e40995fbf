"""Model folders the Hugging Face ecosystem opens: Auto classes, sharded safetensors, old folders, agreement checks."""
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel

import policy  # noqa: F401  (registers the Auto classes)
from policy.hf import NextScaleHFConfig
from policy.io import INDEX_FILE, WEIGHTS_FILE, Policy, PolicyConfig, build_policy
from policy.scoring import teacher_forced_logits
from policy.text_tokenizer import train_word_tokenizer
from policy.tokenizer import MultiScaleVQ, VQConfig
from policy.transformer import NextScaleLM, NextScaleModel
from tests.conftest import TINY_POLICY

PROMPTS = [[3, 4, 5], [6, 7]]


def tiny_policy(seed: int = 0, **backbone) -> Policy:
    return build_policy(PolicyConfig(seed=seed, vq=TINY_POLICY["vq"], backbone={**TINY_POLICY["backbone"], **backbone}))


def logits(model, vq) -> torch.Tensor:
    codes = [torch.randint(0, vq.cfg.num_codes, (len(PROMPTS), h, w), generator=torch.Generator().manual_seed(i))
             for i, (h, w) in enumerate(vq.schedule)]
    with torch.no_grad():
        return teacher_forced_logits(model, vq, PROMPTS, codes, len(vq.schedule))


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("tie", [False, True])
def test_auto_model_opens_a_saved_policy_with_the_same_logits(tmp_path, tie):
    tiny_policy(tie_word_embeddings=tie).save(tmp_path / "p")
    folder = tmp_path / "p" / "transformer"
    written = json.loads((folder / "config.json").read_text())
    assert written["model_type"] == "nextscale" and written["architectures"] == ["NextScaleModel"]
    assert written["schedule"] == [[s, s] for s in (1, 2, 3, 4, 6, 8)]  # rl/config.py reads it
    assert isinstance(AutoConfig.from_pretrained(folder), NextScaleHFConfig)
    assert AutoConfig.from_pretrained(tmp_path / "p" / "vq").model_type == "nextscale_vq"
    hf = AutoModel.from_pretrained(folder)
    ours = Policy.load(tmp_path / "p")
    assert isinstance(hf, NextScaleModel) and not hf.training
    assert same_state(hf, ours.model)
    assert (hf.lm_head.weight is hf.backbone.embed_tokens.weight) == tie
    assert torch.equal(logits(hf, ours.vq), logits(ours.model, ours.vq))


def test_sharded_weights_write_an_index_and_load_back_identically(tmp_path):
    pol = tiny_policy()
    pol.save(tmp_path / "p", max_shard_size=20_000)
    folder = tmp_path / "p" / "transformer"
    index = json.loads((folder / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (folder / WEIGHTS_FILE).exists()
    assert all((folder / s).exists() for s in shards)
    loaded = Policy.load(tmp_path / "p")
    assert same_state(loaded.model, pol.model) and same_state(AutoModel.from_pretrained(folder), pol.model)
    pol.save(tmp_path / "p")  # saved again unsharded: the folder is replaced whole, no stale shards or index
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", WEIGHTS_FILE]


def test_a_folder_in_the_old_format_still_loads(tmp_path):
    """The layout written before model_type and sharding: bare pydantic config.json + one model.safetensors."""
    pol = tiny_policy(seed=2)
    root = tmp_path / "old"
    for name, module in (("transformer", pol.model), ("vq", pol.vq)):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(module.cfg.model_dump_json(indent=2))
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, root / name / WEIGHTS_FILE)
    pol.tokenizer.save_pretrained(str(root / "text_tokenizer"))
    loaded = Policy.load(root)
    assert same_state(loaded.model, pol.model) and same_state(loaded.vq, pol.vq)
    assert torch.equal(logits(loaded.model, loaded.vq), logits(pol.model, pol.vq))


def _replace_vq(root, **cfg) -> None:
    fields = {"channels": [8, 8, 8], "code_dim": 8, "num_codes": 32, "schedule": [(s, s) for s in (1, 2, 3, 4, 6, 8)]}
    MultiScaleVQ(VQConfig(**{**fields, **cfg})).save_pretrained(root / "vq")


@pytest.mark.parametrize("field, cfg", [
    ("num_codes", {"num_codes": 48}),
    ("code_dim", {"code_dim": 4}),
    ("schedule", {"schedule": [(1, 1), (2, 2), (4, 4), (8, 8)]}),
])
def test_policy_load_refuses_a_tokenizer_the_transformer_disagrees_with(tmp_path, field, cfg):
    tiny_policy().save(tmp_path / "p")
    _replace_vq(tmp_path / "p", **cfg)
    with pytest.raises(ValueError) as e:
        Policy.load(tmp_path / "p")
    msg = str(e.value)
    assert "\n" not in msg and f"disagree on {field}:" in msg, msg
    assert str(tmp_path / "p" / "transformer") in msg and str(tmp_path / "p" / "vq") in msg, msg


def test_policy_load_refuses_a_text_tokenizer_larger_than_the_text_vocabulary(tmp_path):
    tiny_policy().save(tmp_path / "p")
    train_word_tokenizer([f"w{i}" for i in range(100)]).save_pretrained(str(tmp_path / "p" / "text_tokenizer"))
    with pytest.raises(ValueError, match=r"disagree on text_vocab_size: the tokenizer has 102 tokens"):
        Policy.load(tmp_path / "p")


def test_a_folder_of_another_model_type_is_refused(tmp_path):
    tiny_policy().save(tmp_path / "p")
    file = tmp_path / "p" / "transformer" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "model_type": "qwen2"}))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'qwen2', expected 'nextscale'$"):
        NextScaleLM.from_pretrained(file.parent)
