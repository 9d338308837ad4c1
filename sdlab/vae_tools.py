"""The VAE as a tool of its own: tiled encode/decode, latent files, and round-trip reports.

Tiling: the image (or latent) is cut into overlapping tiles on the latent grid, each tile runs through
the VAE alone, and the overlaps are blended with linear (feathered) weights, so there are no seams and
memory stays bounded (the approach of diffusers' `tiled_decode` and ComfyUI's `tiled_scale`). The outer
quarter of each overlap is discarded, so where the network is local (its convolutions) tiles match the
whole image. They still differ because every GroupNorm and the mid-block self-attention see only their
tile: a smooth per-tile shift, not a seam, whose size depends on the weights (large with random ones).

Image sides must be multiples of the VAE's downscale (8 for SD): other sizes are cropped down to the
nearest multiple, dropping the last rows/columns, so every kept pixel is compared one to one in a round
trip (A1111 resizes instead, which would blur the PSNR comparison).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdlab.checkpoints.detect import detect_vae
from sdlab.checkpoints.io import read_metadata, read_state_dict, write_safetensors
from sdlab.checkpoints.load import StableDiffusion, build_module, read_checkpoint, read_vae
from sdlab.config import VAEConfig
from sdlab.images import save_png, to_pil, to_tensor
from sdlab.models.vae import AutoencoderKL, DiagonalGaussian

TILE_ABOVE_PIXELS = 1024 * 1024  # automatic tiling for images larger than this
DECODE_TILE, DECODE_OVERLAP = 64, 16  # latent pixels (512 and 128 image pixels for SD)
ENCODE_TILE, ENCODE_OVERLAP = 512, 128  # image pixels
LATENT_KEY = "latent"

# ---------------------------------------------------------------------------------------------
# tiling


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """Offsets of the fewest `tile`-long tiles covering `n`, evenly spread, overlapping by >= `overlap`."""
    if n <= tile:
        return [0]
    count = math.ceil((n - overlap) / (tile - overlap))
    return [i * (n - tile) // (count - 1) for i in range(count)]


def _ramp(length: int, overlap: int, left: bool, right: bool) -> Tensor:
    """Blend weights along one side of a tile, at each edge shared with a neighbour: 0 over the outer
    quarter of the overlap (the pixels that saw the tile's zero padding), then rising linearly to 1."""
    margin = overlap // 4
    i = torch.arange(length, dtype=torch.float32) + 0.5
    w = torch.ones(length)
    if left:
        w = torch.minimum(w, ((i - margin) / (overlap - 2 * margin)).clamp(0, 1))
    if right:
        w = torch.minimum(w, ((length - i - margin) / (overlap - 2 * margin)).clamp(0, 1))
    return w


def _run_tiled(fn: Callable[[Tensor], Tensor], x: Tensor, grid: int, tile: int, overlap: int) -> Tensor:
    """Apply `fn` tile by tile on a latent grid and blend the outputs with feathered weights.

    `x` spans the grid with `grid` input pixels per grid cell (1 for latents, the downscale for images);
    `fn` maps a tile to `s` output pixels per cell, the same `s` for every tile.
    """
    if not 0 < overlap < tile:
        raise ValueError(f"tile overlap must be in (0, tile): got tile {tile}, overlap {overlap}")
    h, w = x.shape[-2] // grid, x.shape[-1] // grid
    th, tw = min(tile, h), min(tile, w)
    out = weights = None
    for y in _starts(h, th, overlap):
        for x0 in _starts(w, tw, overlap):
            piece = fn(x[..., y * grid : (y + th) * grid, x0 * grid : (x0 + tw) * grid])
            s = piece.shape[-1] // tw  # output pixels per grid cell
            if out is None:
                out = piece.new_zeros((*piece.shape[:-2], h * s, w * s))
                weights = piece.new_zeros((h * s, w * s))
            mask = torch.outer(
                _ramp(th * s, overlap * s, y > 0, y + th < h), _ramp(tw * s, overlap * s, x0 > 0, x0 + tw < w)
            ).to(piece)
            out[..., y * s : (y + th) * s, x0 * s : (x0 + tw) * s] += piece * mask
            weights[y * s : (y + th) * s, x0 * s : (x0 + tw) * s] += mask
    return out / weights


def _moments(vae: AutoencoderKL, x: Tensor) -> Tensor:
    """Pixels -> posterior mean and log-variance stacked on channels, the form tiles are blended in."""
    posterior = vae.encode(x)
    return torch.cat([posterior.mean, posterior.logvar], dim=1)


@torch.no_grad()
def decode_tiled(
    vae: AutoencoderKL, z: Tensor, tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP
) -> Tensor:
    """Decode VAE latents (unscaled) to pixels in tiles of `tile` latent pixels overlapping by `overlap`."""
    return _run_tiled(vae.decode, z, 1, tile, overlap)


@torch.no_grad()
def encode_tiled(
    vae: AutoencoderKL, x: Tensor, tile: int = ENCODE_TILE, overlap: int = ENCODE_OVERLAP
) -> DiagonalGaussian:
    """Encode pixels to the posterior in tiles of `tile` image pixels overlapping by `overlap`."""
    f = vae.cfg.downscale
    if x.shape[-2] % f or x.shape[-1] % f or tile % f or overlap % f:
        raise ValueError(
            f"tiled encode needs image sides, tile and overlap in multiples of {f}: "
            f"image {x.shape[-1]}x{x.shape[-2]}, tile {tile}, overlap {overlap}"
        )
    return DiagonalGaussian(_run_tiled(partial(_moments, vae), x, f, tile // f, overlap // f))


def _wants_tiles(tiled: bool | None, pixels: int) -> bool:
    """An explicit choice, or tiles when the image is larger than TILE_ABOVE_PIXELS."""
    return pixels > TILE_ABOVE_PIXELS if tiled is None else tiled


@torch.no_grad()
def decode(vae: AutoencoderKL, z: Tensor, tiled: bool | None = None) -> Tensor:
    """Decode VAE latents (unscaled) to pixels in [-1, 1]; `tiled=None` tiles large images only."""
    z = z.to(next(vae.parameters()))
    if _wants_tiles(tiled, z.shape[-2] * z.shape[-1] * vae.cfg.downscale**2):
        return decode_tiled(vae, z)
    return vae.decode(z)


@torch.no_grad()
def encode(vae: AutoencoderKL, x: Tensor, tiled: bool | None = None) -> DiagonalGaussian:
    """Encode pixels in [-1, 1] to the posterior; `tiled=None` tiles large images only."""
    x = x.to(next(vae.parameters()))
    if _wants_tiles(tiled, x.shape[-2] * x.shape[-1]):
        return encode_tiled(vae, x)
    return vae.encode(x)


# ---------------------------------------------------------------------------------------------
# images and latent files


def _vae_of(model: StableDiffusion | AutoencoderKL) -> AutoencoderKL:
    return model if isinstance(model, AutoencoderKL) else model.vae


def fit_to_vae(image: Image.Image, downscale: int) -> Image.Image:
    """RGB image cropped to sides that are multiples of `downscale` (the last rows/columns dropped)."""
    w, h = (image.width // downscale) * downscale, (image.height // downscale) * downscale
    if w == 0 or h == 0:
        raise ValueError(
            f"image {image.width}x{image.height} is smaller than the VAE's {downscale}x{downscale}"
        )
    image = image.convert("RGB")
    return image if (w, h) == image.size else image.crop((0, 0, w, h))


def crop_note(original: tuple[int, int], size: tuple[int, int], downscale: int) -> str | None:
    """The line telling the user an image was cropped to fit the VAE, or None when it was not."""
    if original == size:
        return None
    return (
        f"note: cropped {original[0]}x{original[1]} to {size[0]}x{size[1]} "
        f"(the VAE needs sides in multiples of {downscale})"
    )


def encode_pixels(
    vae: AutoencoderKL,
    pixels: Tensor,
    generator: torch.Generator | None = None,
    tiled: bool | None = None,
) -> Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> latents scaled as the U-Net sees them, `(z - shift) * scale`;
    z is a posterior draw with noise from `generator`, else the posterior mean."""
    posterior = encode(vae, pixels, tiled)
    z = posterior.sample(generator) if generator is not None else posterior.mode()
    return (z - vae.cfg.shift_factor) * vae.cfg.scale_factor


def decode_pixels(vae: AutoencoderKL, latents: Tensor, tiled: bool | None = None) -> Tensor:
    """Scaled latents (B, C, h, w) -> pixels (B, 3, H, W) in [-1, 1], one image at a time to bound memory."""
    z = latents / vae.cfg.scale_factor + vae.cfg.shift_factor
    return torch.cat([decode(vae, z[i : i + 1], tiled) for i in range(z.shape[0])])


def encode_image(
    model: StableDiffusion | AutoencoderKL,
    image: Image.Image,
    *,
    generator: torch.Generator | None = None,
    tiled: bool | None = None,
) -> Tensor:
    """Image -> (1, C, H/f, W/f) scaled latents (`encode_pixels`), the image first cropped to multiples
    of the downscale (see `fit_to_vae`)."""
    vae = _vae_of(model)
    return encode_pixels(vae, to_tensor(fit_to_vae(image, vae.cfg.downscale)), generator, tiled).float().cpu()


def decode_latents(
    model: StableDiffusion | AutoencoderKL, latents: Tensor, *, tiled: bool | None = None
) -> list[Image.Image]:
    """Scaled latents (B, C, h, w) -> B RGB images."""
    return to_pil(decode_pixels(_vae_of(model), latents, tiled).float().cpu())


def save_latents(
    latents: Tensor, path: str | Path, vae_cfg: VAEConfig, original_size: tuple[int, int] | None = None
) -> Path:
    """Write scaled latents to a new .safetensors file (key `latent`) with the scale and sizes as metadata."""
    f = vae_cfg.downscale
    size = f"{latents.shape[-1] * f}x{latents.shape[-2] * f}"
    metadata = {
        "format": "sdlab-latent",
        "scale_factor": str(vae_cfg.scale_factor),
        "shift_factor": str(vae_cfg.shift_factor),
        "downscale": str(f),
        "size": size,
        "original_size": f"{original_size[0]}x{original_size[1]}" if original_size else size,
    }
    return write_safetensors({LATENT_KEY: latents.float().cpu()}, path, metadata=metadata)


def load_latents(path: str | Path, channels: int = 4) -> Tensor:
    """The float32 (B, channels, h, w) latents of a file written by `save_latents`, checked."""
    tensors = read_state_dict(path)
    if LATENT_KEY not in tensors:
        raise ValueError(f"{path}: no {LATENT_KEY!r} tensor (it holds {', '.join(sorted(tensors)[:5])})")
    z = tensors[LATENT_KEY]
    if z.ndim != 4 or z.numel() == 0:
        raise ValueError(
            f"{path}: latent has shape {tuple(z.shape)}; expected (batch, channels, height, width)"
        )
    if z.shape[1] != channels:
        raise ValueError(f"{path}: latent has {z.shape[1]} channels; this VAE takes {channels}")
    if not z.is_floating_point():
        raise ValueError(f"{path}: latent has dtype {z.dtype}; expected floating point")
    if not torch.isfinite(z).all():
        raise ValueError(f"{path}: latent holds NaN or infinite values")
    return z.float()


# ---------------------------------------------------------------------------------------------
# round trip


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB between two same-size images on 8-bit RGB: 10 log10(255² / MSE)."""
    x, y = (np.asarray(im.convert("RGB"), dtype=np.float64) for im in (a, b))
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {a.width}x{a.height} and {b.width}x{b.height}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


@dataclass(frozen=True)
class RoundTrip:
    """What an encode-decode round trip keeps and loses."""

    reconstruction: Image.Image
    original_size: tuple[int, int]  # (width, height) before cropping to the downscale
    latent_shape: tuple[int, ...]
    compression_ratio: float  # image numbers (W*H*3) per latent number: 48.0 for SD
    psnr_db: float

    def format(self) -> list[str]:
        """The lines `sdlab vae roundtrip` prints."""
        w, h = self.reconstruction.size
        note = crop_note(self.original_size, (w, h), w // self.latent_shape[-1])
        shape = "x".join(map(str, self.latent_shape))
        return ([] if note is None else [note]) + [
            f"image:       {w}x{h} RGB ({w * h * 3:,} numbers)",
            f"latent:      {shape} ({math.prod(self.latent_shape):,} numbers)",
            f"compression: {self.compression_ratio:.1f}x fewer numbers",
            f"PSNR:        {self.psnr_db:.2f} dB (8-bit RGB, posterior mean)",
        ]


def roundtrip(
    model: StableDiffusion | AutoencoderKL, image: Image.Image, *, tiled: bool | None = None
) -> RoundTrip:
    """Encode an image to its posterior mean and decode it back; measure the compression and the loss."""
    fitted = fit_to_vae(image, _vae_of(model).cfg.downscale)
    z = encode_image(model, fitted, tiled=tiled)
    reconstruction = decode_latents(model, z, tiled=tiled)[0]
    return RoundTrip(
        reconstruction=reconstruction,
        original_size=image.size,
        latent_shape=tuple(z.shape[1:]),
        compression_ratio=fitted.width * fitted.height * 3 / z[0].numel(),
        psnr_db=psnr(fitted, reconstruction),
    )


# ---------------------------------------------------------------------------------------------
# command line (`sdlab vae ...`; registered by sdlab.cli through `add_vae_parser`)


def _default_model() -> Path:
    """The configured default checkpoint, or a ValueError asking for -m."""
    from sdlab.checkpoints import load

    find = getattr(load, "default_model_path", None)  # not every build of sdlab has a default model yet
    path = find() if find is not None else None
    if path is None or not Path(path).exists():
        raise ValueError("no default model found; pass a checkpoint with -m/--model or a VAE file with --vae")
    return Path(path)


def load_vae(model: str | Path | None = None, vae: str | Path | None = None) -> AutoencoderKL:
    """The VAE of a checkpoint (the default one when neither is given), or of a standalone VAE file.

    A standalone file alone gets the SD1/SD2 scale factor (shapes cannot tell an SDXL VAE apart);
    with `model` too, it takes that model's scale factor.
    """
    if model is None and vae is not None:
        sd, what = read_vae(vae), str(vae)
        cfg = detect_vae(sd, what)
    else:
        ckpt = read_checkpoint(model if model is not None else _default_model())
        if vae is not None:
            ckpt.vae = read_vae(vae)
        cfg, sd, what = ckpt.detect().vae, ckpt.vae, str(vae or ckpt.source)
    return build_module(AutoencoderKL, cfg, sd, f"{what} (VAE)", torch.float32, "cpu")


def _open_image(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def cli_roundtrip(args: argparse.Namespace) -> int:
    """`sdlab vae roundtrip IMG [-o OUT]`: print the latent shape, compression and PSNR; save the result."""
    report = roundtrip(load_vae(args.model, args.vae), _open_image(args.image), tiled=args.tiled)
    print("\n".join(report.format()))
    if args.output is not None:
        print(f"wrote {save_png(report.reconstruction, args.output)}")
    return 0


def cli_encode(args: argparse.Namespace) -> int:
    """`sdlab vae encode IMG -o LATENT.safetensors`: write the scaled latents of an image."""
    vae = load_vae(args.model, args.vae)
    image = _open_image(args.image)
    seed = getattr(args, "sample_seed", None)  # optional in hand-built namespaces
    sampled = seed is not None
    generator = torch.Generator("cpu").manual_seed(seed) if sampled else None
    z = encode_image(vae, image, generator=generator, tiled=args.tiled)
    path = save_latents(z, args.output, vae.cfg, image.size)
    note = crop_note(image.size, fit_to_vae(image, vae.cfg.downscale).size, vae.cfg.downscale)
    if note:
        print(note)
    print(f"latent: {'x'.join(map(str, z.shape))} ({'sampled' if sampled else 'posterior mean'})")
    print(f"wrote {path}")
    return 0


def cli_decode(args: argparse.Namespace) -> int:
    """`sdlab vae decode LATENT -o IMG`: decode a latent file to PNG (one file per latent in a batch)."""
    vae = load_vae(args.model, args.vae)
    z = load_latents(args.latent, vae.cfg.embed_dim)
    stored = read_metadata(args.latent).get("scale_factor")
    if stored is not None and float(stored) != vae.cfg.scale_factor:
        print(f"warning: latents were scaled by {stored}, this VAE uses {vae.cfg.scale_factor}")
    for image in decode_latents(vae, z, tiled=args.tiled):
        print(f"wrote {save_png(image, args.output)}")
    return 0


def add_vae_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `sdlab vae {roundtrip,encode,decode}` on the top-level subparsers."""
    parser = subparsers.add_parser("vae", help="see what the VAE's latent space keeps and loses")
    sub = parser.add_subparsers(dest="vae_command", required=True)
    png_out = "output PNG (never overwritten: a free name like OUT-1.png is taken)"
    commands = [  # name, handler, input, what it does, what -o names
        (
            "roundtrip",
            cli_roundtrip,
            "image",
            "encode and decode an image: latent shape, compression, PSNR",
            f"{png_out}; optional",
        ),
        (
            "encode",
            cli_encode,
            "image",
            "encode an image to a latent .safetensors file",
            "output latent .safetensors file (refused if it exists)",
        ),
        ("decode", cli_decode, "latent", "decode a latent .safetensors file to PNG", png_out),
    ]
    for name, func, source, summary, output_help in commands:
        p = sub.add_parser(name, help=summary, description=summary)
        p.add_argument(source, help="input image" if source == "image" else "latent .safetensors file")
        p.add_argument("-o", "--output", required=name != "roundtrip", help=output_help)
        p.add_argument(
            "-m", "--model", help="checkpoint file or diffusers folder (default: the default model)"
        )
        p.add_argument("--vae", help="standalone VAE file (replaces the model's VAE)")
        p.add_argument(
            "--tiled",
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"tile the VAE (default: only above {TILE_ABOVE_PIXELS // 2**20} megapixel)",
        )
        if name == "encode":
            p.add_argument(
                "--sample-seed",
                type=int,
                help="draw the latent from the posterior with this seed (default: its mean)",
            )
        p.set_defaults(func=func)
    return parser
