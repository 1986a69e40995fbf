"""Multi-scale residual VQ image tokenizer (VAR style, NextFlow's dual codebook).

    f = E(x)                                   (B, C, H, W)   H = W = final grid side
    f_hat = 0
    for each scale s with size (h_s, w_s):
        r_s   = area_down(f - f_hat, (h_s, w_s))               residual at this scale
        idx_s = argmin_k  d_sem(r_s, k) + w_pix * d_pix(r_s, k)  (fp32)
        f_hat = f_hat + phi(up(e_pix[idx_s], (H, W)))           phi: shared refinement conv
    x_hat = D(f_hat)

Dual codebook: each code index k owns a pixel vector e_pix[k] (C) and a semantic vector e_sem[k] (D_sem); the
residual is projected to the semantic space by a 1x1 conv to measure d_sem. The semantic vectors are aligned to a
frozen vision encoder's patch features during tokenizer training. sem_dim = 0 gives a single-branch tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from policy.hf import VQ_MODEL_TYPE
from policy.scales import Schedule, ScheduleField


class VQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schedule: ScheduleField = Field(description="the (h, w) token grid of every scale, coarse to fine")
    image_size: int = Field(64, description="image side in pixels")
    channels: list[int] = Field([32, 64, 64], description="encoder width after the stem and at each stride-2 stage")
    code_dim: int = Field(32, description="pixel code vector size (= latent channels)")
    num_codes: int = Field(512, description="codebook size")
    sem_dim: int = Field(0, description="semantic code size of the dual codebook (0: pixel codes only)")
    pix_weight: float = Field(1.0, description="w in the code distance d_sem + w * d_pix")
    refine_ratio: float = Field(0.5, description="r in the shared refinement phi(z) = (1 - r) z + r conv(z)")
    teacher: str | None = Field(None, description="open_clip model name of the frozen semantic teacher")
    teacher_pretrained: str | None = Field(None, description="the teacher's pretrained tag or weights file")

    @property
    def grid(self) -> tuple[int, int]:
        return self.schedule[-1]

    @property
    def downsample(self) -> int:
        h, w = self.grid
        if self.image_size % h or self.image_size % w or h != w:
            raise ValueError(f"image_size: {self.image_size} is not a multiple of the final grid {self.grid}")
        return self.image_size // h


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(min(8, cin), cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))


class Encoder(nn.Module):
    """len(channels) stride-2 stages; the first one patchifies straight from pixels (cheap at full resolution)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        stages = cfg.downsample.bit_length() - 1  # log2(downsample) stride-2 stages
        ch = cfg.channels
        if len(ch) != stages:
            raise ValueError(f"channels: need {stages} entries for a {cfg.downsample}x downsample, got {len(ch)}")
        layers: list[nn.Module] = [nn.Conv2d(3, ch[0], 4, stride=2, padding=1)]
        for cin, c in zip(ch, ch[1:]):
            layers += [_block(cin, c), nn.Conv2d(c, c, 4, stride=2, padding=1)]
        layers += [_block(ch[-1], ch[-1]), nn.Conv2d(ch[-1], cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, P, P) in [0, 1] -> (B, C, H, W)
        return self.net(x * 2 - 1)


class Decoder(nn.Module):
    """Mirror of the encoder: blocks at low resolution, the last upsampling goes straight to pixels."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch = list(reversed(cfg.channels))
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, ch[0], 3, padding=1), _block(ch[0], ch[0])]
        for cin, c in zip(ch, ch[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, c, 3, padding=1), _block(c, c)]
        layers += [nn.GroupNorm(min(8, ch[-1]), ch[-1]), nn.SiLU(),
                   nn.ConvTranspose2d(ch[-1], 3, 4, stride=2, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 3, P, P) in [0, 1]
        return (self.net(f) + 1) / 2


def upsample(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The one resize used for code features going up a scale (tokenizer and transformer inputs alike)."""
    if tuple(z.shape[-2:]) == tuple(size):
        return z
    return F.interpolate(z, size=size, mode="bicubic", align_corners=False)


def sample_topk_codes(dist: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """For each row of dist (..., V), a code drawn uniformly from its k nearest."""
    near = dist.topk(k, dim=-1, largest=False).indices                          # (..., k)
    pick = torch.randint(0, k, near.shape[:-1] + (1,), generator=generator, device=dist.device)
    return near.gather(-1, pick).squeeze(-1)


@dataclass
class Encoded:
    targets: list[torch.Tensor]  # per scale (B, h_s, w_s) long: nearest codes (training targets)
    inputs: list[torch.Tensor]   # per scale (B, h_s, w_s) long: codes fed forward (== targets without self-correction)
    f: torch.Tensor              # (B, C, H, W) encoder features
    f_hat: torch.Tensor          # (B, C, H, W) reconstruction of f from the input codes
    sem_residuals: list[torch.Tensor]  # per scale (B, D_sem, h_s, w_s) semantic projection of the residual
    residuals: list[torch.Tensor]      # per scale (B, C, h_s, w_s) the residual that was quantised


class MultiScaleVQ(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.schedule: Schedule = [tuple(s) for s in cfg.schedule]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.pix_codebook = nn.Embedding(cfg.num_codes, cfg.code_dim)
        nn.init.uniform_(self.pix_codebook.weight, -1 / cfg.num_codes, 1 / cfg.num_codes)
        self.refine = nn.Conv2d(cfg.code_dim, cfg.code_dim, 3, padding=1)
        self.register_buffer("usage", torch.zeros(cfg.num_codes), persistent=False)  # code hits while training
        if cfg.sem_dim:
            self.sem_proj = nn.Conv2d(cfg.code_dim, cfg.sem_dim, 1)
            self.sem_codebook = nn.Embedding(cfg.num_codes, cfg.sem_dim)

    # ------------------------------------------------------------------ pieces
    def phi(self, z: torch.Tensor) -> torch.Tensor:
        r = self.cfg.refine_ratio
        return (1 - r) * z + r * self.refine(z)

    def distances(self, r: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) residual -> (B, h, w, V) lookup cost d_sem + w * d_pix, computed in fp32."""
        with torch.autocast(device_type=r.device.type, enabled=False):
            x = r.float().permute(0, 2, 3, 1)                              # (B, h, w, C)
            d = self.cfg.pix_weight * _sq_dist(x, self.pix_codebook.weight.float())
            if self.cfg.sem_dim:
                s = self.sem_proj.float()(r.float()).permute(0, 2, 3, 1)    # (B, h, w, D)
                d = d + _sq_dist(s, self.sem_codebook.weight.float())
        return d

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) long -> (B, C, h, w) pixel code vectors (the residual code features)."""
        return self.pix_codebook(codes).permute(0, 3, 1, 2)

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self,
        images: torch.Tensor,
        self_correct: float = 0.0,
        topk: int = 1,
        generator: torch.Generator | None = None,
    ) -> Encoded:
        """Residual-quantise images (B, 3, P, P) in [0, 1] at every scale.

        Self-correction: for a fraction `self_correct` of each scale's tokens the *input* code is drawn from the
        `topk` nearest codes while the *target* stays the nearest; later residuals see the perturbed input.
        """
        f = self.encoder(images)
        f_hat = torch.zeros_like(f)
        targets, inputs, sem_res, residuals = [], [], [], []
        for h, w in self.schedule:
            r = F.interpolate(f - f_hat, size=(h, w), mode="area")
            residuals.append(r)
            if self.cfg.sem_dim:
                sem_res.append(self.sem_proj(r))
            dist = self.distances(r)
            target = dist.argmin(-1)
            inp = target
            if self_correct > 0 and topk > 1:
                flip = torch.rand(target.shape, generator=generator, device=f.device) < self_correct
                inp = torch.where(flip, sample_topk_codes(dist, topk, generator), target)
            targets.append(target)
            inputs.append(inp)
            f_hat = f_hat + self.phi(upsample(self.lookup(inp), f.shape[-2:]))
        if self.training:
            for t in targets:
                self.usage += torch.bincount(t.flatten(), minlength=self.cfg.num_codes).to(self.usage)
        return Encoded(targets, inputs, f, f_hat, sem_res, residuals)

    def features(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """f_hat from the codes of the first len(codes) scales: (B, C, H, W)."""
        size = self.schedule[-1]
        return sum(self.phi(upsample(self.lookup(c), size)) for c in codes)

    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Codes of the first k scales -> images (B, 3, P, P), clamped to [0, 1]."""
        return self.decoder(self.features(codes)).clamp(0, 1)

    def scale_inputs(self, codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Transformer inputs for the next scale: residual code features of this scale upsampled to its size.

        (B, h_{s-1}, w_{s-1}) long -> (B, h_s * w_s, C)
        """
        return upsample(self.lookup(codes), size).flatten(2).transpose(1, 2)

    # ------------------------------------------------------------------ training objective
    def losses(
        self, images: torch.Tensor, beta: float = 0.25, teacher_feats: torch.Tensor | None = None,
        sem_head: nn.Module | None = None, fg_weight: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Reconstruction + VQ losses (straight-through to the encoder); semantic alignment when a teacher is given.

        recon = mean of w * (|e| + e^2) over pixels, w = 1 + fg_weight on pixels where the image or its
        reconstruction differs from the image's dominant (median) colour: small objects on a plain background are
        not drowned by it, and paint spilled onto the background (a square's corners for a circle's) costs as much.

        teacher_feats: (B, D_t, H, W) frozen patch features; sem_head maps the accumulated semantic code vectors
        (B, D_sem, H, W) to D_t, and the loss is 1 - cosine similarity per position.
        """
        enc = self.encode(images)
        f_hat_st = enc.f + (enc.f_hat - enc.f).detach()
        recon = self.decoder(f_hat_st)
        err = recon - images
        out = {
            "recon": (foreground_weights(images, fg_weight, recon.detach()) * (err.abs() + err * err)).mean(),
            "vq": F.mse_loss(enc.f_hat, enc.f.detach()) + beta * F.mse_loss(enc.f, enc.f_hat.detach()),
        }
        if self.cfg.sem_dim and teacher_feats is not None and sem_head is not None:
            size = self.schedule[-1]
            sem = sum(upsample(self.sem_codebook(c).permute(0, 3, 1, 2), size) for c in enc.targets)
            out["semantic"] = 1 - F.cosine_similarity(sem_head(sem), teacher_feats, dim=1).mean()
            # the d_sem term: residuals' semantic projections and their chosen semantic codes pull together
            out["sem_commit"] = sum(
                F.mse_loss(r, self.sem_codebook(c).permute(0, 3, 1, 2).detach())
                + F.mse_loss(self.sem_codebook(c).permute(0, 3, 1, 2), r.detach())
                for r, c in zip(enc.sem_residuals, enc.targets)
            ) / len(enc.targets)
        out["loss"] = sum(out.values())
        return out

    @torch.no_grad()
    def restart_dead_codes(self, enc: Encoded, generator: torch.Generator | None = None) -> int:
        """Codes unused since the last call get a residual vector drawn from `enc` (a recent batch); usage resets."""
        dead = (self.usage == 0).nonzero().flatten()
        if len(dead):
            pool = torch.cat([r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]) for r in enc.residuals])
            pick = torch.randint(0, len(pool), (len(dead),), generator=generator)
            self.pix_codebook.weight[dead] = pool[pick].to(self.pix_codebook.weight)
        self.usage.zero_()
        return len(dead)

    # ------------------------------------------------------------------ weight I/O
    def save_pretrained(self, path: str | Path) -> None:
        """config.json (with model_type) + model.safetensors, swapped in whole."""
        from policy.io import hf_config_dict, save_model_folder

        save_model_folder(path, hf_config_dict(VQ_MODEL_TYPE, None, self.cfg), dict(self.state_dict()))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MultiScaleVQ":
        """Strict load of a folder from `save_pretrained` (with or without model_type)."""
        from policy.io import load_state_strict, read_json_config

        path = Path(path)
        model = cls(read_json_config(path / "config.json", VQConfig, model_type=VQ_MODEL_TYPE))
        load_state_strict(model, path)
        return model.eval()


def foreground_weights(images: torch.Tensor, fg_weight: float, recon: torch.Tensor | None = None,
                       tol: float = 0.05) -> torch.Tensor:
    """(B, 3, P, P) -> (B, 1, P, P): 1 + fg_weight where a pixel of `images` (or of `recon`, when given) differs
    from the image's median colour."""
    if not fg_weight:
        return torch.ones_like(images[:, :1])
    median = images.flatten(2).median(dim=2).values[..., None, None]                  # (B, 3, 1, 1)
    fg = (images - median).abs().sum(1, keepdim=True) > tol
    if recon is not None:
        fg = fg | ((recon - median).abs().sum(1, keepdim=True) > tol)
    return 1 + fg_weight * fg.float()


def _sq_dist(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of (..., D) rows to (V, D) codes -> (..., V)."""
    return (x * x).sum(-1, keepdim=True) - 2 * x @ e.t() + (e * e).sum(-1)
