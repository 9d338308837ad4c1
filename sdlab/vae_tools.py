"""The VAE as a tool of its own: tiled encode/decode, latent files, and round-trip reports.

Tiling bounds the memory of the full-resolution layers. The image (or latent) is cut into overlapping
tiles on the latent grid and the outputs are blended with linear (feathered) weights that are 0 over the
outer quarter of each overlap (the pixels that saw the tile's zero padding), as diffusers' `tiled_decode`
and ComfyUI's `tiled_scale` do. Unlike them, the tiles do not each run the whole VAE:

- The middle block (its self-attention mixes the whole map) runs once on the whole latent-resolution map:
  in decode on the latent itself, before the upsampling path; in encode on the stitched output of the
  downsampling path, followed by the output layers. Only the up- and downsampling paths are tiled.
- The tiled path runs layer by layer in lockstep over all tiles (as the Tiled VAE of A1111's
  multidiffusion-upscaler). At each GroupNorm, the per-group mean and variance are those of the union of
  the tiles' cores (each tile owns the cells nearer its centre, so every pixel counts once), summed in
  float64; every tile is then normalised with them, overlap included. Between layers the tiles wait on an
  `offload` device (the CPU by default) and move to the VAE's device one at a time.

So tiles differ from the whole image only through their zero padding, which reaches inwards one pixel per
3x3 conv: with margins wider than the tiled path's receptive field the result is the untiled one up to
float32 rounding; with narrower ones a small error remains near tile borders and in the statistics. The
middle block needs the whole latent-resolution map on the VAE's device (small next to the full-resolution
layers); the tiles' waiting activations (a layer and the input kept for its residual, overlaps counted
in every tile) take about as much on `offload` as the untiled VAE's largest layers.

Image sides must be multiples of the VAE's downscale (8 for SD): other sizes are cropped down to the
nearest multiple, dropping the last rows/columns, so every kept pixel is compared one to one in a round
trip (A1111 resizes instead, which would blur the PSNR comparison).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sdlab import families
from sdlab.checkpoints.detect import detect_vae
from sdlab.checkpoints.io import read_metadata, read_state_dict, write_safetensors
from sdlab.checkpoints.load import StableDiffusion, build_module, read_checkpoint, read_vae, resolve_model
from sdlab.config import VAEConfig
from sdlab.devices import Placement, add_device_arguments, resolve_device, resolve_precision
from sdlab.finite import all_finite, check_finite, dtype_name, overflow_cause
from sdlab.images import open_image, save_png, to_pil, to_tensor
from sdlab.models.blocks import set_attention
from sdlab.models.ops import compute_dtype, device_of
from sdlab.models.vae import AutoencoderKL, Decoder, DiagonalGaussian, Encoder, Level, ResnetBlock
from sdlab.offload import offload_network

log = logging.getLogger("sdlab")

TILE_ABOVE_PIXELS = 1024 * 1024  # automatic tiling for images larger than this
DECODE_TILE, DECODE_OVERLAP = 64, 16  # latent pixels (512 and 128 image pixels for SD)
ENCODE_TILE, ENCODE_OVERLAP = 512, 128  # image pixels
LATENT_KEY = "latent"
CPU_FP32 = Placement("cpu", "fp32")  # the Python API's default: float32 weights and maths on the CPU

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


@dataclass(frozen=True)
class _Tile:
    """One tile on the latent grid, in grid cells: `rows`/`cols` are [start, stop) of the tile and
    `core_rows`/`core_cols` of the part it owns, the cells nearer its centre than any neighbour's (where
    its blend weight dominates), so the cores of all tiles partition the grid."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    core_rows: tuple[int, int]
    core_cols: tuple[int, int]
    shared: tuple[bool, bool, bool, bool]  # top, bottom, left, right edge shared with a neighbour

    def crop(self, x: Tensor, s: int) -> Tensor:
        """The tile's part of `x`, a map with `s` pixels per grid cell."""
        (y0, y1), (x0, x1) = self.rows, self.cols
        return x[..., y0 * s : y1 * s, x0 * s : x1 * s]

    def core(self, piece: Tensor) -> Tensor:
        """The core of a tile-sized map `piece` (any whole number of pixels per grid cell)."""
        s = piece.shape[-1] // (self.cols[1] - self.cols[0])
        (y0, y1), (x0, x1) = self.core_rows, self.core_cols
        top, left = self.rows[0], self.cols[0]
        return piece[..., (y0 - top) * s : (y1 - top) * s, (x0 - left) * s : (x1 - left) * s]


def _spans(n: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, core start, core stop) of the tiles along one side; cores meet mid-overlap."""
    starts = _starts(n, tile, overlap)
    t = min(tile, n)
    cuts = [0, *((a + t + b) // 2 for a, b in zip(starts, starts[1:], strict=False)), n]
    return [(a, a + t, cuts[i], cuts[i + 1]) for i, a in enumerate(starts)]


def _grid(h: int, w: int, tile: int, overlap: int) -> list[_Tile]:
    """The tiles covering an `h` x `w` grid, row by row."""
    if not 0 < overlap < tile:
        raise ValueError(f"tile overlap must be in (0, tile): got tile {tile}, overlap {overlap}")
    return [
        _Tile((r0, r1), (c0, c1), (cr0, cr1), (cc0, cc1), (r0 > 0, r1 < h, c0 > 0, c1 < w))
        for r0, r1, cr0, cr1 in _spans(h, tile, overlap)
        for c0, c1, cc0, cc1 in _spans(w, tile, overlap)
    ]


def _blend(tiles: list[_Tile], pieces: list[Tensor], overlap: int) -> Tensor:
    """Stitch the tiles' outputs (each `s` pixels per grid cell) with feathered weights."""
    h, w = tiles[-1].rows[1], tiles[-1].cols[1]
    out = weights = None
    for t, piece in zip(tiles, pieces, strict=True):
        th, tw = t.rows[1] - t.rows[0], t.cols[1] - t.cols[0]
        s = piece.shape[-1] // tw  # output pixels per grid cell
        if out is None:
            out = piece.new_zeros((*piece.shape[:-2], h * s, w * s))
            weights = piece.new_zeros((h * s, w * s))
        top, bottom, left, right = t.shared
        mask = torch.outer(
            _ramp(th * s, overlap * s, top, bottom), _ramp(tw * s, overlap * s, left, right)
        ).to(piece)
        t.crop(out, s).add_(piece * mask)
        t.crop(weights, s).add_(mask)
    return out / weights


# The tiled part of the network as a flat program run in lockstep over the tiles. Each tile's state is a
# stack of tensors: the top is the running activation, below it inputs kept for a residual. An op is a
# module or function applied to the top, `_KEEP` (push the top again, for a residual) or a `_Residual`;
# every `nn.GroupNorm` is a synchronisation point where all tiles share one set of statistics.
_KEEP = "keep"


@dataclass(frozen=True)
class _Residual:
    """Pop the branch `h` and the kept input `x`; push `shortcut(x) + h` (as `ResnetBlock.forward`)."""

    shortcut: nn.Module | None


_Op = nn.Module | Callable[[Tensor], Tensor] | _Residual | str


def _resnet_ops(block: ResnetBlock) -> list[_Op]:
    shortcut = block.nin_shortcut if hasattr(block, "nin_shortcut") else None
    return [
        _KEEP,
        block.norm1,
        F.silu,
        block.conv1,
        block.norm2,
        F.silu,
        block.dropout,
        block.conv2,
        _Residual(shortcut),
    ]


def _level_ops(level: Level) -> list[_Op]:
    """`Level.forward`: its ResNets, then the resampling (its `attn` list is never run)."""
    ops = [op for block in level.block for op in _resnet_ops(block)]
    return ops if level.resample_name is None else [*ops, getattr(level, level.resample_name)]


def _encoder_ops(encoder: Encoder) -> list[_Op]:
    """`Encoder.forward` up to the middle block: pixels to the lowest-resolution features."""
    return [encoder.conv_in, *(op for level in encoder.down for op in _level_ops(level))]


def _decoder_ops(decoder: Decoder) -> list[_Op]:
    """`Decoder.forward` after the middle block: lowest-resolution features to pixels."""
    ops = [op for level in reversed(decoder.up) for op in _level_ops(level)]
    return [*ops, decoder.norm_out, F.silu, decoder.conv_out]


def _step(op: _Op, stack: list[Tensor]) -> None:
    if isinstance(op, str):  # _KEEP
        stack.append(stack[-1])
    elif isinstance(op, _Residual):
        h, x = stack.pop(), stack.pop()
        stack.append((x if op.shortcut is None else op.shortcut(x)) + h)
    else:
        stack[-1] = op(stack[-1])


def _move(stack: list[Tensor], device: torch.device) -> list[Tensor]:
    """The stack on `device`, a tensor held twice (kept for a residual) moved once."""
    moved: dict[int, Tensor] = {}
    for t in stack:
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
    return [moved[id(t)] for t in stack]


def _norm_sums(x: Tensor) -> Tensor:
    """Per sample and channel: element count, sum and sum of squares of `x`, float64, shape (3, B, C).

    The channel mean and the squares about it are summed in float32 (two passes, so no cancellation),
    then turned into plain sums in float64, where adding tiles and groups loses nothing.
    """
    x = x.float()
    n = x.shape[-2] * x.shape[-1]
    mean = x.mean((-2, -1), keepdim=True)
    centred = torch.linalg.vector_norm(x - mean, dim=(-2, -1)).double().square()
    mean = mean[..., 0, 0].double()
    return torch.stack([torch.full_like(mean, n), n * mean, centred + n * mean.square()])


def _group_norm(x: Tensor, norm: nn.GroupNorm, sums: Tensor) -> Tensor:
    """`norm(x)` with the mean and variance of `sums` (added `_norm_sums`) instead of x's own, computed
    in float32 whatever x's dtype (as `GroupNorm32`)."""
    b, c = x.shape[:2]
    count, total, squares = sums.to(x.device).view(3, b, norm.num_groups, -1).sum(-1)
    mean = total / count
    rstd = torch.rsqrt((squares / count - mean.square()).clamp_min(0) + norm.eps)  # (B, G)
    scale = rstd.repeat_interleave(c // norm.num_groups, dim=1)  # (B, C)
    shift = -mean.repeat_interleave(c // norm.num_groups, dim=1) * scale
    if norm.affine:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
    y = torch.addcmul(shift.float()[..., None, None], x.float(), scale.float()[..., None, None])
    return y.to(x.dtype)


def _lockstep(
    ops: list[_Op], tiles: list[_Tile], inputs: list[Tensor], device: torch.device, offload: torch.device
) -> list[Tensor]:
    """Run `ops` on every tile's input, layer by layer across the tiles, and return the outputs.

    At each GroupNorm every tile is normalised (overlap included) with the statistics of the union of the
    tiles' cores, a partition of the image, so each pixel is counted once and the statistics are those
    of the whole image wherever the cores are beyond the reach of the tiles' borders. Between
    synchronisation points the tiles' states wait on `offload`; one tile at a time is on `device`.
    """
    segments: list[list[_Op]] = [[]]
    for op in ops:
        if isinstance(op, nn.GroupNorm):
            segments.append([])
        segments[-1].append(op)
    states = [[piece.to(offload)] for piece in inputs]
    sums = None
    for i, segment in enumerate(segments):
        following = segments[i + 1][0] if i + 1 < len(segments) else None  # the next GroupNorm
        new_sums = None
        for k, tile in enumerate(tiles):
            stack = _move(states[k], device)
            for op in segment:
                if isinstance(op, nn.GroupNorm):
                    stack[-1] = _group_norm(stack[-1], op, sums)
                else:
                    _step(op, stack)
            if following is not None:
                part = _norm_sums(tile.core(stack[-1]))
                new_sums = part if new_sums is None else new_sums + part
            states[k] = _move(stack, offload)
            del stack  # before the next tile comes to `device`
        sums = new_sums
    return [state[-1] for state in states]


def _offload_device(offload: torch.device | str | None, device: torch.device) -> torch.device:
    return device if offload is None else torch.device(offload)


@torch.no_grad()
def decode_tiled(
    vae: AutoencoderKL,
    z: Tensor,
    tile: int = DECODE_TILE,
    overlap: int = DECODE_OVERLAP,
    offload: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Decode VAE latents (unscaled) to pixels in tiles of `tile` latent pixels overlapping by `overlap`,
    computing in `dtype` (default the VAE's).

    The middle block runs on the whole latent; the upsampling path runs tile by tile with shared
    GroupNorm statistics, the tiles waiting on `offload` (None: the VAE's device) between layers.
    """
    device = device_of(vae)
    dec = vae.decoder
    tiles = _grid(z.shape[-2], z.shape[-1], tile, overlap)
    h = dec.mid(dec.conv_in(vae.post_quant_conv(z.to(device, dtype or compute_dtype(vae)))))
    pieces = _lockstep(
        _decoder_ops(dec), tiles, [t.crop(h, 1) for t in tiles], device, _offload_device(offload, device)
    )
    del h
    return _blend(tiles, pieces, overlap).to(device)


@torch.no_grad()
def encode_tiled(
    vae: AutoencoderKL,
    x: Tensor,
    tile: int = ENCODE_TILE,
    overlap: int = ENCODE_OVERLAP,
    offload: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = None,
) -> DiagonalGaussian:
    """Encode pixels to the posterior in tiles of `tile` image pixels overlapping by `overlap`, computing
    in `dtype` (default the VAE's).

    The downsampling path runs tile by tile with shared GroupNorm statistics (the tiles waiting on
    `offload` between layers); the stitched lowest-resolution features go through the middle block and
    the output layers whole.
    """
    f = vae.cfg.downscale
    if x.shape[-2] % f or x.shape[-1] % f or tile % f or overlap % f:
        raise ValueError(
            f"tiled encode needs image sides, tile and overlap in multiples of {f}: "
            f"image {x.shape[-1]}x{x.shape[-2]}, tile {tile}, overlap {overlap}"
        )
    enc, device = vae.encoder, device_of(vae)
    tiles = _grid(x.shape[-2] // f, x.shape[-1] // f, tile // f, overlap // f)
    x = x.to(device, dtype or compute_dtype(vae))
    pieces = _lockstep(
        _encoder_ops(enc), tiles, [t.crop(x, f) for t in tiles], device, _offload_device(offload, device)
    )
    h = enc.mid(_blend(tiles, pieces, overlap // f).to(device))
    del pieces
    return DiagonalGaussian(vae.quant_conv(enc.conv_out(F.silu(enc.norm_out(h)))))


def _wants_tiles(tiled: bool | None, pixels: int) -> bool:
    """An explicit choice, or tiles when the image is larger than TILE_ABOVE_PIXELS."""
    return pixels > TILE_ABOVE_PIXELS if tiled is None else tiled


@torch.no_grad()
def decode(
    vae: AutoencoderKL, z: Tensor, tiled: bool | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Decode VAE latents (unscaled) to pixels in [-1, 1] computing in `dtype` (default the VAE's);
    `tiled=None` tiles large images only."""
    z = z.to(device_of(vae), dtype or compute_dtype(vae))
    if _wants_tiles(tiled, z.shape[-2] * z.shape[-1] * vae.cfg.downscale**2):
        return decode_tiled(vae, z, **_dtype_arg(dtype))
    return vae.decode(z)


@torch.no_grad()
def encode(
    vae: AutoencoderKL, x: Tensor, tiled: bool | None = None, dtype: torch.dtype | None = None
) -> DiagonalGaussian:
    """Encode pixels in [-1, 1] to the posterior computing in `dtype` (default the VAE's); `tiled=None`
    tiles large images only."""
    x = x.to(device_of(vae), dtype or compute_dtype(vae))
    if _wants_tiles(tiled, x.shape[-2] * x.shape[-1]):
        return encode_tiled(vae, x, **_dtype_arg(dtype))
    return vae.encode(x)


def _dtype_arg(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The tiled paths' `dtype` keyword when one is asked for (the float32 retry of a half-precision VAE)."""
    return {} if dtype is None else {"dtype": dtype}


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
    z is a posterior draw with noise from `generator`, else the posterior mean. An encoder that overflows
    half precision runs again in float32 (as the decoder, `decode_pixels`)."""
    posterior = encode(vae, pixels, tiled)
    dtype = posterior.mean.dtype
    if dtype != torch.float32 and not (all_finite(posterior.mean) and all_finite(posterior.logvar)):
        log.warning("the VAE encoder overflowed %s: encoding again in float32", dtype_name(dtype))
        posterior = encode(vae, pixels, tiled, torch.float32)
    z = posterior.sample(generator) if generator is not None else posterior.mode()
    latents = (z - vae.cfg.shift_factor) * vae.cfg.scale_factor
    return check_finite(latents, "the VAE-encoded image", _vae_cause("encoder", latents))


def decode_pixels(vae: AutoencoderKL, latents: Tensor, tiled: bool | None = None) -> Tensor:
    """Scaled latents (B, C, h, w) -> pixels (B, 3, H, W) in [-1, 1], one image at a time to bound memory."""
    z = latents / vae.cfg.scale_factor + vae.cfg.shift_factor
    pixels = torch.cat([decode(vae, z[i : i + 1], tiled) for i in range(z.shape[0])])
    if not all_finite(pixels) and pixels.dtype != torch.float32:  # A1111's --no-half-vae, automatic
        log.warning("the VAE decoder overflowed %s: decoding again in float32", dtype_name(pixels.dtype))
        pixels = torch.cat([decode(vae, z[i : i + 1], tiled, torch.float32) for i in range(z.shape[0])])
    return check_finite(pixels, "the VAE-decoded image", _vae_cause("decoder", pixels))


def _vae_cause(part: str, out: Tensor) -> str:
    return overflow_cause(f"VAE {part}", out.dtype, " (or a VAE made for float16: sdxl-vae-fp16-fix)")


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


def load_vae(
    model: str | Path | None = None, vae: str | Path | None = None, placement: Placement = CPU_FP32
) -> AutoencoderKL:
    """The VAE of a checkpoint (the default one when neither is given), or of a standalone VAE file,
    placed as `placement` says (its VAE precision: `--dtype auto` keeps an SDXL VAE out of float16; with
    `offload`, held on the CPU and brought to the device while it runs, `sdlab.offload`).

    `model` is anything `sdlab generate -m` takes (a file, a folder, an installed model's name). A
    standalone file alone gets the SD1/SD2 scale factor and precision (shapes cannot tell an SDXL VAE
    apart; an overflow in float16 is redone in float32); with `model` too, it takes that model's.
    """
    if model is None and vae is not None:
        sd, what, family = read_vae(vae), str(vae), families.get("sd1")
        cfg = detect_vae(sd, what)
    else:
        ckpt = read_checkpoint(resolve_model(model))
        if vae is not None:
            ckpt.vae = read_vae(vae)
        detected = ckpt.detect()
        cfg, sd, what, family = detected.vae, ckpt.vae, str(vae or ckpt.source), families.get(detected.family)
    device = resolve_device(placement.device)
    precision = resolve_precision(placement.dtype, device, family)
    held_on = device if placement.offload == "none" else torch.device("cpu")
    module = build_module(AutoencoderKL, cfg, sd, f"{what} (VAE)", precision.vae, held_on, precision.storage)
    set_attention(module, placement.attention)
    offload_network(module, placement.offload, device)
    return module


def cli_roundtrip(args: argparse.Namespace) -> int:
    """`sdlab vae roundtrip IMG [-o OUT]`: print the latent shape, compression and PSNR; save the result."""
    vae = load_vae(args.model, args.vae, Placement.from_args(args))
    report = roundtrip(vae, open_image(args.image, args.image), tiled=args.tiled)
    print("\n".join(report.format()))
    if args.output is not None:
        print(f"wrote {save_png(report.reconstruction, args.output)}")
    return 0


def cli_encode(args: argparse.Namespace) -> int:
    """`sdlab vae encode IMG -o LATENT.safetensors`: write the scaled latents of an image."""
    vae = load_vae(args.model, args.vae, Placement.from_args(args))
    image = open_image(args.image, args.image)
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
    vae = load_vae(args.model, args.vae, Placement.from_args(args))
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
        add_device_arguments(p, offload=False)
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
