"""VAE recipe: reconstruction (L1 or MSE) + a KL weight, optionally a patch-adversarial term.

The exported VAE is reparametrised so that its latents, multiplied by the config's `scale_factor`, have
zero mean and unit variance per channel: an exact affine change of the latent coordinates folded into
`quant_conv` and `post_quant_conv`, so checkpoint loaders that assume SD's 0.18215 see unit-variance
latents (what the U-Net recipe trains on).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.checkpoints.io import write_safetensors
from sdlab.checkpoints.load import read_vae
from sdlab.config import VAEConfig
from sdlab.models.blocks import group_norm
from sdlab.models.vae import AutoencoderKL
from sdlab.train.data import DataConfig, build_dataset, collate
from sdlab.train.loop import Batch, LoopConfig, Loss, Ranks, Task, run
from sdlab.train.presets import MINI_VAE

ARTEFACT = "vae.safetensors"
StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class VAETrainConfig:
    """The VAE to train, its data, and the loss: per-pixel reconstruction + kl_weight·KL (LDM's scaling:
    KL summed over latent elements per pixel value) + adversarial_weight·hinge GAN term after
    `adversarial_start` steps (0 = no discriminator; it trains from step 0, and gradient clipping covers
    it too). Start the GAN term late: on an untrained VAE it slows reconstruction down."""

    vae: VAEConfig = MINI_VAE
    data: DataConfig = DataConfig()
    loop: LoopConfig = LoopConfig()
    reconstruction: Literal["l1", "mse"] = "l1"
    kl_weight: float = 1e-6
    adversarial_weight: float = 0.0
    adversarial_start: int = 0
    normalize_images: int = 512  # images whose latent statistics set the export normalisation; 0 = none
    init: str | None = None  # start from this VAE (any checkpoint or VAE file) instead of random weights
    train_encoder: bool = True  # False: fine-tune the decoder only; latents (what a U-Net learnt) stay put
    crop: int = 0  # train on random square crops of this side (a multiple of the downscale); 0 = whole images


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): a real/fake logit per overlapping patch."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            group_norm(2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class VAETrainer(nn.Module):
    """Encode, sample the posterior with the batch's noise, decode, and score the reconstruction."""

    def __init__(self, vae: AutoencoderKL, cfg: VAETrainConfig) -> None:
        super().__init__()
        self.vae, self.cfg = vae, cfg
        self.disc = PatchDiscriminator() if cfg.adversarial_weight else None

    def forward(self, batch: Batch) -> Loss:
        x = self.crops(batch)
        with torch.set_grad_enabled(self.cfg.train_encoder and torch.is_grad_enabled()):
            post = self.vae.encode(x)
        rec = self.vae.decode(post.mean + post.std * batch.randn(*post.mean.shape[1:]))
        error = (rec - x).abs() if self.cfg.reconstruction == "l1" else (rec - x) ** 2
        rec_loss, kl = error.mean(), post.kl().mean() / x[0].numel()
        logs: dict[str, Tensor | float] = {"rec": rec_loss.detach(), "kl": kl.detach()}
        loss = rec_loss + self.cfg.kl_weight * kl
        if self.disc is not None:
            loss = loss + self._adversarial(x, rec, batch.step, logs)
        return loss, logs

    def crops(self, batch: Batch) -> Tensor:
        """The batch's images, or a random `cfg.crop`-sided crop of each at latent-grid offsets (the VAE is
        convolutional, so crops cost a fraction of a whole image and teach the same local code)."""
        x, side, f = batch["image"], self.cfg.crop, self.vae.cfg.downscale
        if not side:
            return x
        cells = torch.tensor([x.shape[-2] - side, x.shape[-1] - side]) // f + 1
        offsets = ((batch.rand(2) * cells).long() * f).tolist()  # (B, 2): top, left
        return torch.stack(
            [im[:, y : y + side, x0 : x0 + side] for im, (y, x0) in zip(x, offsets, strict=True)]
        )

    def _adversarial(self, x: Tensor, rec: Tensor, step: int, logs: dict) -> Tensor:
        """Hinge losses in one backward: the discriminator learns from detached reconstructions, the VAE
        through a call with detached discriminator weights (so each gets only its own gradient)."""
        real, fake = self.disc(torch.cat([x, rec.detach()])).chunk(2)
        d_loss = (F.relu(1 - real).mean() + F.relu(1 + fake).mean()) / 2
        frozen = {n: p.detach() for n, p in self.disc.named_parameters()}
        g_loss = -torch.func.functional_call(self.disc, frozen, (rec,)).mean()
        weight = self.cfg.adversarial_weight if step >= self.cfg.adversarial_start else 0.0
        logs |= {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}
        return d_loss + weight * g_loss


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, images: Tensor, chunk: int = 32) -> tuple[Tensor, Tensor]:
    """Per-channel mean and variance of posterior samples over `images`: Var(mean) + E[posterior var]."""
    means, variances = [], []
    for part in images.split(chunk):
        post = vae.encode(part.to(next(vae.parameters()).device))
        means.append(post.mean.transpose(0, 1).flatten(1))
        variances.append(post.var.transpose(0, 1).flatten(1))
    mean, var = torch.cat(means, dim=1), torch.cat(variances, dim=1)  # (C, N·h·w)
    return mean.mean(dim=1), mean.var(dim=1, unbiased=False) + var.mean(dim=1)


def normalized_state(vae: AutoencoderKL, mean: Tensor, var: Tensor) -> StateDict:
    """The VAE's tensors with latents z' = c·(z − mean), c = 1/(scale_factor·std): z'·scale_factor has zero
    mean and unit variance, and decode(z') equals the original decode(z)."""
    sd = {k: v.detach().clone().cpu() for k, v in vae.state_dict().items()}
    c = (1.0 / (vae.cfg.scale_factor * var.sqrt())).cpu()
    mean, e = mean.cpu(), vae.cfg.embed_dim
    wq, bq = sd["quant_conv.weight"], sd["quant_conv.bias"]
    wq[:e] *= c[:, None, None, None]
    bq[:e] = c * (bq[:e] - mean)
    bq[e:] += 2 * c.log()  # log-variance of c·z
    wp, bp = sd["post_quant_conv.weight"], sd["post_quant_conv.bias"]
    sd["post_quant_conv.bias"] = bp + wp[:, :, 0, 0] @ mean
    sd["post_quant_conv.weight"] = wp / c[None, :, None, None]
    return sd


def build(cfg: VAETrainConfig, ranks: Ranks) -> Task:
    """The VAE task; export writes the (normalised) VAE in the original `first_stage_model` key layout."""
    vae = AutoencoderKL(cfg.vae)
    if cfg.init:
        vae.load_state_dict(read_vae(cfg.init))
    if not cfg.train_encoder:
        if not cfg.init:
            raise ValueError("fine-tuning the decoder alone needs a trained VAE to start from (init)")
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    f = vae.cfg.downscale
    if cfg.crop and (cfg.crop % f or cfg.crop > cfg.data.resolution):
        raise ValueError(f"crop {cfg.crop} must be a multiple of {f} and at most {cfg.data.resolution}")
    dataset = build_dataset(cfg.data, captions=False)

    def export(path: Path) -> Path:
        sd = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
        if cfg.normalize_images and cfg.train_encoder:  # a frozen encoder keeps its latent coordinates
            n = min(cfg.normalize_images, len(dataset))
            images = collate([dataset[i] for i in range(n)])["image"]
            sd = normalized_state(vae, *latent_stats(vae, images))
        return write_safetensors(sd, path, metadata={"format": "pt"})

    return Task(VAETrainer(vae, cfg), dataset, export)


def train(cfg: VAETrainConfig, out_dir: str | Path, resume: bool = True) -> Path:
    """Train a VAE; returns `out_dir/vae.safetensors` (keys `encoder.*`, `decoder.*`, `*quant_conv.*`)."""
    return run(lambda ranks: build(cfg, ranks), cfg, cfg.loop, out_dir, ARTEFACT, resume)
