"""Default architectures of the sdlab-mini model (64-px images, 16x16x4 latents), sized to stay under
40 MB in fp16: VAE 5.1 M, text encoder 7.1 M (6.3 M of it CLIP's 49,408-token embedding), U-Net 6.9 M
parameters. Widths follow what detection assumes (8 heads with conv proj_in, 64 channels per CLIP head),
so the single-file checkpoint loads back with these exact configs."""

from __future__ import annotations

from sdlab.config import TextConfig, VAEConfig, unet_config

MINI_VAE = VAEConfig(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2)
MINI_TEXT = TextConfig(width=128, layers=4, heads=2, intermediate=512)
MINI_ATTENTION = (
    0,
    1,
    1,
)  # transformer depth per level: the two lowest resolutions (8x8, 4x4) and the middle
MINI_UNET = unet_config(
    model_channels=64,
    channel_mult=(1, 1, 2),
    num_res_blocks=2,
    depth_per_level=MINI_ATTENTION,
    num_heads=8,
    context_dim=MINI_TEXT.width,
)
