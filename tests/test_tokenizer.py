import torch
import torch.nn.functional as F

from policy.teacher import SemanticTeacher
from policy.tokenizer import MultiScaleVQ, _sq_dist, sample_topk_codes
from tests.conftest import SCHED, shapes_batch, tiny_vq


def test_reconstruction_error_falls_as_scales_are_added(trained_vq):
    x = shapes_batch(64, seed=7)
    with torch.no_grad():
        enc = trained_vq.encode(x)
        img_err = [F.mse_loss(trained_vq.decode(enc.targets[:k]), x).item() for k in range(1, len(SCHED) + 1)]
        feat_err = [F.mse_loss(trained_vq.features(enc.targets[:k]), enc.f).item() for k in range(1, len(SCHED) + 1)]
    assert all(b < a for a, b in zip(feat_err, feat_err[1:])), feat_err
    assert all(b <= a * 1.02 for a, b in zip(img_err, img_err[1:])), img_err
    assert img_err[-1] < 0.6 * img_err[0], img_err


def test_code_round_trip_is_exact(vq, tmp_path):
    x = shapes_batch(4)
    with torch.no_grad():
        enc = vq.encode(x)
        # the codes alone rebuild exactly the features the encoder quantised to
        assert torch.equal(vq.features(enc.targets), enc.f_hat)
        # flat token sequence <-> per-scale grids
        flat = torch.cat([c.flatten(1) for c in enc.targets], 1)
        back = [g.view(c.shape) for g, c in zip(flat.split([h * w for h, w in SCHED], 1), enc.targets)]
        assert all(torch.equal(a, b) for a, b in zip(back, enc.targets))
        # save / load gives the same codes and the same decoded images
        vq.save_pretrained(tmp_path / "vq")
        vq2 = MultiScaleVQ.from_pretrained(tmp_path / "vq")
        enc2 = vq2.encode(x)
        assert all(torch.equal(a, b) for a, b in zip(enc.targets, enc2.targets))
        assert torch.equal(vq.decode(enc.targets), vq2.decode(enc2.targets))


def test_codes_are_nearest_in_fp32(vq):
    r = torch.randn(2, 16, 3, 3)
    d = vq.distances(r)
    ref = ((r.permute(0, 2, 3, 1)[..., None, :] - vq.pix_codebook.weight) ** 2).sum(-1)
    assert d.dtype == torch.float32
    assert torch.allclose(d, ref, atol=1e-5)
    assert torch.allclose(_sq_dist(torch.eye(2), torch.eye(2)), torch.tensor([[0.0, 2.0], [2.0, 0.0]]))


def test_self_correction(vq):
    x = shapes_batch(16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clean = vq.encode(x)
        sc = vq.encode(x, self_correct=0.6, topk=4, generator=g)
    # scale 1 sees no earlier perturbation: same targets; inputs differ on about 0.6 * 3/4 of tokens
    assert torch.equal(clean.targets[0], sc.targets[0])
    inp = torch.cat([c.flatten() for c in sc.inputs[1:]])
    tgt = torch.cat([c.flatten() for c in sc.targets[1:]])
    frac = (inp != tgt).float().mean().item()
    assert 0.3 < frac < 0.6, frac
    # later residuals come from the perturbed reconstruction
    assert torch.equal(vq.features(sc.inputs), sc.f_hat)
    assert any(not torch.equal(a, b) for a, b in zip(clean.targets[1:], sc.targets[1:]))
    # each perturbed input is among the 4 nearest codes of its residual
    d = torch.tensor([[0.0, 5.0, 1.0, 3.0, 2.0]])
    picks = {sample_topk_codes(d, 3, torch.Generator().manual_seed(i)).item() for i in range(50)}
    assert picks == {0, 2, 4}


def test_dual_codebook_with_open_clip_teacher():
    teacher = SemanticTeacher("shapes-clip-tiny", grid=SCHED[-1])
    vq = tiny_vq(sem_dim=8, teacher="shapes-clip-tiny")
    x = shapes_batch(4)
    feats = teacher(x)
    assert feats.shape == (4, teacher.dim, 8, 8) and not any(p.requires_grad for p in teacher.parameters())
    head = torch.nn.Conv2d(8, teacher.dim, 1)
    losses = vq.losses(x, teacher_feats=feats, sem_head=head)
    assert {"recon", "vq", "semantic", "sem_commit", "loss"} <= set(losses)
    losses["loss"].backward()
    assert vq.sem_codebook.weight.grad.abs().sum() > 0 and vq.sem_proj.weight.grad.abs().sum() > 0
    # the semantic branch takes part in the lookup: moving the semantic codebook changes the codes
    with torch.no_grad():
        before = vq.encode(x).targets
        vq.sem_codebook.weight.copy_(torch.randn_like(vq.sem_codebook.weight) * 10)
        after = vq.encode(x).targets
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_single_branch_has_no_semantic_parts(vq):
    assert not hasattr(vq, "sem_codebook")
    assert "semantic" not in vq.losses(shapes_batch(2))


def test_foreground_weights_and_dead_code_restart():
    from policy.tokenizer import foreground_weights

    img = torch.full((1, 3, 4, 4), 0.9)
    img[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    w = foreground_weights(img, 4.0)
    assert w[0, 0, 0, 0] == 5 and (w.flatten()[1:] == 1).all()
    assert torch.equal(foreground_weights(img, 0.0), torch.ones(1, 1, 4, 4))
    recon = img.clone()
    recon[0, :, 3, 3] = torch.tensor([1.0, 0.0, 0.0])  # paint spilled onto the background counts as foreground
    w = foreground_weights(img, 4.0, recon)
    assert w[0, 0, 0, 0] == 5 and w[0, 0, 3, 3] == 5 and w.sum() == 14 + 10
    vq = tiny_vq().train()
    enc = vq.encode(shapes_batch(4))
    used = vq.usage > 0
    assert vq.usage.sum() == 4 * 130 and not used.all()
    before = vq.pix_codebook.weight.detach().clone()
    n = vq.restart_dead_codes(enc, torch.Generator().manual_seed(0))
    after = vq.pix_codebook.weight.detach()
    assert n == int((~used).sum()) and torch.equal(after[used], before[used]) and not torch.equal(after[~used], before[~used])
    pool = torch.cat([r.permute(0, 2, 3, 1).reshape(-1, 16) for r in enc.residuals])
    assert all((pool == row).all(1).any() for row in after[~used][:5])  # new codes are real residual vectors
    assert vq.usage.sum() == 0
