"""ControlNet (Zhang et al. 2023) in the original `cldm.ControlNet` layout.

A trainable copy of a U-Net's encoder (input blocks and middle block) that reads a control image
through a small convolutional hint embedding and returns one residual per input block and one for the
middle block, each through a 1x1 "zero" convolution; the U-Net adds them to its skip connections and
its middle block's output. `ControlNetModel(cfg).state_dict()` has exactly the keys of a single-file
ControlNet's `control_model.*` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from sdlab.config import UNetConfig
from sdlab.models.unet import embed, embeddings, encoder_blocks, middle_block

# cldm's hint embedding stages (diffusers' conditioning_embedding_out_channels)
HINT_BLOCK_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the U-Net whose encoder it copies (its output-side fields are not used) and its hint
    embedding: image channels in, and the channels of its stages (each after the first halves the size)."""

    unet: UNetConfig
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = HINT_BLOCK_CHANNELS

    @property
    def downscale(self) -> int:
        """Control-image pixels per latent pixel along each side (8 for SD's hint embedding)."""
        return 2 ** (len(self.hint_block_channels) - 1)


def hint_block(cfg: ControlNetConfig) -> nn.Sequential:
    """conv (hint -> c0), then per stage conv (c -> c) and a stride-2 conv (c -> next), SiLU after each,
    and a last conv to the U-Net width: the convolutions sit at the even indices, as in cldm."""
    chans = cfg.hint_block_channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.hint_channels, chans[0], 3, padding=1), nn.SiLU()]
    for c, nxt in zip(chans, chans[1:], strict=False):
        layers += [
            nn.Conv2d(c, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, nxt, 3, padding=1, stride=2),
            nn.SiLU(),
        ]
    layers.append(nn.Conv2d(chans[-1], cfg.unet.model_channels, 3, padding=1))
    return nn.Sequential(*layers)


class ControlNetModel(nn.Module):
    """Control residuals from latents, a control image ("hint", pixels in [0, 1]), timestep and context."""

    def __init__(self, cfg: ControlNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.time_embed, label_emb = embeddings(cfg.unet)
        if label_emb is not None:
            self.label_emb = label_emb
        self.input_hint_block = hint_block(cfg)
        self.input_blocks, skip_channels = encoder_blocks(cfg.unet)
        self.zero_convs = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 1)) for c in skip_channels])
        ch = skip_channels[-1]
        self.middle_block = middle_block(cfg.unet, ch)
        self.middle_block_out = nn.Sequential(nn.Conv2d(ch, ch, 1))

    def forward(
        self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None
    ) -> list[Tensor]:
        """Residuals for latents x (B, C, h, w) and hint (B, hint_channels, h·f, w·f): one per input
        block (its output's shape), then the middle block's."""
        emb = embed(self, self.cfg.unet, timesteps, y, x.dtype)
        guided = self.input_hint_block(hint.to(x.dtype))  # (B, model_channels, h, w)
        outs = []
        h = x
        for i, (module, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = module(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs
