"""SwinIR (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer"): a conv stem, residual
groups of (shifted-)window attention blocks, and one of four reconstruction heads.

Attribute names are the checkpoint keys. The files' `attn.relative_position_index` and `attn_mask`
buffers are derived data (index arithmetic, and a mask for one training size), so they are recomputed
for each input size instead of loaded. Which head a file has follows from its keys, as in the
reference code: `conv_before_upsample` + `conv_up1` (real-world SR, "nearest+conv"),
`conv_before_upsample` alone (classical SR, "pixelshuffle"), `upsample.0` alone (lightweight SR,
"pixelshuffledirect"), or none (denoising / JPEG, "").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.checkpoints.io import CheckpointError
from sdlab.upscale.base import StateDict, Upscaler, indices, need, pad_to_multiple, upsample2

_BLOCK0 = "layers.0.residual_group.blocks.0."
DERIVED_BUFFERS = ("attn.relative_position_index", "attn_mask")
RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K's mean, subtracted from 3-channel inputs


def is_swinir(sd: StateDict) -> bool:
    """SwinIR keys: residual groups of Swin blocks after a `conv_first`."""
    return "conv_first.weight" in sd and f"{_BLOCK0}attn.relative_position_bias_table" in sd


def drop_derived(sd: StateDict) -> StateDict:
    """The state dict without the buffers SwinIR recomputes."""
    return {k: v for k, v in sd.items() if not k.endswith(DERIVED_BUFFERS)}


@dataclass(frozen=True)
class SwinIRConfig:
    """SwinIR hyper-parameters, read from keys and shapes (`detect_swinir`)."""

    in_nc: int = 3
    embed_dim: int = 180
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    window_size: int = 8
    mlp_hidden: int = 360
    img_size: int = 64  # training size: windows shrink to it (and stop shifting) when it is not larger
    upsampler: str = "pixelshuffle"  # "nearest+conv", "pixelshuffle", "pixelshuffledirect" or ""
    scale: int = 4
    num_feat: int = 64  # channels of the reconstruction head
    resi_connection: str = "1conv"  # or "3conv"
    patch_norm: bool = True
    img_range: float = 1.0  # 255 for the JPEG models (window size 7), as spandrel reads them


def detect_swinir(sd: StateDict) -> SwinIRConfig:
    """SwinIR configuration from keys and shapes (before `drop_derived`: the training size comes from a
    shifted block's stored mask)."""
    what = "SwinIR"
    if "conv_first.1.weight" in sd or "absolute_pos_embed" in sd:
        raise CheckpointError(
            f"{what}: pixel-unshuffle stems and absolute position embeddings are not supported"
        )
    first = need(sd, "conv_first.weight", what)
    in_nc, embed_dim = first.shape[1], first.shape[0]
    window = math.isqrt(need(sd, f"{_BLOCK0}attn.relative_position_index", what).shape[0])
    mask = sd.get("layers.0.residual_group.blocks.1.attn_mask")
    layers = indices(sd, r"layers\.(\d+)\.")
    upsampler, scale, num_feat = _head(sd, in_nc)
    return SwinIRConfig(
        in_nc=in_nc,
        embed_dim=embed_dim,
        depths=tuple(len(indices(sd, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.")) for i in layers),
        num_heads=tuple(
            sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1]
            for i in layers
        ),
        window_size=window,
        mlp_hidden=need(sd, f"{_BLOCK0}mlp.fc1.weight", what).shape[0],
        img_size=64 if mask is None else math.isqrt(mask.shape[0]) * window,
        upsampler=upsampler,
        scale=scale,
        num_feat=num_feat,
        resi_connection="1conv" if "conv_after_body.weight" in sd else "3conv",
        patch_norm="patch_embed.norm.weight" in sd,
        img_range=255.0 if window == 7 else 1.0,
    )


def _head(sd: StateDict, in_nc: int) -> tuple[str, int, int]:
    """(upsampler, scale, head channels) from the reconstruction head's keys."""
    if "conv_before_upsample.0.weight" in sd:
        num_feat = sd["conv_before_upsample.0.weight"].shape[0]
        if "conv_up1.weight" in sd:
            return "nearest+conv", 2 ** len(indices(sd, r"conv_up(\d+)\.weight")), num_feat
        scale = 1
        for i in indices(sd, r"upsample\.(\d+)\.weight"):
            scale *= math.isqrt(sd[f"upsample.{i}.weight"].shape[0] // num_feat)
        return "pixelshuffle", scale, num_feat
    if "upsample.0.weight" in sd:
        return "pixelshuffledirect", math.isqrt(sd["upsample.0.weight"].shape[0] // in_nc), 0
    return "", 1, 0


@cache
def _relative_index(window: int) -> Tensor:
    """(N, N) index into the (2w-1)² relative position bias table for the N = w² tokens of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _windows(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B·nW, w², C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def _unwindow(x: Tensor, window: int, h: int, w: int) -> Tensor:
    """(B·nW, w², C) -> (B, H, W, C), the inverse of `_windows`."""
    c = x.shape[-1]
    x = x.view(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


@cache
def _shift_mask(h: int, w: int, window: int, shift: int) -> Tensor:
    """(nW, N, N) additive mask (0 / -100) keeping the cyclically shifted windows from attending across the
    regions the roll brought together."""
    region = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
        region[:, rows, cols] = i
    ids = _windows(region, window).squeeze(-1)  # (nW, N)
    return (ids[:, None, :] != ids[:, :, None]).float() * -100.0


class WindowAttention(nn.Module):
    """Multi-head self-attention within a window, with a learned relative position bias."""

    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.window, self.heads = window, heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        bw, n, c = x.shape
        q, k, v = (
            self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        )  # (bw, h, N, d)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)  # (bw, heads, N, N)
        bias = self.relative_position_bias_table[_relative_index(self.window).to(x.device)]
        attn = attn + bias.permute(2, 0, 1)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]).view(
                bw, self.heads, n, n
            )
        out = attn.softmax(-1) @ v  # (bw, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm window attention (cyclically shifted by half a window in odd blocks) and MLP."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_hidden: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        _, h, w, _ = x.shape
        s = self.shift
        y = self.norm1(x)
        y = torch.roll(y, (-s, -s), (1, 2)) if s else y
        mask = _shift_mask(h, w, self.window, s).to(x) if s else None
        y = _unwindow(self.attn(_windows(y, self.window), mask), self.window, h, w)
        x = x + (torch.roll(y, (s, s), (1, 2)) if s else y)
        return x + self.mlp(self.norm2(x))


class BlockList(nn.Module):
    """`residual_group`: the Swin blocks of one residual group."""

    def __init__(self, cfg: SwinIRConfig, depth: int, heads: int) -> None:
        super().__init__()
        window, shift = cfg.window_size, cfg.window_size // 2
        if cfg.img_size <= window:  # as the reference: windows no larger than the training size, unshifted
            window, shift = cfg.img_size, 0
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(cfg.embed_dim, heads, window, shift * (i % 2), cfg.mlp_hidden)
            for i in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _resi_conv(dim: int, kind: str) -> nn.Module:
    """The conv closing a residual group (and the body): one 3×3, or a 3×3 / 1×1 / 3×3 bottleneck."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, padding=1)
    q = dim // 4
    return nn.Sequential(
        nn.Conv2d(dim, q, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(q, q, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(q, dim, 3, padding=1),
    )


def _channels_last_conv(conv: nn.Module, x: Tensor) -> Tensor:
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class RSTB(nn.Module):
    """Residual Swin Transformer block: Swin blocks, a conv, and a skip around both."""

    def __init__(self, cfg: SwinIRConfig, depth: int, heads: int) -> None:
        super().__init__()
        self.residual_group = BlockList(cfg, depth, heads)
        self.conv = _resi_conv(cfg.embed_dim, cfg.resi_connection)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        return _channels_last_conv(self.conv, self.residual_group(x)) + x


class PatchEmbed(nn.Module):
    """`patch_embed`: a layer norm over the stem's features (patch size 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)


class SwinIR(Upscaler):
    architecture = "SwinIR"

    def __init__(self, cfg: SwinIRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale, self.multiple, self.in_channels = cfg.scale, cfg.window_size, cfg.in_nc
        dim, nf, out_nc = cfg.embed_dim, cfg.num_feat, cfg.in_nc
        mean = RGB_MEAN if cfg.in_nc == 3 else (0.0,) * cfg.in_nc
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(cfg.in_nc, dim, 3, padding=1)
        self.patch_embed = PatchEmbed(dim) if cfg.patch_norm else None
        self.layers = nn.ModuleList(RSTB(cfg, d, h) for d, h in zip(cfg.depths, cfg.num_heads, strict=True))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = _resi_conv(dim, cfg.resi_connection)
        if cfg.upsampler in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, nf, 3, padding=1), nn.LeakyReLU(0.01))
        if cfg.upsampler == "pixelshuffle":
            self.upsample = nn.Sequential(*_shuffle_stages(cfg.scale, nf))
            self.conv_last = nn.Conv2d(nf, out_nc, 3, padding=1)
        elif cfg.upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(
                nn.Conv2d(dim, cfg.scale**2 * out_nc, 3, padding=1), nn.PixelShuffle(cfg.scale)
            )
        elif cfg.upsampler == "nearest+conv":
            for m in range(1, int(math.log2(cfg.scale)) + 1):
                setattr(self, f"conv_up{m}", nn.Conv2d(nf, nf, 3, padding=1))
            self.conv_hr = nn.Conv2d(nf, nf, 3, padding=1)
            self.conv_last = nn.Conv2d(nf, out_nc, 3, padding=1)
        else:
            self.conv_last = nn.Conv2d(dim, out_nc, 3, padding=1)

    def features(self, x: Tensor) -> Tensor:
        """The Swin body over the stem's features: (B, C, H, W) -> (B, C, H, W)."""
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C): tokens on a grid
        if self.patch_embed is not None:
            x = self.patch_embed.norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = (pad_to_multiple(x, self.cfg.window_size) - self.mean) * self.cfg.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.features(feat)) + feat
        up = self.cfg.upsampler
        if up == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        elif up == "pixelshuffledirect":
            out = self.upsample(feat)
        elif up == "nearest+conv":
            feat = self.conv_before_upsample(feat)
            for m in range(1, int(math.log2(self.scale)) + 1):
                feat = F.leaky_relu(getattr(self, f"conv_up{m}")(upsample2(feat)), 0.2)
            out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        else:
            out = x + self.conv_last(feat)
        out = out / self.cfg.img_range + self.mean
        return out[..., : h * self.scale, : w * self.scale]


def _shuffle_stages(scale: int, nf: int) -> list[nn.Module]:
    """Conv + pixel shuffle stages: ×2 each for powers of two, one ×3 for 3."""
    if scale == 3:
        return [nn.Conv2d(nf, 9 * nf, 3, padding=1), nn.PixelShuffle(3)]
    if scale & (scale - 1):
        raise CheckpointError(
            f"SwinIR: a pixel-shuffle head of scale {scale} (only powers of two and 3 exist)"
        )
    stages: list[nn.Module] = []
    for _ in range(int(math.log2(scale))):
        stages += [nn.Conv2d(nf, 4 * nf, 3, padding=1), nn.PixelShuffle(2)]
    return stages
