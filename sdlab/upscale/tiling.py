"""Running an upscaler over tiles so that large images fit in memory, without visible seams.

Tiles of `tile` pixels overlap their neighbours by at least 2·`overlap`. Each tile's output is weighted
0 over the `overlap`/2 pixels nearest an inner tile edge (where zero padding makes the network see a
border the image does not have), then ramps linearly to 1 over the next `overlap` pixels; the weights
of overlapping tiles sum to 1. Pixels further than `overlap`/2 from every inner edge they are taken
from see the same context as in an untiled run, so a network whose receptive field is within
`overlap`/2 gives the untiled result (up to float rounding); deeper networks still blend smoothly.
Tile origins fall on the network's `multiple` (pixel-unshuffle cells, attention windows).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdlab.upscale.base import Upscaler


def tile_starts(size: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Origins of the tiles along one axis: stride tile − 2·overlap (rounded down to `multiple`), the last
    tile ending at the image's edge (its origin rounded down to `multiple` too)."""
    if size <= tile:
        return [0]
    stride = (tile - 2 * overlap) // multiple * multiple
    if stride <= 0:
        raise ValueError(
            f"tile {tile} leaves no stride for overlap {overlap} (need tile ≥ 2·overlap + {multiple})"
        )
    last = (size - tile) // multiple * multiple
    return sorted({*range(0, last, stride), last})


def _spans(size: int, tile: int, overlap: int, multiple: int) -> list[tuple[int, int]]:
    """(start, end) of the tiles along one axis; the last one runs to the edge."""
    starts = tile_starts(size, tile, overlap, multiple)
    return [(a, size if a == starts[-1] else a + tile) for a in starts]


def _ramp(length: int, start: int, end: int, size: int, overlap: int, scale: int) -> Tensor:
    """Output-resolution weights along one axis for the tile [start, end) of an axis `size` long."""
    n = length * scale
    w = torch.ones(n)
    margin, ramp = overlap // 2 * scale, overlap * scale
    rise = torch.clamp((torch.arange(n) + 0.5 - margin) / max(ramp, 1), 0, 1)
    if start > 0:
        w = torch.minimum(w, rise)
    if end < size:
        w = torch.minimum(w, rise.flip(0))
    return w


@torch.no_grad()
def run_upscaler(model: Upscaler, x: Tensor, *, tile: int = 512, overlap: int = 32) -> Tensor:
    """(B, C, H, W) in [0, 1] -> (B, C, H·s, W·s), tiled with overlap and blended (see the module doc)."""
    b, c, h, w = x.shape
    s, multiple = model.scale, model.multiple
    param = next(model.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (x.device, x.dtype)
    if h <= tile and w <= tile:
        return model(x.to(device, dtype)).float().to(x.device)
    out = torch.zeros(b, c, h * s, w * s, device=x.device)
    total = torch.zeros(1, 1, h * s, w * s, device=x.device)
    for y0, y1 in _spans(h, tile, overlap, multiple):
        wy = _ramp(y1 - y0, y0, y1, h, overlap, s)
        for x0, x1 in _spans(w, tile, overlap, multiple):
            piece = model(x[..., y0:y1, x0:x1].to(device, dtype)).float().to(x.device)
            weight = (wy[:, None] * _ramp(x1 - x0, x0, x1, w, overlap, s)[None]).to(x.device)
            out[..., y0 * s : y1 * s, x0 * s : x1 * s] += piece * weight
            total[..., y0 * s : y1 * s, x0 * s : x1 * s] += weight
    return out / total
