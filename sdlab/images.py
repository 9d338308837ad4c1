"""Images in and out: user images read within limits, tensor <-> PIL, resize modes, masks, PNG files with
the A1111 `parameters` chunk."""

from __future__ import annotations

import argparse
import io
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin, UnidentifiedImageError
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
    """Fit an image to width x height as A1111's `images.resize_image` does: stretch (`resize`), cover and
    centre-crop (`crop`), or contain and fill the margins with the stretched edge rows or columns (`fill`).
    Greyscale masks stay greyscale; anything else becomes RGB."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    image = image if image.mode == "L" else image.convert("RGB")
    if mode == "resize":
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    by_width = ratio > src_ratio if mode == "crop" else ratio < src_ratio  # the side that fits exactly
    w, h = width, image.height * width // image.width
    if not by_width:
        w, h = image.width * height // image.height, height
    resized = image.resize((w, h), Image.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(resized, (width // 2 - w // 2, height // 2 - h // 2))
    if mode == "fill" and ratio != src_ratio:
        _stretch_edges(canvas, resized, by_width)
    return canvas


def _stretch_edges(canvas: Image.Image, resized: Image.Image, wide: bool) -> None:
    """Fill the empty bands around `resized` (centred on `canvas`) with its first and last rows (`wide`
    images) or columns stretched across them, as A1111's "resize and fill" does."""
    w, h = resized.size
    if wide:
        band = canvas.height // 2 - h // 2
        if band > 0:
            canvas.paste(resized.resize((w, band), box=(0, 0, w, 0)), (0, 0))
            canvas.paste(resized.resize((w, band), box=(0, h, w, h)), (0, band + h))
    else:
        band = canvas.width // 2 - w // 2
        if band > 0:
            canvas.paste(resized.resize((band, h), box=(0, 0, 0, h)), (0, 0))
            canvas.paste(resized.resize((band, h), box=(w, 0, w, h)), (band + w, 0))


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
# inpainting: masks, crop regions, masked content and overlays as A1111 makes them
# (modules/processing.py StableDiffusionProcessingImg2Img.init, modules/masking.py)

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3
Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), x2 and y2 exclusive


def masked_content(value: str | int) -> str:
    """A1111's inpainting_fill by name or by number (0 fill, 1 original, 2 latent noise, 3 latent nothing)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(MASKED_CONTENT):
        return MASKED_CONTENT[value]
    if value in MASKED_CONTENT:
        return str(value)
    raise ValueError(f"inpainting_fill must be one of {', '.join(MASKED_CONTENT)} (or 0-3), got {value!r}")


def read_mask(mask: Image.Image, round_alpha: bool = True, invert: bool = False) -> Image.Image:
    """A mask image -> greyscale, white = repaint (`mask_from`); without `round_alpha` (A1111's
    mask_round false) the alpha of a partly transparent RGBA mask keeps its grey levels."""
    alpha = mask.getchannel("A") if mask.mode == "RGBA" and not round_alpha else None
    grey = alpha if alpha is not None and alpha.getextrema() != (255, 255) else mask_from(mask)
    return ImageOps.invert(grey) if invert else grey


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """Gaussian blur of a greyscale mask along x, then y, bit-exact with A1111's cv2.GaussianBlur calls:
    σ = blur, 2·int(2.5σ + 0.5) + 1 taps, OpenCV's 8-bit fixed-point kernel, mirrored borders."""
    arr = np.asarray(mask.convert("L"))
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma > 0 and arr.shape[axis] > 1:  # OpenCV leaves a one-pixel side alone
            arr = _blur_axis(arr, sigma, axis)
    return Image.fromarray(arr, "L")


def _blur_axis(arr: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """One 8-bit Gaussian pass: integer taps summing to 256, then (sum + 128) >> 8. float32 sums of
    products below 2^16 are exact, so the convolution gives OpenCV's integers."""
    taps = _gaussian_taps(2 * int(2.5 * sigma + 0.5) + 1, sigma)
    half, length = len(taps) // 2, arr.shape[axis]
    period = 2 * (length - 1)  # BORDER_REFLECT_101: ... 2 1 | 0 1 2 ... n-1 | n-2 n-3 ...
    index = np.arange(-half, length + half) % period
    index = np.where(index >= length, period - index, index)
    rows = torch.from_numpy(np.moveaxis(np.take(arr, index, axis=axis), axis, -1).astype(np.float32))
    kernel = torch.tensor(taps, dtype=torch.float32)[None, None]
    sums = F.conv1d(rows.reshape(-1, 1, rows.shape[-1]), kernel).reshape(*rows.shape[:-1], length)
    out = (sums.to(torch.int64) + 128) >> 8
    return np.ascontiguousarray(np.moveaxis(out.to(torch.uint8).numpy(), -1, axis))


def _gaussian_taps(n: int, sigma: float) -> list[int]:
    """OpenCV's bit-exact Gaussian kernel of n (odd) taps in 1/256ths: exp(-x²/2σ²) normalised in
    doubles, the outer taps rounded half-even with the error carried inwards, the centre taking the rest."""
    scale = -0.125 / (sigma * sigma)  # x runs over even numbers 1-n .. -2, twice the tap offset
    outer = [math.exp(float(x * x) * scale) for x in range(1 - n, 0, 2)]
    total = 0.0
    for v in outer:  # in order, as OpenCV adds them (Python's sum() compensates)
        total += v
    inverse = 1.0 / (total * 2.0 + 1.0)
    taps, carry = [], 0.0
    for v in outer:
        wanted = v * inverse * 256.0 + carry
        taps.append(round(wanted))
        carry = wanted - taps[-1]
    return [*taps, 256 - 2 * sum(taps), *taps[::-1]]


def mask_box(mask: Image.Image, pad: int = 0) -> Box | None:
    """The box around a mask's non-zero pixels grown by `pad` on each side within the image; None for an
    empty mask (A1111's get_crop_region_v2)."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_box(box: Box, width: int, height: int, image_width: int, image_height: int) -> Box:
    """Grow a box to the width:height aspect about its centre, moved back inside the image and clipped
    to it (A1111's expand_crop_region, so "only masked" crops what A1111 crops)."""
    x1, y1, x2, y2 = box
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, limit: int) -> tuple[int, int]:
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def _outside(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image premultiplied by 255 − mask (RGBa): opaque where kept, clear where repainted."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    return kept


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The "fill" masked content: the masked part replaced by colours smeared in from around it, the
    kept pixels blurred at radii 256 down to 0 and stacked by alpha compositing (A1111's masking.fill)."""
    kept = _outside(image, mask)
    out = Image.new("RGBA", image.size)
    for radius, times in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def mask_overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The init image to lay over the results (RGBA, alpha 255 − mask): it keeps the unmasked pixels."""
    return _outside(image, mask).convert("RGBA")


def apply_overlay(result: Image.Image, overlay: Image.Image, paste_to: Box | None = None) -> Image.Image:
    """Composite the overlay over a result; a result made from a crop is first scaled (cover and crop)
    to the crop's size and placed at its corner, `paste_to` = (x, y, w, h) (A1111's apply_overlay)."""
    if paste_to is not None:
        x, y, w, h = paste_to
        canvas = Image.new("RGBA", overlay.size)
        canvas.paste(resize_image(result, w, h, "crop"), (x, y))
        result = canvas
    out = result.convert("RGBA")
    out.alpha_composite(overlay)
    return out.convert("RGB")


def latent_mask(mask: Image.Image, width: int, height: int, round_: bool = True) -> Tensor:
    """A mask at latent size (1, 1, h, w) in [0, 1], bicubic (PIL's default resize) and rounded to 0/1
    with `round_`: what A1111 blends the latents with."""
    small = np.asarray(mask.convert("L").resize((width, height), Image.BICUBIC), dtype=np.float32) / 255
    t = torch.from_numpy(small)[None, None]
    return t.round() if round_ else t


# ---------------------------------------------------------------------------------------------
# user images: bounded decode, EXIF orientation, every mode to 8 bits

# Raster formats a user image may be in; the others Pillow knows (EPS runs Ghostscript, PDF, PSD, ICO,
# FITS, ...) are refused by name.
Image.init()  # register every plugin, so that the list below names only formats this Pillow reads
IMAGE_FORMATS = tuple(
    f
    for f in ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "JPEG2000", "PPM", "TGA", "QOI")
    if f in Image.OPEN
)
WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # more than 8 bits per sample
# Pillow's own bomb check (warning above Image.MAX_IMAGE_PIXELS, error above twice that) is left as it
# is; its warning is noise here, as every user image is bounded by ImageLimits before it is decoded.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    """A user image sdlab will not read: unreadable, corrupt or not a raster image (names the input)."""


class ImageTooLarge(ImageError):
    """A user image with more bytes or pixels than its ImageLimits allow."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one user image, checked before any pixel is decoded (`--max-image-pixels/-bytes`)."""

    max_pixels: int = 64 * 2**20  # 8192² decoded pixels (256 MiB as RGBA); below Pillow's bomb limits
    max_bytes: int = 50 * 2**20  # the encoded file


DEFAULT_LIMITS = ImageLimits()


def add_image_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """`--max-image-pixels` and `--max-image-bytes`: the ImageLimits of a command's user images."""
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_LIMITS.max_pixels,
        help=f"refuse input images with more pixels than this (default: {DEFAULT_LIMITS.max_pixels:,})",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_LIMITS.max_bytes,
        help=f"refuse input image files larger than this (default: {DEFAULT_LIMITS.max_bytes:,})",
    )


def open_image(
    source: str | Path | bytes, what: str, limits: ImageLimits = DEFAULT_LIMITS, mode: str = "RGB"
) -> Image.Image:
    """A user image (file or bytes) decoded within `limits`: its first frame only, EXIF orientation
    applied, as 8 bits per sample in `mode`; ImageError naming `what` when it cannot be.

    Modes: `RGBA` (transparency kept: ComfyUI's LoadImage makes its mask from it), `RGB` (alpha
    composited on white, A1111's default img2img background) or `L`, a mask (white = repaint): a mask
    with transparency is its alpha thresholded at 128, as A1111's API reads one; else its luma.
    Samples wider than 8 bits: I;16 and I (read as 16-bit data, as PNG and ComfyUI do: clipped to
    0..65535) keep their top 8 bits (v >> 8); F is taken as 0..1 (x 255, rounded, clipped; NaN is 0).
    Every other mode goes through Pillow's conversion (CMYK and YCbCr without colour management).
    """
    with _opened(source, what, limits) as im:
        im.load()
        image = _eight_bit(ImageOps.exif_transpose(im))
        text = {k: v for k, v in im.info.items() if isinstance(v, str)}  # text chunks: the pixels changed
    if mode == "RGB":
        image = flatten(image)
    elif mode == "L":
        image = mask_from(image)
    elif mode == "RGBA":
        image = image.convert("RGBA")
    else:
        raise ValueError(f"mode must be RGB, RGBA or L, got {mode!r}")
    image.info = text  # the A1111 `parameters` chunk, for png-info
    return image


def probe_image(
    source: str | Path | bytes, what: str, limits: ImageLimits = DEFAULT_LIMITS
) -> tuple[int, int]:
    """A user image's stored (width, height), its format, bytes and pixels checked from its header alone
    (no pixel is decoded; EXIF orientation not applied)."""
    with _opened(source, what, limits) as im:
        return im.size


def flatten(image: Image.Image) -> Image.Image:
    """RGB, RGBA composited on white (A1111's `images.flatten` with its default background)."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    background.alpha_composite(image)
    return background.convert("RGB")


def mask_from(image: Image.Image) -> Image.Image:
    """An L mask: the alpha of an image with transparency (> 128 is 255, as A1111's
    `create_binary_mask`), else its luma."""
    if image.mode == "RGBA" and image.getchannel("A").getextrema() != (255, 255):
        return image.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return image.convert("L")


@contextmanager
def _opened(source: str | Path | bytes, what: str, limits: ImageLimits) -> Iterator[Image.Image]:
    """The image opened lazily (header only) once its bytes and pixels are within limits; any error
    of the decoder, here or in the caller's block, becomes an ImageError naming `what`."""
    size = len(source) if isinstance(source, bytes) else _file_size(Path(source), what)
    if size > limits.max_bytes:
        raise ImageTooLarge(f"{what}: {size:,} bytes exceeds the limit of {limits.max_bytes:,} bytes")
    if size == 0:
        raise ImageError(f"{what}: empty file, not an image")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp, formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > limits.max_pixels:
                raise ImageTooLarge(
                    f"{what}: {w}x{h} = {w * h:,} pixels exceeds the limit of {limits.max_pixels:,} pixels"
                )
            yield im
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # beyond Pillow's own limit, which is higher than ours
        raise ImageTooLarge(f"{what}: too many pixels ({e})") from e
    except UnidentifiedImageError as e:
        formats = ", ".join(IMAGE_FORMATS)
        raise ImageError(
            f"{what}: not an image sdlab reads (unknown format or corrupt header; reads {formats})"
        ) from e
    except PermissionError as e:
        raise ImageError(f"{what}: permission denied") from e
    except Exception as e:  # a hostile file can make any decoder raise anything: name the file, not the line
        raise ImageError(f"{what}: corrupt or truncated image ({type(e).__name__}: {e})") from e


def _file_size(path: Path, what: str) -> int:
    try:
        if path.is_dir():
            raise ImageError(f"{what}: is a folder, not an image file")
        return path.stat().st_size
    except FileNotFoundError as e:
        raise ImageError(f"{what}: no such file") from e
    except OSError as e:
        raise ImageError(f"{what}: cannot read ({e.strerror or e})") from e


def _eight_bit(image: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGBA when it has alpha or a transparent colour, else 8-bit RGB."""
    if image.mode in WIDE_MODES:
        image = _wide_to_l(image)
    elif image.mode == "La":  # premultiplied: Pillow converts it to LA only
        image = image.convert("LA")
    has_alpha = image.mode.endswith(("A", "a")) or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")


def _wide_to_l(image: Image.Image) -> Image.Image:
    """I;16 / I / F -> L (see `open_image`), LA when a grey value is marked transparent (16-bit PNG tRNS)."""
    arr = np.asarray(image)
    if image.mode == "F":
        scaled = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0) * 255.0
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    else:
        grey = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return Image.fromarray(grey)
    alpha = np.where(arr == transparent, 0, 255).astype(np.uint8)
    return Image.merge("LA", (Image.fromarray(grey), Image.fromarray(alpha)))


# ---------------------------------------------------------------------------------------------
# PNG files


def save_png(
    image: Image.Image, path: str | Path, parameters: str | None = None, text: dict[str, str] | None = None
) -> Path:
    """Write a PNG atomically under a name that is not taken yet (`name-1.png`, ... if it is), with the
    A1111 `parameters` chunk and any other text chunks (ComfyUI's `prompt` and `workflow`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    for key, value in (text or {}).items():
        info.add_text(key, value)
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


def read_parameters(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> str | None:
    """The A1111 `parameters` text of a PNG, or None; ImageError for a file that is not a readable image."""
    with _opened(path, str(path), limits) as im:
        return im.info.get("parameters")
