"""`sdlab train mini`: the sdlab-mini model from nothing, stage by stage — VAE, then a contrastive text
encoder, then the U-Net on that frozen encoder (or, with no text stage, with the text encoder trained
jointly), then optionally the VAE decoder fine-tuned with its encoder frozen (the latents the U-Net
learnt stay exactly as they were; Stability's sd-vae-ft-mse did the same) — and the final single-file
checkpoint. Each stage is an ordinary recipe run in its own folder under `out_dir`, so an interrupted run
resumes inside the stage it was in and skips finished ones."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from sdlab.checkpoints.load import DTYPES, read_checkpoint, read_vae, save_single_file
from sdlab.config import Prediction, TextConfig, UNetConfig, VAEConfig
from sdlab.train.data import DataConfig
from sdlab.train.loop import LoopConfig, setup_ranks
from sdlab.train.presets import MINI_TEXT, MINI_UNET, MINI_VAE
from sdlab.train.text import TextTrainConfig
from sdlab.train.text import train as train_text
from sdlab.train.unet import DiffusionConfig, UNetTrainConfig
from sdlab.train.unet import train as train_unet
from sdlab.train.vae import VAETrainConfig
from sdlab.train.vae import train as train_vae

FINAL = "sdlab-mini.safetensors"
TEXT_LOOP = LoopConfig(
    steps=800, batch_size=128, lr=1e-3, lr_schedule="cosine", warmup_steps=50, checkpoint_every=200
)
DECODER_LOOP = LoopConfig(
    steps=800, batch_size=16, lr=1e-3, lr_schedule="cosine", warmup_steps=50, checkpoint_every=200
)


@dataclass(frozen=True)
class MiniConfig:
    """Every setting of the mini recipe. `text_loop` None skips the contrastive text stage and trains the
    text encoder jointly with the U-Net instead. Measured here, that joint encoder put the caption's colour
    and size into the padding tokens the U-Net reads but hardly its place or object: after 2,500 U-Net
    steps place was at chance (10%) and objects were blobs. The 800-step contrastive stage (5 min) puts
    all four into them, and the U-Net on that frozen encoder placed 74% of small objects after 500 steps."""

    data: DataConfig = DataConfig()
    vae: VAEConfig = MINI_VAE
    text: TextConfig = MINI_TEXT
    unet: UNetConfig = MINI_UNET
    vae_loop: LoopConfig = LoopConfig(
        steps=1300, batch_size=64, lr=2e-3, lr_schedule="cosine", warmup_steps=100, checkpoint_every=100
    )
    # Random 32x32 crops (at latent-grid offsets): a quarter of the pixels, 6x the images per second of
    # whole 64x64 ones at batch 16 here, and the convolutional VAE does not care about the frame. Measured
    # here, 1,300 steps reached 29.1 dB held-out PSNR on whole images in 28 min; whole images at batch 16
    # gave 25.75 dB in 42 min plus a 14-min decoder fine-tune.
    vae_crop: int = 32  # 0 = whole images
    vae_reconstruction: Literal["l1", "mse"] = "mse"  # PSNR is what the VAE is judged on
    text_loop: LoopConfig | None = TEXT_LOOP
    decoder_loop: LoopConfig | None = None  # e.g. DECODER_LOOP: fine-tune the decoder with the encoder frozen
    unet_loop: LoopConfig = LoopConfig(
        steps=8000, lr=5e-4, warmup_steps=200, ema_decay=0.999, checkpoint_every=500, sample_every=1000
    )
    kl_weight: float = 1e-6
    prediction: Prediction = "v"  # weights high-noise steps, where colour and layout are decided
    diffusion: DiffusionConfig = DiffusionConfig()
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"  # of the final checkpoint
    steps: int = 20  # generation defaults written into the final file's metadata
    cfg_scale: float = 3.0

    def metadata(self) -> dict[str, str]:
        """What `StableDiffusion.native_size`, `default_steps` and `default_cfg` read back."""
        return {
            "sdlab.native_size": str(self.data.resolution),
            "sdlab.steps": str(self.steps),
            "sdlab.cfg": f"{self.cfg_scale:g}",
        }


def smoke(cfg: MiniConfig = MiniConfig(), steps: int = 2, batch_size: int = 4) -> MiniConfig:
    """The same recipe and stages at a few steps each, on a small batch and data epoch (CI)."""

    def short(loop: LoopConfig) -> LoopConfig:
        return replace(
            loop, steps=steps, batch_size=batch_size, warmup_steps=1, checkpoint_every=0, sample_every=0
        )

    return replace(
        cfg,
        data=replace(cfg.data, epoch_size=4 * batch_size),
        vae_loop=short(cfg.vae_loop),
        text_loop=short(cfg.text_loop) if cfg.text_loop else None,
        unet_loop=short(cfg.unet_loop),
        decoder_loop=short(cfg.decoder_loop) if cfg.decoder_loop else None,
    )


def unet_stage(cfg: MiniConfig, vae_file: Path, text_file: Path | None) -> UNetTrainConfig:
    """The U-Net stage's config given the earlier stages' files."""
    return UNetTrainConfig(
        vae=str(vae_file.resolve()),
        text=str(text_file.resolve()) if text_file else None,
        unet=cfg.unet,
        text_config=cfg.text,
        train_text_encoder=text_file is None,
        prediction=cfg.prediction,
        diffusion=cfg.diffusion,
        data=cfg.data,
        loop=cfg.unet_loop,
    )


def vae_stage(cfg: MiniConfig) -> VAETrainConfig:
    """The VAE stage's config."""
    return VAETrainConfig(
        vae=cfg.vae,
        data=cfg.data,
        loop=cfg.vae_loop,
        reconstruction=cfg.vae_reconstruction,
        kl_weight=cfg.kl_weight,
        crop=cfg.vae_crop,
    )


def decoder_stage(cfg: MiniConfig, vae_file: Path) -> VAETrainConfig:
    """The decoder fine-tuning stage's config: the VAE stage's, from its result, encoder frozen. It needs
    only the VAE stage, so it may also run beside the U-Net stage (`train_decoder`)."""
    assert cfg.decoder_loop is not None
    return replace(vae_stage(cfg), loop=cfg.decoder_loop, init=str(vae_file.resolve()), train_encoder=False)


def train_decoder(cfg: MiniConfig, out_dir: str | Path, resume: bool = True) -> Path:
    """The decoder stage alone (after the VAE stage): `train_mini` then finds it finished."""
    out = Path(out_dir)
    return train_vae(
        decoder_stage(cfg, train_vae(vae_stage(cfg), out / "vae", resume)), out / "decoder", resume
    )


def train_mini(cfg: MiniConfig, out_dir: str | Path, resume: bool = True) -> Path:
    """Run the stages that are not finished (raising a stage's steps continues it), then write
    `out_dir/sdlab-mini.safetensors` unless it is newer than the stages' results; returns its path."""
    out = Path(out_dir)
    vae_file = train_vae(vae_stage(cfg), out / "vae", resume)
    text_file = None
    if cfg.text_loop is not None:
        text_cfg = TextTrainConfig(text=cfg.text, data=cfg.data, loop=cfg.text_loop)
        text_file = train_text(text_cfg, out / "text", resume)
    model = train_unet(unet_stage(cfg, vae_file, text_file), out / "unet", resume)
    results = [model]
    if cfg.decoder_loop is not None:
        results.append(train_vae(decoder_stage(cfg, vae_file), out / "decoder", resume))
    final = out / FINAL
    ranks = setup_ranks(cfg.unet_loop.device)
    newest = max(p.stat().st_mtime_ns for p in results)
    if ranks.main and not (final.is_file() and final.stat().st_mtime_ns >= newest):
        final.unlink(missing_ok=True)
        ckpt = read_checkpoint(model)
        vae = read_vae(results[-1]) if cfg.decoder_loop is not None else ckpt.vae
        ckpt = replace(ckpt, vae=vae, metadata=ckpt.metadata | cfg.metadata())
        save_single_file(ckpt, final, DTYPES[cfg.dtype])
    ranks.barrier()
    return final
