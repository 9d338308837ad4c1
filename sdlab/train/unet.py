"""U-Net recipe: ε- or v-prediction on VAE latents of captioned images, with caption dropout for
classifier-free guidance, optional min-SNR weighting, EMA weights, and a text encoder that is frozen or
trained jointly. The result is a single-file checkpoint (`save_single_file`) that `load_model` reads.

`DiffusionTrainer` is shared with the LoRA recipe. Noise levels are the DDPM timesteps seen as σ, as the
`Denoiser` samples them: x_σ = x_0 + σε, U-Net input x_σ/√(σ²+1), target ε or v = (ε − σx_0)/√(σ²+1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from sdlab import families
from sdlab.checkpoints.detect import detect_text, detect_unet, detect_vae
from sdlab.checkpoints.load import Checkpoint, StableDiffusion, empty_modules, read_vae, save_single_file
from sdlab.conditioning import Conditioning, encode_captions
from sdlab.config import ModelConfig, Prediction, TextConfig, UNetConfig
from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.schedule import DiscreteSchedule
from sdlab.models.clip import CLIPTextModel
from sdlab.models.unet import UNetModel
from sdlab.models.vae import AutoencoderKL
from sdlab.pipeline import GenerationRequest, generate
from sdlab.train.data import DataConfig, build_dataset
from sdlab.train.loop import Batch, LoopConfig, Loss, Ranks, Task, run
from sdlab.train.presets import MINI_TEXT, MINI_UNET
from sdlab.train.text import Tokens, load_text_encoder

ARTEFACT = "model.safetensors"
MINI_PROMPTS = (
    "a red apple",
    "a small cat face in the top left, blue background",
    "a large rocket, yellow background",
    "a banana on a purple background",
)


@dataclass(frozen=True)
class DiffusionConfig:
    """The denoising objective shared by the U-Net and LoRA recipes."""

    caption_dropout: float = 0.1  # share of empty captions, for classifier-free guidance
    min_snr_gamma: float = 0.0  # Hang et al. 2023 weighting min(SNR, γ)/SNR; 0 = plain MSE (γ = 5 typical)
    cache_latents: bool = True  # encode each distinct image once (the VAE is frozen)


@dataclass(frozen=True)
class SampleConfig:
    """The grid written every `loop.sample_every` steps: one row per prompt, one column per seed."""

    prompts: tuple[str, ...] = MINI_PROMPTS
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 20
    cfg_scale: float = 3.0
    sampler: str = "euler"


@dataclass(frozen=True)
class UNetTrainConfig:
    """A U-Net trained from scratch on the latents of a given VAE, conditioned on a given or new text
    encoder (a new one must be trained jointly)."""

    vae: str  # VAE weights: `sdlab train vae` output or any checkpoint
    text: str | None = None  # text encoder: `sdlab train text` output or any checkpoint; None = new
    unet: UNetConfig = MINI_UNET
    text_config: TextConfig = MINI_TEXT  # for a new text encoder
    train_text_encoder: bool = False
    prediction: Prediction = "eps"
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    loop: LoopConfig = LoopConfig(ema_decay=0.999)
    sample: SampleConfig = SampleConfig()


class DiffusionTrainer(nn.Module):
    """The denoising loss of `unet` on VAE latents of a batch's images, conditioned on its captions
    through the model family's text encoders (SDXL: both, with pooled and size conditioning).

    `text_grad`: gradients flow through the text encoders (they, or a LoRA on them, are trained).
    """

    def __init__(
        self,
        unet: UNetModel,
        texts: list[CLIPTextModel],
        vae: AutoencoderKL,
        model_config: ModelConfig,
        diffusion: DiffusionConfig,
        text_grad: bool,
    ) -> None:
        super().__init__()
        self.unet, self.vae = unet, vae
        self.texts = nn.ModuleList(texts)
        self.model_config, self.diffusion = model_config, diffusion
        self.family = families.get(model_config.family)
        self.vae.requires_grad_(False).eval()
        self.text_grad = text_grad
        self.tokens = [Tokens(t.cfg) for t in texts]
        self.denoiser = Denoiser(self.unet, DiscreteSchedule.for_model(model_config), model_config.prediction)
        self.sigmas = self.denoiser.schedule.sigmas
        self.moments: dict[Any, Tensor] = {}  # image key -> posterior moments (2C, h, w)

    def forward(self, batch: Batch) -> Loss:
        x0 = self.latents(batch)
        cond = self.conditioning(batch)
        t = batch.randint(len(self.sigmas))
        sigma = self.sigmas.to(x0.device)[t]
        noise = batch.randn(*x0.shape[1:])
        f = self.model_config.vae.downscale
        inputs = cond.model_inputs(self.family, x0.shape[0], x0.shape[2] * f, x0.shape[3] * f)
        out, target = self.denoiser.training_pair(x0, noise, t, **inputs)
        per_sample = ((out.float() - target) ** 2).mean(dim=(1, 2, 3))
        weight = self._snr_weight(sigma) if self.diffusion.min_snr_gamma else torch.ones_like(sigma)
        return (weight * per_sample).mean(), {}

    def _snr_weight(self, sigma: Tensor) -> Tensor:
        """min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v, with SNR = 1/σ²."""
        snr = sigma**-2
        return snr.clamp(max=self.diffusion.min_snr_gamma) / (
            snr if self.model_config.prediction == "eps" else snr + 1
        )

    def latents(self, batch: Batch) -> Tensor:
        """Scaled posterior samples of the batch's images (z − shift)·scale, noise from the batch."""
        mean, logvar = self._moments(batch).chunk(2, dim=1)
        z = mean + (0.5 * logvar.clamp(-30.0, 20.0)).exp() * batch.randn(*mean.shape[1:])
        return (z - self.model_config.vae.shift_factor) * self.model_config.vae.scale_factor

    @torch.no_grad()
    def _moments(self, batch: Batch) -> Tensor:
        """Posterior (mean, logvar) per image; cached images are encoded one at a time, so the cache
        holds the same numbers whatever batch an image first came in (exact resume)."""
        images = batch["image"]
        if not self.diffusion.cache_latents:
            post = self.vae.encode(images)
            return torch.cat([post.mean, post.logvar], dim=1)
        for image, key in zip(images, batch["key"], strict=True):
            if key not in self.moments:
                post = self.vae.encode(image[None])
                self.moments[key] = torch.cat([post.mean, post.logvar], dim=1)[0]
        return torch.stack([self.moments[k] for k in batch["key"]])

    def conditioning(self, batch: Batch) -> Conditioning:
        """Conditioning of the captions, each replaced by "" with probability caption_dropout."""
        keep = batch.rand() >= self.diffusion.caption_dropout
        captions = [c if k else "" for c, k in zip(batch["caption"], keep.tolist(), strict=True)]
        ids = [tokens(captions, batch["image"].device) for tokens in self.tokens]
        with torch.set_grad_enabled(self.text_grad and torch.is_grad_enabled()):
            return encode_captions(self.family, list(self.texts), ids, self.model_config.clip_skip_default)


def sample_grid(model: StableDiffusion, cfg: SampleConfig, size: int) -> Image.Image:
    """One image per (prompt, seed), prompts down and seeds across, through the generation pipeline."""
    rows = []
    for prompt in cfg.prompts:
        req = GenerationRequest(
            prompt=prompt,
            width=size,
            height=size,
            steps=cfg.steps,
            cfg_scale=cfg.cfg_scale,
            sampler=cfg.sampler,
        )
        rows.append([generate(model, replace(req, seed=s)).images[0] for s in cfg.seeds])
    grid = Image.new("RGB", (size * len(cfg.seeds), size * len(rows)))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * size, r * size))
    return grid


def grid_writer(model: StableDiffusion, cfg: SampleConfig, size: int) -> Callable[[Path], None]:
    """Task.sample: write the grid of the model's current weights to a PNG."""

    def write(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(model, cfg, size).save(path)

    return write


def check_loadable(unet: UNetConfig, text: TextConfig) -> None:
    """Fail early unless the checkpoint this recipe writes will load back with these exact configs."""
    if unet.context_dim != text.width:
        raise ValueError(f"U-Net context_dim {unet.context_dim} must equal the text width {text.width}")
    with empty_modules():
        unet_sd, text_sd = UNetModel(unet).state_dict(), CLIPTextModel(text).state_dict()
    for what, got, want in (
        ("U-Net", detect_unet(unet_sd), unet),
        ("text", detect_text(text_sd, text.layout), text),
    ):
        if got != want:
            raise ValueError(
                f"this {what} config would load back as {got}: use 8 heads with conv proj_in or 64-channel "
                "heads with linear proj_in (U-Net) and 64 channels per head (CLIP)"
            )


def build(cfg: UNetTrainConfig, ranks: Ranks) -> Task:
    """The U-Net task: a new U-Net, the given VAE (frozen) and text encoder (frozen unless trained)."""
    if cfg.text is None and not cfg.train_text_encoder:
        raise ValueError(
            "a new text encoder must be trained with the U-Net: pass text= or train_text_encoder"
        )
    vae_sd = read_vae(cfg.vae)
    vae = AutoencoderKL(detect_vae(vae_sd, cfg.vae))
    vae.load_state_dict(vae_sd)
    text, layout = load_text_encoder(cfg.text) if cfg.text else (CLIPTextModel(cfg.text_config), "openai")
    text.requires_grad_(cfg.train_text_encoder)
    check_loadable(cfg.unet, text.cfg)
    found = families.candidates(cfg.unet, (text.cfg,))
    if not found:
        raise ValueError(f"no model family has {families.describe_structure(cfg.unet, (text.cfg,))}")
    family = families.choose(found, cfg.prediction)
    model_cfg = ModelConfig(
        family.name, cfg.unet, vae.cfg, (text.cfg,), cfg.prediction, family.clip_skip_default((text.cfg,))
    )
    unet = UNetModel(cfg.unet)
    trainer = DiffusionTrainer(unet, [text], vae, model_cfg, cfg.diffusion, cfg.train_text_encoder)
    model = StableDiffusion(model_cfg, unet, vae, [text], trainer.tokens[0].tokenizer, Path("training"))

    def export(path: Path) -> Path:
        ckpt = Checkpoint(
            source=path,
            unet=_cpu(unet),
            vae=_cpu(vae),
            text=[_cpu(text)],
            text_layouts=[layout],
            prediction=cfg.prediction,
        )
        return save_single_file(ckpt, path)

    dataset = build_dataset(cfg.data, captions=True)
    return Task(trainer, dataset, export, grid_writer(model, cfg.sample, cfg.data.resolution))


def _cpu(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def train(cfg: UNetTrainConfig, out_dir: str | Path, resume: bool = True) -> Path:
    """Train a U-Net; returns `out_dir/model.safetensors`, a single-file checkpoint of the whole model."""
    return run(lambda ranks: build(cfg, ranks), cfg, cfg.loop, out_dir, ARTEFACT, resume)
