"""What every upscaler network shares: the module type the tiler runs, and key/shape helpers for detection."""

from __future__ import annotations

import re

import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.checkpoints.io import CheckpointError

StateDict = dict[str, Tensor]


class Upscaler(nn.Module):
    """An image-to-image network: (B, C, H, W) in [0, 1] -> (B, C, H·scale, W·scale).

    `multiple`: tile origins must fall on multiples of it so that a tile sees the same pixel-unshuffle
    cells or attention windows as the whole image does."""

    architecture: str = ""
    scale: int = 1
    multiple: int = 1
    in_channels: int = 3


def indices(sd: StateDict, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group, matched at the key's start)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def need(sd: StateDict, key: str, what: str) -> Tensor:
    """A tensor the detected layout requires, or an error naming it."""
    if key not in sd:
        raise CheckpointError(f"{what}: missing tensor {key!r}")
    return sd[key]


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pad the bottom and right edges up to a multiple of `multiple` (as the reference code does)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x


def upsample2(x: Tensor) -> Tensor:
    """Nearest-neighbour ×2, the first half of an "upconv" stage."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")
