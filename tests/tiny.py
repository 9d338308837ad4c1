"""Tiny models of each family, with seeded random weights, written as single-file checkpoints.

Their widths follow the conventions detection relies on (8 heads with conv `proj_in`, 64 channels per
head with linear `proj_in` and in CLIP), so files written here load back with the same config.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from reference import randomize

from sdlab.checkpoints.load import Checkpoint, save_single_file
from sdlab.config import ModelConfig, TextConfig, VAEConfig, unet_config
from sdlab.models.clip import CLIPTextModel
from sdlab.models.unet import UNetModel
from sdlab.models.vae import AutoencoderKL

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TEXT_OPENAI = TextConfig(width=128, layers=2, heads=2, intermediate=256)
TEXT_OPENCLIP = TextConfig(
    width=128,
    layers=3,
    heads=2,
    intermediate=256,
    act="gelu",
    layout="openclip",
    pad_token=0,
    projection_dim=128,
)

TINY = {
    "sd1": ModelConfig(
        family="sd1",
        unet=unet_config(
            model_channels=32, channel_mult=(1, 2), num_res_blocks=1, depth_per_level=(1, 0), context_dim=128
        ),
        vae=TINY_VAE,
        text=(TEXT_OPENAI,),
    ),
    "sd2": ModelConfig(
        family="sd2-v",
        unet=unet_config(
            model_channels=64,
            channel_mult=(1, 2),
            num_res_blocks=1,
            depth_per_level=(1, 1),
            num_heads=-1,
            num_head_channels=64,
            context_dim=128,
            use_linear_in_transformer=True,
        ),
        vae=TINY_VAE,
        text=(TEXT_OPENCLIP,),
        prediction="v",
    ),
    "sdxl": ModelConfig(
        family="sdxl",
        unet=unet_config(
            model_channels=64,
            channel_mult=(1, 2),
            num_res_blocks=1,
            depth_per_level=(0, 2),
            num_heads=-1,
            num_head_channels=64,
            context_dim=256,
            use_linear_in_transformer=True,
            adm_in_channels=128 + 6 * 256,
            transformer_depth_middle=2,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.13025),
        text=(TEXT_OPENAI, TEXT_OPENCLIP),
        clip_skip_default=2,
    ),
    "inpaint": ModelConfig(
        family="sd1-inpaint",
        unet=unet_config(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            depth_per_level=(1, 0),
            context_dim=128,
            in_channels=9,
        ),
        vae=TINY_VAE,
        text=(TEXT_OPENAI,),
    ),
}


# the other families: variants of the networks above
TINY["sdxl-refiner"] = replace(
    TINY["sdxl"],
    family="sdxl-refiner",
    unet=replace(TINY["sdxl"].unet, context_dim=128, adm_in_channels=128 + 5 * 256),
    text=(TEXT_OPENCLIP,),
)
TINY["sd2-eps"] = replace(TINY["sd2"], family="sd2", prediction="eps")
TINY["sd2-inpaint"] = replace(
    TINY["sd2-eps"], family="sd2-inpaint", unet=replace(TINY["sd2"].unet, in_channels=9)
)
TINY["sdxl-inpaint"] = replace(
    TINY["sdxl"], family="sdxl-inpaint", unet=replace(TINY["sdxl"].unet, in_channels=9)
)


def tiny_checkpoint(cfg: ModelConfig, seed: int = 0) -> Checkpoint:
    """A Checkpoint of `cfg` with seeded random weights (text in the transformers layout)."""
    return Checkpoint(
        source=Path(f"tiny-{cfg.family}"),
        unet=randomize(UNetModel(cfg.unet), seed + 1).state_dict(),
        vae=randomize(AutoencoderKL(cfg.vae), seed + 2).state_dict(),
        text=[randomize(CLIPTextModel(t), seed + 3 + i).state_dict() for i, t in enumerate(cfg.text)],
        text_layouts=[t.layout for t in cfg.text],
        prediction=cfg.prediction,
    )


def write_tiny(name: str, path: Path, seed: int = 0) -> Path:
    """Write the tiny model `name` (a key of TINY) as a single-file .safetensors checkpoint."""
    return save_single_file(tiny_checkpoint(TINY[name], seed), path)
