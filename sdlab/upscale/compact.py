"""Real-ESRGAN's compact SRVGGNet (realesr-general-x4v3, realesr-animevideov3): a plain stack of 3×3 convs
with PReLUs at low resolution, a pixel shuffle, and the nearest-upsampled input added back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.checkpoints.io import CheckpointError
from sdlab.upscale.base import StateDict, Upscaler, indices


def is_compact(sd: StateDict) -> bool:
    """SRVGGNet keys: `body.0` a conv, `body.1` a PReLU (one weight per channel)."""
    conv, prelu = sd.get("body.0.weight"), sd.get("body.1.weight")
    return conv is not None and conv.dim() == 4 and prelu is not None and prelu.dim() == 1


@dataclass(frozen=True)
class CompactConfig:
    """SRVGGNet hyper-parameters, read from shapes (`detect_compact`)."""

    in_nc: int = 3
    nf: int = 64
    num_conv: int = 16  # convs between the first and the last
    scale: int = 4


def detect_compact(sd: StateDict) -> CompactConfig:
    """SRVGGNet configuration from the `body.N` shapes; output channels equal input channels (the
    upsampled input is added back)."""
    last = max(indices(sd, r"body\.(\d+)\.weight"))
    in_nc, nf = sd["body.0.weight"].shape[1], sd["body.0.weight"].shape[0]
    out = sd[f"body.{last}.weight"].shape[0]
    scale = math.isqrt(out // in_nc)
    if last % 2 or scale * scale * in_nc != out:
        raise CheckpointError(f"SRVGGNet: last conv body.{last} with {out} outputs fits no pixel shuffle")
    return CompactConfig(in_nc=in_nc, nf=nf, num_conv=last // 2 - 1, scale=scale)


class SRVGGNetCompact(Upscaler):
    """`body` alternates conv and PReLU as the checkpoint numbers them, ending in the shuffle conv."""

    architecture = "RealESRGAN Compact"

    def __init__(self, cfg: CompactConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale, self.in_channels = cfg.scale, cfg.in_nc
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_nc, cfg.nf, 3, padding=1), nn.PReLU(cfg.nf)]
        for _ in range(cfg.num_conv):
            layers += [nn.Conv2d(cfg.nf, cfg.nf, 3, padding=1), nn.PReLU(cfg.nf)]
        layers.append(nn.Conv2d(cfg.nf, cfg.in_nc * cfg.scale**2, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        base = F.interpolate(x, scale_factor=float(self.scale), mode="nearest")
        return F.pixel_shuffle(self.body(x), self.scale) + base
