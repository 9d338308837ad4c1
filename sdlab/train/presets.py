"""Default architectures of the sdlab-mini model (64-px images, 16x16x4 latents), sized to stay under
40 MB in fp16: VAE 2.6 M, text encoder 7.1 M (6.3 M of it CLIP's 49,408-token embedding), U-Net 6.9 M
parameters. Widths follow what detection assumes (8 heads with conv proj_in, 64 channels per CLIP head),
so the single-file checkpoint loads back with these exact configs.

The VAE is 96 channels wide at every level because its decoder ends in GroupNorm(32 groups): with one or
two channels a group, normalisation erases a flat region's absolute colour (a flat map normalises to a
constant), and this data set is mostly flat backgrounds; three channels a group keep a direction per
group. Measured here: a 32-channel VAE needed ~6x the steps of this one to reach the same loss."""

from __future__ import annotations

from sdlab.config import TextConfig, VAEConfig, unet_config

MINI_VAE = VAEConfig(ch=96, ch_mult=(1, 1, 1), num_res_blocks=1)
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
