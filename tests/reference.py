"""Test-only bridges to the reference implementations (diffusers / transformers).

The oracle path is diffusers' own: an original LDM config (what the `v1-inference.yaml` family of
files holds) plus diffusers' own single-file converters, so sdlab's key maps are not involved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdlab.config import ModelConfig, TextConfig, UNetConfig, VAEConfig


def ldm_unet_params(cfg: UNetConfig) -> dict:
    """The `unet_config.params` block of an original LDM yaml for a regular U-Net."""
    depth_per_level, i = [], 0
    for n in cfg.num_res_blocks:
        depth_per_level.append(cfg.transformer_depth[i])
        i += n
    params: dict = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "model_channels": cfg.model_channels,
        "attention_resolutions": [2**lvl for lvl, d in enumerate(depth_per_level) if d],
        "num_res_blocks": cfg.num_res_blocks[0],
        "channel_mult": list(cfg.channel_mult),
        "use_spatial_transformer": True,
        "transformer_depth": depth_per_level if cfg.adm_in_channels else depth_per_level[0],
        "context_dim": cfg.context_dim,
        "use_linear_in_transformer": cfg.use_linear_in_transformer,
        "legacy": False,
    }
    if cfg.num_head_channels == -1:
        params["num_heads"] = cfg.num_heads
    else:
        params["num_head_channels"] = cfg.num_head_channels
    if cfg.adm_in_channels:
        params["num_classes"] = "sequential"
        params["adm_in_channels"] = cfg.adm_in_channels
    return params


def ldm_vae_params(cfg: VAEConfig) -> dict:
    return {
        "double_z": True,
        "z_channels": cfg.z_channels,
        "resolution": 256,
        "in_channels": cfg.in_channels,
        "out_ch": cfg.out_ch,
        "ch": cfg.ch,
        "ch_mult": list(cfg.ch_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def ldm_original_config(unet: UNetConfig, vae: VAEConfig) -> dict:
    """A minimal original LDM config as diffusers' single-file converters read it."""
    return {
        "model": {
            "params": {
                "scale_factor": vae.scale_factor,
                "unet_config": {"params": ldm_unet_params(unet)},
                "first_stage_config": {
                    "params": {"embed_dim": vae.embed_dim, "ddconfig": ldm_vae_params(vae)}
                },
            }
        }
    }


def diffusers_unet(unet_sd: dict[str, Tensor], cfg: UNetConfig, vae: VAEConfig | None = None):
    """A diffusers UNet2DConditionModel holding the same weights as an sdlab U-Net state dict."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    ckpt = {f"model.diffusion_model.{k}": v for k, v in unet_sd.items()}
    original = ldm_original_config(cfg, vae or VAEConfig())
    config = create_unet_diffusers_config_from_ldm(original, ckpt)
    model = UNet2DConditionModel(**config)
    missing, unexpected = model.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def diffusers_vae(vae_sd: dict[str, Tensor], cfg: VAEConfig, unet: UNetConfig):
    """A diffusers AutoencoderKL holding the same weights as an sdlab VAE state dict."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    ckpt = {f"first_stage_model.{k}": v for k, v in vae_sd.items()}
    config = create_vae_diffusers_config_from_ldm(ldm_original_config(unet, cfg), ckpt)
    model = AutoencoderKL(**config)
    model.load_state_dict(convert_ldm_vae_checkpoint(ckpt, config), strict=True)
    return model.eval()


def transformers_clip(text_sd: dict[str, Tensor], cfg: TextConfig):
    """A transformers CLIPTextModel(WithProjection) holding an sdlab text encoder's weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.act,
        projection_dim=cfg.projection_dim or cfg.width,
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=49406,
        eos_token_id=cfg.eos_token,
        pad_token_id=cfg.pad_token,
    )
    cls = CLIPTextModelWithProjection if cfg.projection_dim else CLIPTextModel
    model = cls(config)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5 flattens
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    missing, unexpected = model.load_state_dict(text_sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Seeded random weights everywhere, norms included, so every parameter matters to the output."""
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(m, norms) and name == "weight":
                    p.copy_(1.0 + scale * noise)
                elif p.ndim == 1:
                    p.copy_(scale * noise)
                else:  # fan-in scaled, so activations keep their size through the depth
                    p.copy_(noise / p[0].numel() ** 0.5)
    return module.eval()


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB between two 8-bit images."""
    x, y = (np.asarray(i, dtype=np.float64) for i in (a, b))
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


__all__ = [
    "ModelConfig",
    "diffusers_pipeline",
    "diffusers_unet",
    "diffusers_vae",
    "transformers_clip",
    "randomize",
    "max_diff",
    "psnr",
    "write_diffusers_config",
]


def write_real_size_files(family: str, folder: Path) -> tuple[Path, Path]:
    """A single-file checkpoint at the real SD1.5 / SD2.1-v shapes with seeded random weights, and
    the local diffusers config folder that `from_single_file(config=...)` reads instead of the Hub.

    Stored in fp16 like the community's files (2.1 / 2.6 GB instead of twice that): both engines read
    the same fp16 numbers into fp32 modules, so the fp32 parity is unchanged."""
    from dataclasses import replace

    from sdlab.checkpoints.load import Checkpoint, save_single_file
    from sdlab.config import SD1, SD2
    from sdlab.models.clip import CLIPTextModel
    from sdlab.models.unet import UNetModel
    from sdlab.models.vae import AutoencoderKL

    cfg = SD1 if family == "sd1" else replace(SD2, family="sd2-v", prediction="v")
    path = folder / "model.safetensors"
    unet = randomize(UNetModel(cfg.unet), seed=11).state_dict()
    vae = randomize(AutoencoderKL(cfg.vae), seed=12).state_dict()
    text = randomize(CLIPTextModel(cfg.text[0]), seed=13).state_dict()
    ckpt = Checkpoint(path, unet, vae, [text], [cfg.text[0].layout], cfg.prediction)
    save_single_file(ckpt, path, dtype=torch.float16)
    del unet, vae, text, ckpt
    return path, write_diffusers_config(cfg, folder / "config")


def diffusers_pipeline(checkpoint: Path, config: Path):
    """diffusers' StableDiffusionPipeline from a single file and a local config folder, offline."""
    import os

    from diffusers import StableDiffusionPipeline

    os.environ["HF_HUB_OFFLINE"] = "1"
    return StableDiffusionPipeline.from_single_file(
        str(checkpoint),
        config=str(config),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
        torch_dtype=torch.float32,
    )


def write_diffusers_config(cfg: ModelConfig, folder: Path) -> Path:
    """The diffusers config folder (model configs, scheduler, tokenizer) that `from_single_file(config=...)`
    reads for a model of this configuration instead of the Hub."""
    from sdlab.checkpoints import keymaps
    from sdlab.checkpoints.io import write_json
    from sdlab.text.tokenizer import CLIPTokenizer

    for rel, content in keymaps.diffusers_configs(cfg).items():
        write_json(content, folder / rel)
    CLIPTokenizer.default().save_folder(folder / "tokenizer", pad_token=cfg.text[0].pad_token)
    return folder
