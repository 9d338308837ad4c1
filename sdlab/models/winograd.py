"""3×3 convolutions by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks"), for float32 inference on the CPU.

Each 4×4 tile of the input and each 3×3 kernel are transformed so that a 2×2 tile of the output costs 16
multiplies where a direct convolution spends 36; the sums over input channels become 16 matrix products
(Bᵀ d B, G g Gᵀ, then Aᵀ [Σ_c U ⊙ V] A). oneDNN has no Winograd kernels on CPUs without AVX-512, so on
those this is 1.3-1.5× faster than its direct convolution from 16×16 latents up (bench/RESULTS.md). The
transforms' coefficients are 0, ±1 and ±½: in float32 the result differs from a direct convolution by
rounding alone (tests/test_winograd.py compares both with a float64 reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_GG = torch.kron(_G, _G)  # (16, 9): vec(G g Gᵀ) = (G ⊗ G) vec(g)

MIN_PIXELS = 256
"""Smallest input (H×W) worth it: at 8×8 the kernel transform of a 1280-channel layer costs what the
products save (bench/RESULTS.md)."""

MIN_CHANNELS = 64  # fewer input or output channels (a network's first or last layer) stay direct
BAND_BYTES = 1 << 24
"""The transformed tiles of one band of rows (16 MiB): large layers (a VAE's) go band by band through
buffers allocated once a call, which stay in the cache and are not page-faulted in again each band."""


def applies(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether `conv(x)` can and should go through `conv3x3`: a plain 3×3 zero-padded convolution of a
    float32 CPU input with an even height and width of at least MIN_PIXELS, outside autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
        and x.shape[-2] % 2 == 0
        and x.shape[-1] % 2 == 0
        and x.shape[-2] * x.shape[-1] >= MIN_PIXELS
        and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
    )


def kernel_transform(weight: Tensor) -> Tensor:
    """(O, C, 3, 3) kernels of any float dtype and layout -> (O, 16, C) float32: G g Gᵀ of each, flattened."""
    o, c = weight.shape[:2]
    g = weight.to(torch.float32, memory_format=torch.channels_last)  # memory (O, 3, 3, C)
    g = g.permute(0, 2, 3, 1).reshape(o, 9, c)  # (O, 9, C), a view
    return torch.matmul(_GG, g)  # (O, 16, C)


def conv3x3(x: Tensor, u: Tensor, bias: Tensor | None = None) -> Tensor:
    """conv2d(x, weight, bias, padding=1) for `u = kernel_transform(weight)`; x (B, C, H, W) float32 with
    H and W even. The result is channels-last, as oneDNN's convolution of a channels-last weight."""
    b, c, h, w = x.shape
    o, th, tw = u.shape[0], h // 2, w // 2
    x = x.contiguous(memory_format=torch.channels_last)
    xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, H+2, W+2, C), a contiguous view
    out = torch.empty(b, h, w, o, dtype=x.dtype)  # (B, H, W, O): channels-last memory
    n = min(th, max(1, BAND_BYTES // (16 * b * tw * max(c, o) * x.element_size())))  # tile rows a band
    work = Workspace(
        rows=torch.empty(4, n, b, w + 2, c, dtype=x.dtype),
        tiles=torch.empty(4, 4, n, b, tw, c, dtype=x.dtype),
        products=torch.empty(16, n * b * tw, o, dtype=x.dtype),
        half=torch.empty(2, 4, n, b, tw, o, dtype=x.dtype),
    )
    for r0 in range(0, th, n):
        k = min(n, th - r0)
        _band(xp[:, 2 * r0 : 2 * (r0 + k) + 2], u, out[:, 2 * r0 : 2 * (r0 + k)], work.first(k))
    if bias is not None:
        out += bias.to(x.dtype)
    return out.permute(0, 3, 1, 2)  # (B, O, H, W) view


@dataclass(frozen=True)
class Workspace:
    """The buffers of one band, allocated once a call and reused band after band (tile rows first)."""

    rows: Tensor  # (4, n, B, W+2, C): Bᵀ applied along the rows
    tiles: Tensor  # (4, 4, n, B, W/2, C): Bᵀ d B
    products: Tensor  # (16, n·B·W/2, O): Σ_c U ⊙ V
    half: Tensor  # (2, 4, n, B, W/2, O): Aᵀ applied along the rows

    def first(self, k: int) -> Workspace:
        """The buffers for a band of k ≤ n tile rows."""
        p = self.products.shape[1] // self.rows.shape[1] * k
        return Workspace(self.rows[:, :k], self.tiles[:, :, :k], self.products[:, :p], self.half[:, :, :k])


def _band(xp: Tensor, u: Tensor, out: Tensor, work: Workspace) -> None:
    """One band: padded input rows xp (B, 2k+2, W+2, C) -> output rows out (B, 2k, W, O)."""
    b, hp, wp, c = xp.shape
    k, tw, o = (hp - 2) // 2, (wp - 2) // 2, u.shape[0]
    # input tiles: V = Bᵀ d B, Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]], rows then columns
    r = [xp[:, i : i + 2 * k : 2].transpose(0, 1) for i in range(4)]  # (k, B, W+2, C) each
    t = work.rows
    torch.sub(r[0], r[2], out=t[0])
    torch.add(r[1], r[2], out=t[1])
    torch.sub(r[2], r[1], out=t[2])
    torch.sub(r[1], r[3], out=t[3])
    s = [t[..., j : j + 2 * tw : 2, :] for j in range(4)]  # (4, k, B, W/2, C) each
    v = work.tiles
    torch.sub(s[0], s[2], out=v[:, 0])
    torch.add(s[1], s[2], out=v[:, 1])
    torch.sub(s[2], s[1], out=v[:, 2])
    torch.sub(s[1], s[3], out=v[:, 3])
    # the 16 products over channels: (16, tiles, C) @ (16, C, O)
    torch.bmm(v.view(16, -1, c), u.permute(1, 2, 0), out=work.products)
    m = work.products.view(4, 4, k, b, tw, o)
    # output tiles: Y = Aᵀ M A, Aᵀ = [[1,1,1,0],[0,1,-1,-1]], rows then columns
    q = work.half
    torch.add(m[0], m[1], out=q[0])
    q[0] += m[2]
    torch.sub(m[1], m[2], out=q[1])
    q[1] -= m[3]
    y = out.view(b, k, 2, tw, 2, o).permute(2, 4, 1, 0, 3, 5)  # (row in tile, column in tile, k, B, W/2, O)
    torch.add(q[:, 0], q[:, 1], out=y[:, 0])
    y[:, 0] += q[:, 2]
    torch.sub(q[:, 1], q[:, 2], out=y[:, 1])
    y[:, 1] -= q[:, 3]
