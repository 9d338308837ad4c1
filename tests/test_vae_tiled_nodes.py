"""ComfyUI's VAEEncodeTiled / VAEDecodeTiled on a tiny VAE that downsamples 8x (four levels, 32 channels),
so the smallest tile ComfyUI allows (320 px: 40 latent cells) splits a 336x320 image in two.

The bound: sdlab's tiles share GroupNorm statistics and run the middle block whole (`sdlab.vae_tools`),
so they differ from the untiled result only where a tile's zero padding reaches into the blended area
(one cell per 3x3 conv at the latent size: more than the 4 zero-weight cells of a 16-cell overlap for
this VAE). ComfyUI runs the whole VAE on each tile and feathers them (`comfy.utils.tiled_scale`,
transcribed below, same tiles and overlap): its distance from the untiled result is what its users get,
and sdlab's tiled result must be closer to the untiled one than that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from reference import randomize

from sdlab.config import VAEConfig
from sdlab.models.vae import AutoencoderKL
from sdlab.server import nodes
from sdlab.server import nodes_core as core

VAE8 = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
TILE = 320


def _comfy_tiled_scale(samples, function, tile_x, tile_y, overlap, upscale_amount, out_channels):
    """ComfyUI's comfy/utils.py tiled_scale (one batch item), transcribed."""
    s = samples
    size = (s.shape[0], out_channels, round(s.shape[2] * upscale_amount), round(s.shape[3] * upscale_amount))
    out, out_div = torch.zeros(size), torch.zeros(size)
    for y in range(0, s.shape[2], tile_y - overlap):
        for x in range(0, s.shape[3], tile_x - overlap):
            x = max(0, min(s.shape[-1] - overlap, x))
            y = max(0, min(s.shape[-2] - overlap, y))
            ps = function(s[:, :, y : y + tile_y, x : x + tile_x])
            mask = torch.ones_like(ps)
            feather = round(overlap * upscale_amount)
            for t in range(feather):
                mask[:, :, t : 1 + t, :] *= (1.0 / feather) * (t + 1)
                mask[:, :, mask.shape[2] - 1 - t : mask.shape[2] - t, :] *= (1.0 / feather) * (t + 1)
                mask[:, :, :, t : 1 + t] *= (1.0 / feather) * (t + 1)
                mask[:, :, :, mask.shape[3] - 1 - t : mask.shape[3] - t] *= (1.0 / feather) * (t + 1)
            rows = slice(round(y * upscale_amount), round((y + tile_y) * upscale_amount))
            cols = slice(round(x * upscale_amount), round((x + tile_x) * upscale_amount))
            out[:, :, rows, cols] += ps * mask
            out_div[:, :, rows, cols] += mask
    return out / out_div


def test_tiled_vae_nodes_are_closer_to_untiled_than_comfyuis_tiling() -> None:
    vae = randomize(AutoencoderKL(VAE8), 7).eval()
    assert vae.cfg.downscale == 8
    g = torch.Generator().manual_seed(4)
    pixels = F.interpolate(torch.rand(1, 3, 10, 12, generator=g), size=(320, 336), mode="bilinear") * 2 - 1
    with torch.inference_mode():
        (whole,) = nodes.vae_encode(None, pixels, vae)  # type: ignore[arg-type]
        (tiled,) = core.vae_encode_tiled(None, pixels, vae, TILE)  # type: ignore[arg-type]
        scale = vae.cfg.scale_factor
        comfy = _comfy_tiled_scale(
            pixels, lambda p: vae.encode(p).mode() * scale, TILE, TILE, core.ENCODE_OVERLAP, 1 / 8, 4
        )
        encode_error = (tiled.samples - whole.samples).abs().max()
        assert tiled.samples.shape == whole.samples.shape == (1, 4, 40, 42)
        assert 0 < encode_error < (comfy - whole.samples).abs().max()

        (image,) = nodes.vae_decode(None, whole, vae)  # type: ignore[arg-type]
        (tiled_image,) = core.vae_decode_tiled(None, whole, vae, TILE)  # type: ignore[arg-type]
        cells = TILE // 8
        comfy = _comfy_tiled_scale(
            whole.samples, lambda z: vae.decode(z / scale), cells, cells, core.DECODE_OVERLAP, 8, 3
        )
        decode_error = (tiled_image - image).abs().max()
        assert tiled_image.shape == image.shape == (1, 3, 320, 336)
        assert 0 < decode_error < (comfy - image).abs().max()
