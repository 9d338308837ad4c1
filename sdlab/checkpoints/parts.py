"""Standalone U-Net and text-encoder files (ComfyUI's UNETLoader, CLIPLoader, DualCLIPLoader).

Each loads as a `StableDiffusion` holding only that part: a U-Net model has no text encoders and no VAE
module (its config's VAE entry carries the family's latent scale, which sampling uses), a text model has
no U-Net. The family comes from the shapes, as for a checkpoint, with what the missing parts would be
inferred as ComfyUI's model detection infers them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sdlab import devices, families
from sdlab.checkpoints import keymaps
from sdlab.checkpoints.detect import detect_text, detect_unet, guess_prediction
from sdlab.checkpoints.io import CheckpointError, read_state_dict
from sdlab.checkpoints.load import StableDiffusion, StateDict, build_module
from sdlab.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from sdlab.families import FIELD_SCALARS, VECTOR_EMBED_DIM, Family
from sdlab.models.blocks import set_attention
from sdlab.models.clip import CLIPTextModel
from sdlab.models.unet import UNetModel
from sdlab.offload import enable_offload, weights_home
from sdlab.text.tokenizer import CLIPTokenizer

# a transformers-layout text encoder this deep is OpenCLIP ViT-H or bigG (ComfyUI's detect_te_model)
OPENCLIP_LAYER_KEY = "text_model.encoder.layers.22.mlp.fc1.weight"


def read_unet(path: Path) -> StateDict:
    """A standalone U-Net's tensors in the original layout: `model.diffusion_model.` stripped, diffusers
    `UNet2DConditionModel` keys converted."""
    sd = read_state_dict(path)
    if any(k.startswith(keymaps.UNET_PREFIX) for k in sd):
        sd = {
            k.removeprefix(keymaps.UNET_PREFIX): v for k, v in sd.items() if k.startswith(keymaps.UNET_PREFIX)
        }
    if "conv_in.weight" in sd:
        sd = keymaps.unet_diffusers_to_ldm(sd)
    if "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"{path}: not a U-Net (no input_blocks.0.0 / conv_in weights)")
    return sd


def read_text_encoder(path: Path) -> tuple[str, StateDict]:
    """(layout, tensors in the transformers layout) of a standalone text encoder: transformers
    CLIPTextModel(WithProjection) keys, or OpenCLIP keys (then "openclip")."""
    sd = read_state_dict(path)
    if "token_embedding.weight" in sd:
        return "openclip", keymaps.text_openclip_to_openai(sd)
    sd = keymaps.text_from_transformers(sd)
    if "text_model.embeddings.token_embedding.weight" not in sd:
        raise CheckpointError(f"{path}: not a CLIP text encoder (no token_embedding weights)")
    return ("openclip" if OPENCLIP_LAYER_KEY in sd else "openai"), sd


def unet_families(unet: UNetConfig) -> list[Family]:
    """The families a U-Net alone may belong to: those whose text encoders, at the widths its context and
    vector input imply, fit it, OpenCLIP-conditioned U-Nets (SD2, SDXL) having linear transformer
    projections and CLIP-L-only ones (SD1) convolutions (ComfyUI's model detection reads the same flag)."""
    found = []
    for family in families.FAMILIES.values():
        text = _implied_text(family, unet)
        openclip = any(s.layout == "openclip" for s in family.text)
        if text and family.fits(unet, text) and openclip == unet.use_linear_in_transformer:
            found.append(family)
    return found


def _implied_text(family: Family, unet: UNetConfig) -> list[TextConfig]:
    """Text encoders of `family` shaped as `unet` implies: the pooled one as wide as the vector input
    leaves, the others sharing the rest of the context width (one each: SD1, SD2, SDXL, refiner)."""
    pooled = 0
    if family.vector and unet.adm_in_channels is not None:
        pooled = unet.adm_in_channels - VECTOR_EMBED_DIM * sum(FIELD_SCALARS[f] for f in family.vector)
    plain = [s for s in family.text if not s.pooled]
    if len(plain) > 1 or pooled < 0:
        return []
    rest = unet.context_dim - pooled if family.vector else unet.context_dim
    return [TextConfig(width=pooled if s.pooled else rest, layout=s.layout) for s in family.text]


def load_unet(path: Path, placement: devices.Placement) -> StableDiffusion:
    """A standalone U-Net file as a model with only its U-Net."""
    sd = read_unet(path)
    unet = detect_unet(sd, f"{path} (U-Net)")
    found = unet_families(unet)
    if not found:
        raise CheckpointError(
            f"{path}: no known model family has a U-Net with context {unet.context_dim}, vector input "
            f"{unet.adm_in_channels}, {unet.in_channels} input channels"
        )
    prediction = guess_prediction(sd, unet, found, {})
    family = families.choose(found, prediction)
    latent = VAEConfig(scale_factor=family.latent.scale_factor, shift_factor=family.latent.shift_factor)
    cfg = ModelConfig(family.name, unet, latent, tuple(_implied_text(family, unet)), prediction)
    held_on, precision = _placed(placement, family)
    module = build_module(
        UNetModel, unet, sd, f"{path} (U-Net)", precision.compute, held_on, precision.storage
    )
    set_attention(module, placement.attention)
    part = StableDiffusion(cfg, module, None, [], CLIPTokenizer.default(), path)  # type: ignore[arg-type]
    return _offloaded(part, placement)


def load_text_encoders(paths: Sequence[Path], vector: bool, placement: devices.Placement) -> StableDiffusion:
    """Standalone text-encoder files as a model with only its text encoders, CLIP-L first: the family of
    the first record with those encoders, with (`vector`, SDXL) or without a vector input."""
    read = sorted((read_text_encoder(p) + (p,) for p in paths), key=lambda t: t[0] != "openai")
    layouts = tuple(layout for layout, _, _ in read)
    text = tuple(detect_text(sd, layout, f"{p} (text encoder)") for layout, sd, p in read)
    found = [
        f
        for f in families.FAMILIES.values()
        if tuple(s.layout for s in f.text) == layouts and bool(f.vector) == vector
    ]
    if not found:
        names = " + ".join(f"{p.name} ({layout})" for layout, _, p in read)
        raise CheckpointError(f"no model family has the text encoders {names}")
    family = found[0]
    held_on, precision = _placed(placement, family)
    modules = [
        build_module(
            CLIPTextModel, t, sd, f"{p} (text encoder)", precision.compute, held_on, precision.storage
        )
        for t, (_, sd, p) in zip(text, read, strict=True)
    ]
    unet = UNetConfig(context_dim=sum(t.width for t in text))
    cfg = ModelConfig(family.name, unet, VAEConfig(), text, clip_skip_default=family.clip_skip_default(text))
    part = StableDiffusion(cfg, None, None, modules, CLIPTokenizer.default(), paths[0])  # type: ignore[arg-type]
    return _offloaded(part, placement)


def _placed(placement: devices.Placement, family: Family) -> tuple[torch.device, devices.Precision]:
    """Where a part's weights are held (the CPU when offloaded) and the precision it runs in, as
    `load_model` places a checkpoint's networks."""
    run_on = devices.resolve_device(placement.device)
    return weights_home(placement.offload, run_on), devices.resolve_precision(placement.dtype, run_on, family)


def _offloaded(part: StableDiffusion, placement: devices.Placement) -> StableDiffusion:
    """The part with its networks offloaded as `load_model` offloads a checkpoint's."""
    enable_offload(part, placement.offload, devices.resolve_device(placement.device))
    return part
