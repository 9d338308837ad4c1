"""The Stable Diffusion U-Net in the original `openaimodel.UNetModel` layout.

`UNetModel(cfg).state_dict()` has exactly the keys of a single-file checkpoint's
`model.diffusion_model.*` tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.config import UNetConfig
from sdlab.models.blocks import SpatialTransformer, group_norm


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (cos then sin) of float timesteps, shape (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """Residual block with the timestep embedding added between its two convolutions."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (key `op`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 convolution (key `conv`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: emb (ResBlock), context (transformer)."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def _transformer(cfg: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    heads, dim_head = cfg.heads_for(ch)
    return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer)


def embeddings(cfg: UNetConfig) -> tuple[nn.Sequential, nn.Sequential | None]:
    """(`time_embed`, `label_emb` or None): the timestep MLP and SDXL's vector-input MLP."""
    mc, ted = cfg.model_channels, cfg.time_embed_dim
    time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
    if cfg.adm_in_channels is None:
        return time_embed, None
    label = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))
    return time_embed, label


def embed(net: nn.Module, cfg: UNetConfig, timesteps: Tensor, y: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The embedding every ResBlock adds: `net.time_embed` of the timesteps (B,), plus `net.label_emb(y)`
    when the config has a vector input (SDXL)."""
    emb = net.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype))
    if cfg.adm_in_channels is None:
        return emb
    if y is None:
        raise ValueError("this network needs the vector conditioning y (adm_in_channels is set)")
    return emb + net.label_emb(y.to(dtype))


def encoder_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """`input_blocks` (conv_in, ResBlocks with transformers, downsamplers) and the channels of each one's
    output (the skip connections); shared by the U-Net and the ControlNet that copies its encoder."""
    mc, ted = cfg.model_channels, cfg.time_embed_dim
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skip_channels, ch, block = [mc], mc, 0
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks[level]):
            layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc)]
            ch = mult * mc
            if cfg.transformer_depth[block]:
                layers.append(_transformer(cfg, ch, cfg.transformer_depth[block]))
            block += 1
            blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
    return blocks, skip_channels


def middle_block(cfg: UNetConfig, ch: int) -> TimestepEmbedSequential:
    """ResBlock, SpatialTransformer (when transformer_depth_middle > 0), ResBlock."""
    middle: list[nn.Module] = [ResBlock(ch, cfg.time_embed_dim, ch)]
    if cfg.transformer_depth_middle:
        middle.append(_transformer(cfg, ch, cfg.transformer_depth_middle))
    middle.append(ResBlock(ch, cfg.time_embed_dim, ch))
    return TimestepEmbedSequential(*middle)


def run_output_blocks(
    blocks: Sequence[TimestepEmbedSequential], h: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor
) -> Tensor:
    """The decoder path: each block takes h joined with the last skip left (popped from `skips`) and
    upsamples to the size of the skip after it; also run from part-way by DeepCache (sdlab.fast)."""
    for module in blocks:
        h = torch.cat([h, skips.pop()], dim=1)
        upsample_to = tuple(skips[-1].shape[-2:]) if skips else None
        h = module(h, emb, context, upsample_to)
    return h


class UNetModel(nn.Module):
    """Noise (or v) predictor conditioned on timestep, text context and optional vector `y`."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        self.time_embed, label_emb = embeddings(cfg)
        if label_emb is not None:
            self.label_emb = label_emb
        self.input_blocks, skip_channels = encoder_blocks(cfg)
        ch = skip_channels[-1]
        self.middle_block = middle_block(cfg, ch)

        self.output_blocks = nn.ModuleList()
        block = 0
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, mult * mc)]
                ch = mult * mc
                if cfg.transformer_depth_output[block]:
                    layers.append(_transformer(cfg, ch, cfg.transformer_depth_output[block]))
                block += 1
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor | None = None,
        control: Sequence[Tensor] | None = None,
        adapter: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        """Predict from latents x (B, C, H, W), timesteps (B,), context (B, T, context_dim). `control`: a
        ControlNet's residuals, one per input block then one for the middle block, added to the skip
        connections and the middle block's output (ComfyUI's `apply_control`, diffusers' residuals).
        `adapter`: T2I-Adapter features in the same places (None where there is none), added to the
        block's output before it is kept as a skip and passed on (diffusers' intrablock residuals)."""
        emb = embed(self, self.cfg, timesteps, y, x.dtype)
        skips = []
        h = x
        for i, module in enumerate(self.input_blocks):
            h = module(h, emb, context)
            if adapter is not None and adapter[i] is not None:
                h = h + adapter[i]
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if adapter is not None and adapter[-1] is not None:
            h = h + adapter[-1]
        if control is not None:
            *down, mid = control
            skips = [s + c for s, c in zip(skips, down, strict=True)]
            h = h + mid
        return self.out(run_output_blocks(self.output_blocks, h, skips, emb, context))
