"""Images in and out: tensor <-> PIL, resize modes, masks, PNG files with the A1111 `parameters` chunk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, PngImagePlugin
from torch import Tensor

RESIZE_MODES = ("resize", "crop", "fill")


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images, rounded to 8 bits as diffusers and A1111 do."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: RUF100
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def resize_image(image: Image.Image, width: int, height: int, mode: str = "resize") -> Image.Image:
    """Fit an image to width x height: stretch (`resize`), cover and centre-crop (`crop`), or
    contain and pad with stretched edges (`fill`), as A1111's resize modes."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    image = image.convert("RGB")
    if mode == "resize":
        return image.resize((width, height), Image.LANCZOS)
    ratio = width / height
    src_ratio = image.width / image.height
    cover = (src_ratio < ratio) if mode == "crop" else (src_ratio > ratio)
    w, h = (width, round(width / src_ratio)) if cover else (round(height * src_ratio), height)
    resized = image.resize((max(1, w), max(1, h)), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    if mode == "crop":
        canvas.paste(resized, ((width - w) // 2, (height - h) // 2))
        return canvas
    canvas.paste(resized.resize((width, height), Image.LANCZOS))  # stretched backdrop for the margins
    canvas.paste(resized, ((width - w) // 2, (height - h) // 2))
    return canvas


def prepare_mask(mask: Image.Image, width: int, height: int, blur: int = 0, invert: bool = False) -> Tensor:
    """A mask image (white = repaint) -> (1, 1, H, W) float in [0, 1], optionally blurred/inverted."""
    m = mask.convert("L")
    if m.size != (width, height):
        m = m.resize((width, height), Image.LANCZOS)
    if invert:
        m = Image.eval(m, lambda v: 255 - v)
    if blur > 0:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None]


# ---------------------------------------------------------------------------------------------
# PNG files


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write a PNG atomically under a name that is not taken yet (`name-1.png`, ... if it is)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sdlab-", suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        return _link_unique(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _link_unique(tmp: Path, path: Path) -> Path:
    """Hard-link the finished file to the first free name; never replaces an existing file."""
    stem, suffix = path.stem, path.suffix or ".png"
    for n in range(100000):
        target = path if n == 0 else path.with_name(f"{stem}-{n}{suffix}")
        try:
            os.link(tmp, target)
            return target
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: no free file name")


def next_output_path(folder: str | Path, seed: int) -> Path:
    """`folder/00001-<seed>.png` numbered after the files already there (A1111 style)."""
    folder = Path(folder)
    numbers = (
        [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")] if folder.is_dir() else []
    )
    return folder / f"{max(numbers, default=0) + 1:05d}-{seed}.png"


def read_parameters(path: str | Path) -> str | None:
    """The A1111 `parameters` text of a PNG, or None."""
    with Image.open(path) as im:
        return im.info.get("parameters")
