"""ComfyUI's resizing (`comfy.utils.common_upscale`): a centre cut with its rounding, then interpolation,
Lanczos through PIL, or `bislerp`, which blends neighbouring latent pixels along the great circle between
their channel vectors (magnitudes interpolated linearly) instead of along the straight line."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdlab.images import to_pil, to_tensor


def center_cut(x: Tensor, width: int, height: int) -> Tensor:
    """The centre of (…, H, W) cut to the aspect ratio of width x height, rounded as ComfyUI rounds it."""
    old_h, old_w = x.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    left = top = 0
    if old_aspect > new_aspect:
        left = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        top = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return x[..., top : old_h - top, left : old_w - left]


def common_upscale(x: Tensor, method: str, width: int, height: int, crop: str = "disabled") -> Tensor:
    """(B, C, H, W) resized to height x width by `method` (a torch interpolation mode, "lanczos" for
    images in [-1, 1], or "bislerp"), first cut to the target's aspect with crop="center"."""
    if crop == "center":
        x = center_cut(x, width, height)
    if method == "bislerp":
        return bislerp(x, width, height)
    if method == "lanczos":
        return torch.cat([to_tensor(im.resize((width, height), Image.LANCZOS)) for im in to_pil(x)])
    return F.interpolate(x, size=(height, width), mode=method)


def bislerp(x: Tensor, width: int, height: int) -> Tensor:
    """(B, C, H, W) resized by spherical interpolation of the channel vectors, along W and then along H, at
    the source positions bilinear interpolation samples (computed in float32, returned in x's dtype)."""
    out = _slerp_along(x.float(), width, -1)
    return _slerp_along(out, height, -2).to(x.dtype)


def _slerp_along(x: Tensor, size: int, dim: int) -> Tensor:
    lower, upper, ratio = _bilinear_sources(x.shape[dim], size, x.device)
    a, b = x.index_select(dim, lower), x.index_select(dim, upper)
    shape = [1] * x.dim()
    shape[dim] = size
    ratio = ratio.reshape(shape).expand(a[:, :1].shape)
    rows = [t.movedim(1, -1).reshape(-1, t.shape[1]) for t in (a, b, ratio)]  # one row per pixel
    return _slerp(*rows).reshape(a.movedim(1, -1).shape).movedim(-1, 1)


def _bilinear_sources(old: int, new: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For each of `new` positions: the two source indices bilinear resizing blends and the weight of the
    second, found by resizing the indices themselves (as ComfyUI does, so the edges clamp alike)."""
    index = torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1)
    position = F.interpolate(index, size=(1, new), mode="bilinear").flatten()
    following = index + 1
    following[..., -1] -= 1
    upper = F.interpolate(following, size=(1, new), mode="bilinear").flatten()
    return position.to(torch.int64), upper.to(torch.int64), position - position.floor()


def _slerp(a: Tensor, b: Tensor, r: Tensor) -> Tensor:
    """Rows of a and b (N, C) blended by r (N, 1) along the arc between their directions, the magnitude
    blended linearly; (nearly) equal directions keep a, (nearly) opposite ones blend linearly."""
    norm_a, norm_b = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    unit_a = torch.where(norm_a == 0, 0.0, a / norm_a)
    unit_b = torch.where(norm_b == 0, 0.0, b / norm_b)
    dot = (unit_a * unit_b).sum(1)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    s = r.squeeze(1)
    out = (torch.sin((1.0 - s) * omega) / sin_omega).unsqueeze(1) * unit_a + (
        torch.sin(s * omega) / sin_omega
    ).unsqueeze(1) * unit_b
    out = out * (norm_a * (1.0 - r) + norm_b * r)
    out = torch.where((dot > 1 - 1e-5).unsqueeze(1), a, out)
    return torch.where((dot < 1e-5 - 1).unsqueeze(1), a * (1.0 - r) + b * r, out)
