"""LoRA recipe: low-rank updates of a loaded model's U-Net (and optionally text encoder) trained with the
U-Net recipe's denoising loss, saved as a kohya LoRA file that AUTOMATIC1111, ComfyUI and `sdlab.lora`
read. The base model stays frozen; checkpoints hold only the LoRA weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sdlab import lora
from sdlab.checkpoints.load import load_model
from sdlab.train.data import DataConfig, build_dataset
from sdlab.train.loop import LoopConfig, Ranks, Task, autocast_dtype, run
from sdlab.train.unet import DiffusionConfig, DiffusionTrainer, SampleConfig, grid_writer

ARTEFACT = "lora.safetensors"


@dataclass(frozen=True)
class LoRATrainConfig:
    """The base model, the LoRA shape (rank/alpha; conv_rank > 0 adds kohya LoCon on ResBlock and
    resampler convs), and what to train. Prediction type and clip skip are the model's own."""

    model: str
    rank: int = 8
    alpha: float = 8.0  # update scale alpha/rank
    conv_rank: int = 0
    conv_alpha: float = 0.0  # 0 = conv_rank
    train_text_encoder: bool = False
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    loop: LoopConfig = LoopConfig(lr=1e-4, warmup_steps=0)
    sample: SampleConfig = SampleConfig()


def build(cfg: LoRATrainConfig, ranks: Ranks) -> Task:
    """The LoRA task: the frozen model with a LoRANetwork hooked into its layers. The base is held as the
    file stores it (fp16 weights up-cast per layer: the same maths as float32 weights), or in the autocast
    dtype of a half-precision run (kohya's way); the LoRA's own weights are float32 master weights."""
    dtype = autocast_dtype(cfg.loop, ranks)
    model = load_model(cfg.model, storage_dtype="file" if dtype == torch.float32 else dtype)
    if model.family.inpaint:
        raise ValueError(
            f"{cfg.model}: LoRA training takes text-to-image models, not a {model.family.label} model"
        )
    encoders = model.text_encoders if cfg.train_text_encoder else []
    targets = lora.training_targets(model.unet, encoders, model.family, conv=cfg.conv_rank > 0)
    network = lora.LoRANetwork(targets, cfg.rank, cfg.alpha, cfg.conv_rank or None, cfg.conv_alpha or None)
    trainer = DiffusionTrainer(
        model.unet, model.text_encoders, model.vae, model.config, cfg.diffusion, cfg.train_text_encoder
    )
    trainer.network = network

    def export(path: Path) -> Path:
        sd = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
        return lora.save_lora(sd, path, {"sdlab.base_model": model.name})

    dataset = build_dataset(cfg.data, captions=True)
    return Task(trainer, dataset, export, grid_writer(model, cfg.sample, cfg.data.resolution))


def train(cfg: LoRATrainConfig, out_dir: str | Path, resume: bool = True) -> Path:
    """Train a LoRA; returns `out_dir/lora.safetensors` in kohya format."""
    return run(lambda ranks: build(cfg, ranks), cfg, cfg.loop, out_dir, ARTEFACT, resume)
