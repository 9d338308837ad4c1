"""Cheap live previews: denoised latents -> RGB by a fixed linear map, no VAE decode.

The factors are the family's (`sdlab.families.LatentFormat`, ComfyUI's "latent2rgb" matrices). The
preview has the latent's size (1/8 of the image for SD).
"""

from __future__ import annotations

import base64
import io
import json
import struct
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from sdlab.families import LatentFormat

PREVIEW_IMAGE, PNG = 1, 2  # ComfyUI's binary WebSocket event type and image type
PREVIEW_IMAGE_WITH_METADATA = 4  # for clients that announced `supports_preview_metadata`


def latent_preview(latents: Tensor | None, latent_format: LatentFormat | None) -> Image.Image | None:
    """The first image of scaled latents (B, C, h, w) as h x w RGB by the family's factors (None without
    latents or format, or when the channels are not the format's)."""
    if latents is None or latent_format is None:
        return None
    if latents.ndim != 4 or latents.shape[1] != len(latent_format.rgb_factors):
        return None
    rgb = latent_format.preview(latents[0].detach())
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


def preview_frame(image: Image.Image, metadata: dict[str, Any] | None = None) -> bytes:
    """ComfyUI's binary preview message: big-endian event type 1, image type 2 (PNG), the PNG bytes; with
    metadata, event type 4, the length of the metadata JSON (which names the image type), it, the PNG."""
    if metadata is None:
        return struct.pack(">II", PREVIEW_IMAGE, PNG) + png_bytes(image)
    header = json.dumps({**metadata, "image_type": "image/png"}).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(header)) + header + png_bytes(image)
