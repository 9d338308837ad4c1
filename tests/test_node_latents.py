"""ComfyUI LATENT values between models and VAEs of different latent scales (SDXL with a standalone VAE)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tiny import write_tiny

from sdlab.checkpoints.load import load_model
from sdlab.server import nodes
from sdlab.vae_tools import load_vae


def test_standalone_vae_decodes_sdxl_latents_through_the_raw_space(tmp_path: Path) -> None:
    model = load_model(write_tiny("sdxl", tmp_path / "xl.safetensors"))
    vae_file = tmp_path / "sdxl_vae.safetensors"
    sd = load_file(tmp_path / "xl.safetensors")
    save_file({k: v for k, v in sd.items() if k.startswith("first_stage_model.")}, vae_file)
    standalone = load_vae(vae=vae_file)  # shapes cannot tell an SDXL VAE: it gets the SD scale 0.18215
    assert standalone.cfg.scale_factor != model.vae.cfg.scale_factor
    g = torch.Generator().manual_seed(0)
    scaled = torch.randn(1, 4, 8, 8, generator=g)  # what an SDXL KSampler hands on (SDXL scale)
    latent = nodes.Latent(64, 64, 1, scaled, scaling=(model.vae.cfg.scale_factor, 0.0))
    (own,) = nodes.vae_decode(None, latent, model.vae)  # type: ignore[arg-type]
    (other,) = nodes.vae_decode(None, latent, standalone)  # type: ignore[arg-type]
    assert torch.allclose(own, other, atol=1e-5)
    # encoded by the standalone VAE, the latents reach the SDXL model in its own scale
    pixels = own.clamp(-1, 1)
    (mine,) = nodes.vae_encode(None, pixels, model.vae)  # type: ignore[arg-type]
    (theirs,) = nodes.vae_encode(None, pixels, standalone)  # type: ignore[arg-type]
    model_scale = (model.vae.cfg.scale_factor, 0.0)
    back = nodes._rescaled(theirs.samples, theirs.scaling, model_scale)
    assert torch.allclose(back, nodes._rescaled(mine.samples, mine.scaling, model_scale), atol=1e-5)
    assert not torch.allclose(theirs.samples, mine.samples, atol=1e-3)
