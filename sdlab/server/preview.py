"""Cheap live previews: denoised latents -> RGB by a fixed linear map, no VAE decode.

The factors are the SD1.x latent->RGB matrix ComfyUI uses for its "latent2rgb" previews (SD2 shares
the latent space). The preview has the latent's size (1/8 of the image for SD).
"""

from __future__ import annotations

import base64
import io
import struct

import torch
from PIL import Image
from torch import Tensor

SD_LATENT_RGB = torch.tensor(
    [  # R, G, B per latent channel
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)
PREVIEW_IMAGE, PNG = 1, 2  # ComfyUI's binary WebSocket event type and image type


def latent_preview(latents: Tensor) -> Image.Image | None:
    """The first image of scaled latents (B, 4, h, w) as h x w RGB (None for other channel counts)."""
    if latents.ndim != 4 or latents.shape[1] != SD_LATENT_RGB.shape[0]:
        return None
    rgb = torch.einsum("chw,cr->hwr", latents[0].detach().float().cpu(), SD_LATENT_RGB)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def png_bytes(image: Image.Image) -> bytes:
    """An image as fast-compressed PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def png_base64(image: Image.Image) -> str:
    """An image as base64 PNG (A1111's image encoding)."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def preview_frame(image: Image.Image) -> bytes:
    """ComfyUI's binary preview message: big-endian event type 1, image type 2 (PNG), the PNG bytes."""
    return struct.pack(">II", PREVIEW_IMAGE, PNG) + png_bytes(image)
