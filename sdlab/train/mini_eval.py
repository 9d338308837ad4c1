"""Read an sdlab-mini image back into attributes: background colour, object box, size and place.

The readers follow the composition rules of shared/MINI_DATASET.md: the outer ring of pixels is pure
background (objects keep a 0.07·S margin), the object is every pixel clearly unlike that background,
and its box gives the size (longer side vs 0.40·S / 0.75·S) and the place (nearest anchor). Object
identity needs a trained classifier; `object_crop` gives it a size- and position-normalised input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor

from sdlab.train.mini_data import ANCHORS, PALETTE, SIZES

ImageLike = Image.Image | np.ndarray
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 with x1, y1 exclusive

OBJECT_THRESHOLD = 20  # max-channel distance from the background that marks an object pixel
MIN_LINE_PIXELS = 2  # a row/column belongs to the box only with this many object pixels (ignores specks)
READ_SIDE = 64  # smaller images are read at an integer upscale to at least this side
SIZE_THRESHOLD = (SIZES["small"] * SIZES["large"]) ** 0.5  # geometric middle: equal ratio margin both ways

_PALETTE = np.array(list(PALETTE.values()), dtype=np.float64)
_ANCHORS = np.array(list(ANCHORS.values()))


@dataclass(frozen=True)
class Reading:
    """What the readers see: palette colour and measured RGB of the background, object box, size, place.

    `box`, `size` and `place` are None when no object is visible; `place` is None for large objects.
    """

    colour: str
    background: tuple[int, int, int]
    box: Box | None
    size: str | None
    place: str | None


def as_array(image: ImageLike) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 array -> (H, W, 3) uint8 array."""
    arr = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB image or (H, W, 3) uint8 array, got {arr.shape} {arr.dtype}")
    return arr


def background_rgb(arr: np.ndarray) -> np.ndarray:
    """Median colour of the outer ring (S/32 px wide), which no object reaches."""
    ring = max(1, arr.shape[0] // 32)
    edges = (arr[:ring], arr[-ring:], arr[:, :ring], arr[:, -ring:])
    return np.median(np.concatenate([e.reshape(-1, 3) for e in edges]), axis=0)


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour nearest to an RGB triple (Euclidean)."""
    return list(PALETTE)[int(np.argmin(((_PALETTE - rgb) ** 2).sum(1)))]


def object_box(arr: np.ndarray, background: np.ndarray) -> Box | None:
    """Bounding box of the pixels far from the background, after a 3x3 median against noise.

    Images under 64 px are upscaled (nearest) first, so the median keeps 1-px details of small objects.
    """
    k = -(-READ_SIDE // arr.shape[0])
    dist = np.abs(arr.astype(np.int16) - background.astype(np.int16)).max(-1).clip(0, 255).astype(np.uint8)
    dist_image = Image.fromarray(dist).resize((arr.shape[1] * k, arr.shape[0] * k), Image.Resampling.NEAREST)
    mask = np.asarray(dist_image.filter(ImageFilter.MedianFilter(3))) > OBJECT_THRESHOLD
    cols = np.flatnonzero(mask.sum(0) >= MIN_LINE_PIXELS)
    rows = np.flatnonzero(mask.sum(1) >= MIN_LINE_PIXELS)
    if cols.size == 0 or rows.size == 0:
        return None
    return int(cols[0]) // k, int(rows[0]) // k, -(-(int(cols[-1]) + 1) // k), -(-(int(rows[-1]) + 1) // k)


def size_of(box: Box, side: int) -> str:
    """small or large, from the box's longer side against SIZE_THRESHOLD·side."""
    longer = max(box[2] - box[0], box[3] - box[1])
    return "large" if longer > SIZE_THRESHOLD * side else "small"


def place_of(box: Box, side: int) -> str:
    """The anchor nearest to the box centre."""
    centre = np.array([box[0] + box[2], box[1] + box[3]]) / (2 * side)
    return list(ANCHORS)[int(np.argmin(((_ANCHORS - centre) ** 2).sum(1)))]


def read_scene(image: ImageLike) -> Reading:
    """All readable attributes of a square sdlab-mini image (object identity excepted)."""
    arr = as_array(image)
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"sdlab-mini images are square, got {arr.shape[1]}x{arr.shape[0]}")
    bg = background_rgb(arr)
    box = object_box(arr, bg)
    size = size_of(box, arr.shape[0]) if box else None
    place = place_of(box, arr.shape[0]) if size == "small" else None
    return Reading(nearest_colour(bg), tuple(int(v) for v in bg.round()), box, size, place)


def object_crop(image: ImageLike, reading: Reading, out: int = 32) -> Tensor:
    """The object's square neighbourhood, background-padded, resized to (3, out, out) in [-1, 1].

    Size and position are normalised away so that a small classifier can learn identity alone; with no
    object found (`reading.box` None) the whole image is used.
    """
    arr = as_array(image)
    x0, y0, x1, y1 = reading.box or (0, 0, arr.shape[1], arr.shape[0])
    side = max(x1 - x0, y1 - y0) + 2  # a pixel of background around the object
    left, top = (x0 + x1 - side) // 2, (y0 + y1 - side) // 2
    square = Image.new("RGB", (side, side), reading.background)
    square.paste(Image.fromarray(arr), (-left, -top))
    small = np.asarray(square.resize((out, out), Image.Resampling.LANCZOS), dtype=np.float32)
    return torch.from_numpy(small / 127.5 - 1.0).permute(2, 0, 1).contiguous()
