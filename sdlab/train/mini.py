"""`sdlab train mini`: the sdlab-mini model from nothing, stage by stage — VAE, then optionally a
contrastive text encoder, then the U-Net (with the text encoder trained jointly when there was no text
stage) — and the final single-file checkpoint. Each stage is an ordinary recipe run in its own folder
under `out_dir`, so an interrupted run resumes inside the stage it was in and skips finished ones."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from sdlab.checkpoints.load import DTYPES, read_checkpoint, save_single_file
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


@dataclass(frozen=True)
class MiniConfig:
    """Every setting of the mini recipe; `text_loop` None skips the contrastive stage (the text encoder is
    then trained jointly with the U-Net, which MINI_DATASET.md found as good at equal CPU time)."""

    data: DataConfig = DataConfig()
    vae: VAEConfig = MINI_VAE
    text: TextConfig = MINI_TEXT
    unet: UNetConfig = MINI_UNET
    vae_loop: LoopConfig = LoopConfig(steps=2000, lr=5e-4, warmup_steps=100, checkpoint_every=250)
    text_loop: LoopConfig | None = None
    unet_loop: LoopConfig = LoopConfig(
        steps=10000, lr=5e-4, warmup_steps=200, ema_decay=0.999, checkpoint_every=500, sample_every=1000
    )
    kl_weight: float = 1e-6
    prediction: Prediction = "eps"
    diffusion: DiffusionConfig = DiffusionConfig()
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"  # of the final checkpoint


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


def train_mini(cfg: MiniConfig, out_dir: str | Path, resume: bool = True) -> Path:
    """Run the stages that are not finished (raising a stage's steps continues it), then write
    `out_dir/sdlab-mini.safetensors` unless it is newer than the U-Net stage's model; returns its path."""
    out = Path(out_dir)
    vae_cfg = VAETrainConfig(vae=cfg.vae, data=cfg.data, loop=cfg.vae_loop, kl_weight=cfg.kl_weight)
    vae_file = train_vae(vae_cfg, out / "vae", resume)
    text_file = None
    if cfg.text_loop is not None:
        text_cfg = TextTrainConfig(text=cfg.text, data=cfg.data, loop=cfg.text_loop)
        text_file = train_text(text_cfg, out / "text", resume)
    model = train_unet(unet_stage(cfg, vae_file, text_file), out / "unet", resume)
    final = out / FINAL
    ranks = setup_ranks(cfg.unet_loop.device)
    if ranks.main and not (final.is_file() and final.stat().st_mtime_ns >= model.stat().st_mtime_ns):
        final.unlink(missing_ok=True)
        save_single_file(read_checkpoint(model), final, DTYPES[cfg.dtype])
    ranks.barrier()
    return final
