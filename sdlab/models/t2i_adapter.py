"""T2I-Adapter (Mou et al. 2023) in TencentARC's original layout (`conv_in`, `body.N.block1`, ...).

A small convolutional network that turns a control image into one feature map per U-Net level, computed
once per image (it sees neither latents nor timestep); the U-Net adds each feature to the output of the
input block whose shape it has (`feature_slots`). Three published variants: "full" (SD1.x,
PixelUnshuffle(8)), "full_xl" (SDXL, PixelUnshuffle(16), one downsampling level) and "light".
`T2IAdapterModel(cfg).state_dict()` has exactly the keys of an original adapter file; diffusers' layout
(`adapter.body.I.resnets.J...`) maps onto it with `diffusers_to_original`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.config import UNetConfig

KINDS = ("full", "full_xl", "light")
# how a level halves a side of odd length: diffusers' ceil-mode pooling (a short window averages the pixels
# it holds), TencentARC's code as ComfyUI runs it (one zero on each side of the odd axis, counted) or as
# sd-webui-controlnet runs it (floor: the last row or column dropped; `aligned` then fits the U-Net)
POOLINGS = ("diffusers", "comfyui", "a1111")
XL_UNSHUFFLE_INPUTS = (256, 768)  # conv_in's input channels of SDXL adapters (1 or 3 channels x 16²)


@dataclass(frozen=True)
class T2IAdapterConfig:
    """An adapter: its variant, the channels of its levels (one feature each), resnets per level, the
    control image's channels and (full variants) the kernel of each resnet's second convolution."""

    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    kind: str = "full"
    num_res_blocks: int = 2
    hint_channels: int = 3
    kernel_size: int = 1

    @property
    def unshuffle(self) -> int:
        return 16 if self.kind == "full_xl" else 8

    @property
    def downscale(self) -> int:
        """Control-image pixels per latent pixel (the ControlNet's `downscale`): always 8."""
        return 8

    def feature_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(channels, h, w) of each feature for latents of height x width (a control image 8x larger)."""
        f = self.unshuffle // 8
        height, width, shapes = height // f, width // f, []
        for level, c in enumerate(self.channels):
            if self.downsamples(level):
                height, width = -(-height // 2), -(-width // 2)
            shapes.append((c, height, width))
        return shapes

    def downsamples(self, level: int) -> bool:
        """Whether level `level` starts by halving the size (SDXL's adapter: only the third level)."""
        return level == 2 if self.kind == "full_xl" else level > 0


def halve(x: Tensor, pooling: str) -> Tensor:
    """2x2 average pooling, an odd side treated as `pooling` (one of `POOLINGS`) says; even sides alike."""
    if pooling == "comfyui":
        return F.avg_pool2d(x, 2, 2, padding=(x.shape[-2] % 2, x.shape[-1] % 2))
    return F.avg_pool2d(x, 2, 2, ceil_mode=pooling == "diffusers")


class ResnetBlock(nn.Module):
    """A full adapter's resnet: optional 1x1 `in_conv` to the new width, then x + block2(relu(block1(x)))."""

    def __init__(self, in_c: int, out_c: int, down: bool, kernel_size: int) -> None:
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(in_c, out_c, 1) if in_c != out_c else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_c, out_c, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor, pooling: str = "diffusers") -> Tensor:
        if self.down:
            x = halve(x, pooling)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class LightResnetBlock(nn.Module):
    """A light adapter's resnet: x + block2(relu(block1(x))), both 3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block2(self.act(self.block1(x)))


class Extractor(nn.Module):
    """A light adapter's level: optional halving, 1x1 `in_conv` to a quarter width, resnets, `out_conv`."""

    def __init__(self, in_c: int, out_c: int, num_res_blocks: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(in_c, out_c // 4, 1)
        self.body = nn.Sequential(*[LightResnetBlock(out_c // 4) for _ in range(num_res_blocks)])
        self.out_conv = nn.Conv2d(out_c // 4, out_c, 1)

    def forward(self, x: Tensor, pooling: str = "diffusers") -> Tensor:
        if self.down:
            x = halve(x, pooling)
        return self.out_conv(self.body(self.in_conv(x)))


class T2IAdapterModel(nn.Module):
    """Features, one per level, from a control image (B, hint_channels, H, W) with pixels in [0, 1];
    `pooling` (one of `POOLINGS`) says whose rounding odd sizes get."""

    def __init__(self, cfg: T2IAdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.unshuffle)
        cin = cfg.hint_channels * cfg.unshuffle**2
        chans = cfg.channels
        if cfg.kind == "light":
            ins = (cin, *chans[:-1])
            self.body = nn.ModuleList(
                Extractor(i, o, cfg.num_res_blocks, cfg.downsamples(n))
                for n, (i, o) in enumerate(zip(ins, chans, strict=True))
            )
            return
        self.conv_in = nn.Conv2d(cin, chans[0], 3, padding=1)
        blocks = []
        for level, c in enumerate(chans):
            prev = chans[max(level - 1, 0)]
            blocks.append(ResnetBlock(prev, c, cfg.downsamples(level), cfg.kernel_size))
            blocks += [ResnetBlock(c, c, False, cfg.kernel_size) for _ in range(cfg.num_res_blocks - 1)]
        self.body = nn.ModuleList(blocks)

    def forward(self, hint: Tensor, pooling: str = "diffusers") -> list[Tensor]:
        x = self.unshuffle(hint)
        if self.cfg.kind == "light":
            features = []
            for block in self.body:
                x = block(x, pooling)
                features.append(x)
            return features
        x = self.conv_in(x)
        features = []
        for i, block in enumerate(self.body):
            x = block(x, pooling)
            if (i + 1) % self.cfg.num_res_blocks == 0:
                features.append(x)
        return features


def diffusers_to_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' `T2IAdapter` keys -> the original's: `adapter.` dropped; full: `body.I.resnets.J.` ->
    `body.(I·n+J).`, `body.I.in_conv` -> `body.(I·n).in_conv` (n resnets per level); light:
    `resnets` -> `body`."""
    light = "adapter.body.0.out_conv.weight" in sd
    n = 1 + max(int(m[1]) for k in sd if (m := re.match(r"adapter\.body\.0\.resnets\.(\d+)\.", k)))

    def key(k: str) -> str:
        k = k.removeprefix("adapter.")
        if light:
            return k.replace(".resnets.", ".body.")
        if m := re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            return f"body.{int(m[1]) * n + int(m[2])}.{m[3]}"
        if m := re.match(r"body\.(\d+)\.in_conv\.(.*)", k):
            return f"body.{int(m[1]) * n}.in_conv.{m[2]}"
        return k

    return {key(k): v for k, v in sd.items()}


def detect_adapter(sd: dict[str, Tensor], num_res_blocks: int = 2) -> T2IAdapterConfig:
    """The configuration of an original-layout adapter state dict, from its keys and shapes. The flat
    `body.N` of the full variants does not record resnets per level: the published files have 2."""
    if "body.0.out_conv.weight" in sd:  # light: body.I.{in_conv, body.J, out_conv}
        levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
        channels = tuple(sd[f"body.{i}.out_conv.weight"].shape[0] for i in range(levels))
        resnets = 1 + max(int(m[1]) for k in sd if (m := re.match(r"body\.0\.body\.(\d+)\.", k)))
        cin = sd["body.0.in_conv.weight"].shape[1]
        return T2IAdapterConfig(channels, "light", resnets, cin // 64)
    cin = sd["conv_in.weight"].shape[1]
    kind = "full_xl" if cin in XL_UNSHUFFLE_INPUTS else "full"
    blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
    channels = tuple(sd[f"body.{i}.block1.weight"].shape[0] for i in range(0, blocks, num_res_blocks))
    kernel = sd["body.0.block2.weight"].shape[-1]
    unshuffle = 16 if kind == "full_xl" else 8
    return T2IAdapterConfig(channels, kind, num_res_blocks, cin // unshuffle**2, kernel)


def is_adapter(sd: dict[str, Tensor]) -> bool:
    """Whether a state dict holds a T2I-Adapter, in either layout (a diffusers ControlNet has a `conv_in`
    too, but no `body`)."""
    keys = ("body.0.block1.weight", "body.0.in_conv.weight", "adapter.body.0.resnets.0.block1.weight")
    return any(k in sd for k in keys)


def input_block_shapes(cfg: UNetConfig, height: int, width: int) -> list[tuple[int, int, int]]:
    """(channels, height, width) of each U-Net input block's output for latents of height x width (each
    downsampler rounds up, as its stride-2 convolution and the adapter's ceil-mode pooling do)."""
    mc = cfg.model_channels
    shapes = [(mc, height, width)]
    for level, mult in enumerate(cfg.channel_mult):
        shapes += [(mult * mc, height, width)] * cfg.num_res_blocks[level]
        if level != len(cfg.channel_mult) - 1:
            height, width = -(-height // 2), -(-width // 2)
            shapes.append((mult * mc, height, width))
    return shapes


def feature_slots(cfg: UNetConfig, features: Sequence[tuple[int, ...]], height: int, width: int) -> list[int]:
    """Where each feature of shape (channels, h, w) is added for latents of height x width: the last input
    block of a run of equal shapes with the feature's shape, each after the previous feature's; one past
    the last input block means the middle block's output. These are diffusers' places for
    `down_intrablock_additional_residuals` and sd-webui-controlnet's lists (SD1: input blocks 2, 5, 8,
    11; SDXL: 3, 5, 8 and the middle block)."""
    shapes = input_block_shapes(cfg, height, width)
    ends = [i for i, s in enumerate(shapes) if i + 1 == len(shapes) or shapes[i + 1] != s]
    slots, start = [], 0
    for feature in features:
        found = next((i for i in ends if i >= start and shapes[i] == tuple(feature)), None)
        if found is None and tuple(feature) == shapes[-1] and start <= len(shapes):
            found = len(shapes)
        if found is None:
            raise ValueError(f"an adapter feature of shape {tuple(feature)} fits no place in this U-Net")
        slots.append(found)
        start = found + 1
    return slots


def aligned(cfg: T2IAdapterConfig, features: Sequence[Tensor], height: int, width: int) -> list[Tensor]:
    """Features made with "a1111" pooling fitted to the U-Net's shapes for latents of height x width by
    nearest resizing, as sd-webui-controlnet's `aligned_adding` fits them (unchanged where they agree)."""
    shapes = cfg.feature_shapes(height, width)
    return [
        f if tuple(f.shape[-2:]) == s[1:] else F.interpolate(f, size=s[1:], mode="nearest")
        for f, s in zip(features, shapes, strict=True)
    ]


def place_features(
    cfg: UNetConfig, features: Sequence[Tensor], height: int, width: int
) -> list[Tensor | None]:
    """The U-Net's `adapter` argument for latents of height x width: one entry per input block and one
    for the middle block, each feature at its `feature_slots` place and None elsewhere."""
    placed: list[Tensor | None] = [None] * (len(input_block_shapes(cfg, height, width)) + 1)
    for f, slot in zip(
        features, feature_slots(cfg, [f.shape[1:] for f in features], height, width), strict=True
    ):
        placed[slot] = f
    return placed
