import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from policy.scales import prefix_tokens
from policy.scoring import teacher_forced_logits
from policy.sequence import left_pad, mask_from_groups
from policy.transformer import BackboneConfig, NextScaleConfig, NextScaleLM, interleaved_inv_freq, mrope_section
from tests.conftest import PROMPTS, SCHED


def _hf_qwen2(tmp_path, tie: bool):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, rope_theta=10000.0)
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero q/k/v biases so that the import of biases is checked too
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / "qwen2")
    return hf


def _text_logits(model: NextScaleLM, ids: torch.Tensor) -> torch.Tensor:
    b, t = ids.shape
    tmask = torch.ones(b, t, dtype=torch.bool)
    mask = mask_from_groups(tmask, torch.arange(t))
    pos = torch.arange(t, dtype=torch.float)[None, None].expand(3, b, t)
    return model.lm_head(model(model.text_embeds(ids), mask, pos))


def test_import_hf_qwen2_reproduces_text_logits(tmp_path):
    for tie in (False, True):
        hf = _hf_qwen2(tmp_path, tie)
        model = NextScaleLM.from_qwen2(tmp_path / "qwen2", SCHED, num_codes=32, code_dim=8).eval()
        assert model.cfg.vocab_size == 100 + 32 + 2
        ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = hf(ids).logits
            ours = _text_logits(model, ids)[..., :100]
        assert (ours - ref).abs().max() < 1e-4


def test_save_load_round_trip(model, vq, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "m" / "model.safetensors").exists()
    loaded = NextScaleLM.from_pretrained(tmp_path / "m")
    codes = [torch.randint(0, 64, (3, h, w)) for h, w in SCHED]
    with torch.no_grad():
        a = teacher_forced_logits(model, vq, PROMPTS, codes, len(SCHED))
        b = teacher_forced_logits(loaded, vq, PROMPTS, codes, len(SCHED))
    assert torch.equal(a, b)


def test_prefix_forward_equals_full_forward_first_m_scales(model, vq):
    codes = [torch.randint(0, 64, (3, h, w), generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(SCHED)]
    with torch.no_grad():
        full = teacher_forced_logits(model, vq, PROMPTS, codes, len(SCHED))
        for m in (1, 3, 4):
            prefix = teacher_forced_logits(model, vq, PROMPTS, codes[:m], m)
            n = prefix_tokens(SCHED, m)
            assert prefix.shape[1] == n
            assert (prefix - full[:, :n]).abs().max() < 1e-4


def test_later_scales_do_not_change_earlier_logits(model, vq):
    codes = [torch.randint(0, 64, (1, h, w)) for h, w in SCHED]
    other = [c.clone() for c in codes]
    other[4] = (other[4] + 1) % 64  # change the codes of scale 5 (inputs of scale 6)
    with torch.no_grad():
        a = teacher_forced_logits(model, vq, PROMPTS[:1], codes, len(SCHED))
        b = teacher_forced_logits(model, vq, PROMPTS[:1], other, len(SCHED))
    n5 = prefix_tokens(SCHED, 5)
    assert torch.equal(a[:, :n5], b[:, :n5]) and not torch.equal(a[:, n5:], b[:, n5:])


def test_mrope_section_matches_qwen25vl():
    assert mrope_section(128) == [16, 24, 24]
    assert sum(mrope_section(16)) == 8


def test_interleaved_inv_freq_deals_every_third_frequency_to_each_axis():
    freq = 1.0 / 10000 ** (torch.arange(0, 32, 2).float() / 32)  # head_dim 32: 16 frequencies, highest first
    out = interleaved_inv_freq(freq, [4, 6, 6])
    # by hand: ranks 0,3,6,9 -> scale; 1,4,7,10,12,14 -> y; 2,5,8,11,13,15 -> x (scale's block is full after 9)
    assert torch.equal(out, freq[[0, 3, 6, 9, 1, 4, 7, 10, 12, 14, 2, 5, 8, 11, 13, 15]])


def _column_turn(interleave: bool) -> float:
    """Largest angle (rad) between the rotary embeddings of two image tokens 7 columns apart on the 8x8 grid."""
    cfg = NextScaleConfig(backbone=BackboneConfig(hidden_size=128, num_attention_heads=4, rope_interleave=interleave),
                          schedule=SCHED, text_vocab_size=30, num_codes=64, code_dim=16)
    rotary = NextScaleLM(cfg).backbone.rotary_emb
    pos = torch.tensor([[5.0, 5.0], [6.0, 6.0], [6.0, 13.0]])[:, None]  # (3 axes, B=1, 2 tokens): x = 6 vs 13
    cos, sin = rotary(torch.zeros(1), pos)  # (1, 2, head_dim)
    turn = torch.atan2(sin[0, 1] * cos[0, 0] - cos[0, 1] * sin[0, 0], cos[0, 0] * cos[0, 1] + sin[0, 0] * sin[0, 1])
    return float(turn.abs().max())


def test_interleaved_rope_lets_the_model_tell_columns_apart():
    """Qwen2.5-VL's contiguous split gives x only the lowest frequencies: 7 columns turn by < 0.03 rad (the shipped
    policy cannot tell columns apart); interleaved, the same 7 columns turn by over 1 rad."""
    assert _column_turn(False) < 0.03 and _column_turn(True) > 1.0


def test_left_padding_does_not_change_logits(model, vq):
    codes = [torch.randint(0, 64, (1, h, w)) for h, w in SCHED]
    with torch.no_grad():
        alone = teacher_forced_logits(model, vq, [PROMPTS[1]], codes, 4)
        batched = teacher_forced_logits(model, vq, [PROMPTS[1], PROMPTS[2]], [torch.cat([c, c]) for c in codes], 4)
    assert (alone[0] - batched[0]).abs().max() < 1e-4
    assert left_pad([[1, 2], [3]], 0)[0].tolist() == [[1, 2], [0, 3]]


def test_interleaved_rope_survives_automodel_loading(tmp_path):
    """transformers re-initialises the rotary buffer when it loads a model: the interleaved order must survive."""
    import policy  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel

    cfg = NextScaleConfig(backbone=BackboneConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=1, rope_interleave=True),
                          schedule=SCHED, text_vocab_size=30, num_codes=64, code_dim=16)
    model = NextScaleLM(cfg)
    model.save_pretrained(tmp_path)
    expected = interleaved_inv_freq(1.0 / 10000 ** (torch.arange(0, 32, 2).float() / 32), [4, 6, 6])
    for loaded in (AutoModel.from_pretrained(tmp_path), NextScaleLM.from_pretrained(tmp_path)):
        assert torch.allclose(loaded.backbone.rotary_emb.inv_freq, expected)
