"""Upscalers by name, as AUTOMATIC1111 offers them: the built-in pixel resamplers and one entry per model
file (its stem), run the way A1111's `Upscaler.upscale` runs them.

Pixel conventions differ between the two front ends and are kept exactly: A1111 feeds networks BGR and
truncates the output to 8 bits (`upscaler_utils.upscale_without_tiling`); ComfyUI feeds RGB and sdlab
rounds its images to 8 bits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlab.checkpoints.io import WEIGHT_SUFFIXES
from sdlab.upscale.base import Upscaler
from sdlab.upscale.load import load_upscaler
from sdlab.upscale.tiling import run_upscaler

BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")  # A1111's built-in pixel upscalers
CONVENTIONS = ("a1111", "comfy")
_RESAMPLE = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


class UnknownUpscaler(LookupError):
    """An upscaler name that is neither built in nor a model file in the folders."""


def upscaler_files(dirs: Sequence[Path]) -> dict[str, Path]:
    """Model name (file stem) -> file, over the folders in order (the first of a name wins), recursively."""
    found: dict[str, Path] = {}
    for folder in map(Path, dirs):
        if not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.lower().endswith(WEIGHT_SUFFIXES) and not name.startswith("."):
                    found.setdefault(Path(name).stem, Path(dirpath) / name)
    return found


def upscaler_names(dirs: Sequence[Path]) -> list[str]:
    """The built-in upscalers, then the model files found in the folders by name (A1111's order)."""
    models = sorted((n for n in upscaler_files(dirs) if n not in BUILTIN_UPSCALERS), key=str.lower)
    return [*BUILTIN_UPSCALERS, *models]


def upscaler_path(name: str, dirs: Sequence[Path]) -> Path:
    """The model file behind an upscaler name."""
    files = upscaler_files(dirs)
    if name not in files:
        raise UnknownUpscaler(f"upscaler {name!r} not found; available: {', '.join(upscaler_names(dirs))}")
    return files[name]


def upscale_image(
    image: Image.Image, name: str, scale: float, dirs: Sequence[Path], *, convention: str = "a1111"
) -> Image.Image:
    """`image` upscaled by `scale` with the named upscaler (built in, or a model file in `dirs`), as
    A1111's `Upscaler.upscale` does (see `rescale`)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown pixel convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
    return rescale(image.convert("RGB"), scale, _step(name, scale, dirs, convention))


def rescale(image: Image.Image, scale: float, step: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """A1111's `Upscaler.upscale`: the target is the scaled size rounded down to a multiple of 8; `step`
    (one upscaler pass) runs up to three times until the image covers it (a 4× model once for 2×, twice
    for 16×), then a Lanczos resize gives the exact target."""
    if not (scale > 0 and np.isfinite(scale)):
        raise ValueError(f"upscale factor {scale!r} must be a positive number")
    dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    if min(dest) < 8:
        raise ValueError(f"upscaling {image.width}x{image.height} by {scale} gives less than 8 pixels a side")
    for i in range(3):
        if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
            break
        size = image.size
        image = step(image)
        if image.size == size:
            break
    return image if image.size == dest else image.resize(dest, Image.LANCZOS)


def _step(
    name: str, scale: float, dirs: Sequence[Path], convention: str
) -> Callable[[Image.Image], Image.Image]:
    """One pass of the named upscaler (A1111's `do_upscale`)."""
    if name == "None":
        return lambda im: im
    if name in _RESAMPLE:
        return lambda im: im.resize((int(im.width * scale), int(im.height * scale)), _RESAMPLE[name])
    model = load_upscaler(upscaler_path(name, dirs))
    return lambda im: upscale_pixels(model, im, convention=convention)


def upscale_pixels(
    model: Upscaler, image: Image.Image, *, convention: str = "a1111", tile: int = 512, overlap: int = 32
) -> Image.Image:
    """One (tiled) run of a network over an RGB image in the front end's pixel convention."""
    arr = np.asarray(image.convert("RGB"))
    if convention == "a1111":
        arr = arr[:, :, ::-1]  # A1111 hands networks BGR
    x = torch.from_numpy((np.ascontiguousarray(arr.transpose(2, 0, 1)) / 255).astype(np.float32))[None]
    y = run_upscaler(model, x, tile=tile, overlap=overlap)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    if convention == "a1111":
        out = (255.0 * y).astype(np.uint8)[:, :, ::-1]  # truncated, back to RGB
    else:
        out = np.round(255.0 * y).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(out), "RGB")
