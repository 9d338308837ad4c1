"""Network configurations as frozen dataclasses, with presets for the model families.

Detection (`sdlab.checkpoints.detect`) builds these from tensor shapes; nothing here names a class
path or runs code from a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Prediction = Literal["eps", "v"]


@dataclass(frozen=True)
class UNetConfig:
    """The original `openaimodel.UNetModel` hyper-parameters.

    `transformer_depth` has one entry per input-block ResBlock (0 = no SpatialTransformer there) and
    `transformer_depth_output` one per output-block ResBlock, so irregular community U-Nets load too.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 0, 0)
    transformer_depth_output: tuple[int, ...] = (0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1)
    transformer_depth_middle: int = 1
    num_heads: int = 8  # used when num_head_channels == -1
    num_head_channels: int = -1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None  # SDXL: pooled text + size embeddings

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if len(self.num_res_blocks) != levels:
            raise ValueError("num_res_blocks needs one entry per channel_mult level")
        if len(self.transformer_depth) != sum(self.num_res_blocks):
            raise ValueError("transformer_depth needs one entry per input ResBlock")
        if len(self.transformer_depth_output) != sum(n + 1 for n in self.num_res_blocks):
            raise ValueError("transformer_depth_output needs one entry per output ResBlock")
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels")

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, head dim) of a SpatialTransformer with `channels` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


def per_level_depths(
    num_res_blocks: tuple[int, ...], depth_per_level: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Expand one transformer depth per level into (input depths, output depths)."""
    inputs = tuple(d for n, d in zip(num_res_blocks, depth_per_level, strict=True) for _ in range(n))
    outputs = tuple(
        d for n, d in reversed(list(zip(num_res_blocks, depth_per_level, strict=True))) for _ in range(n + 1)
    )
    return inputs, outputs


def unet_config(
    *,
    model_channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    depth_per_level: tuple[int, ...],
    **kwargs: object,
) -> UNetConfig:
    """A regular U-Net: the same number of ResBlocks and transformer depth on every block of a level."""
    nrb = (num_res_blocks,) * len(channel_mult)
    inputs, outputs = per_level_depths(nrb, depth_per_level)
    return UNetConfig(
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=nrb,
        transformer_depth=inputs,
        transformer_depth_output=outputs,
        **kwargs,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class VAEConfig:
    """The original `AutoencoderKL` (ldm `Encoder`/`Decoder`) hyper-parameters."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    scale_factor: float = 0.18215
    shift_factor: float = 0.0

    @property
    def downscale(self) -> int:
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    """A CLIP text transformer. Modules use the transformers (OpenAI CLIP) layout; OpenCLIP files
    (SD2, SDXL's second encoder) are mapped onto it by `sdlab.checkpoints.keymaps`."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    projection_dim: int | None = None  # text_projection (SDXL pooled output)
    layout: Literal["openai", "openclip"] = "openai"  # layout of the original single-file keys
    pad_token: int = 49407  # SD1 pads with EOS; OpenCLIP models pad with 0
    eos_token: int = 49407
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class ModelConfig:
    """A whole Stable Diffusion model: its networks and how to sample it."""

    family: str  # a record name of `sdlab.families` ("sd1", "sd2-v", "sdxl", "sdxl-refiner", ...)
    unet: UNetConfig
    vae: VAEConfig
    text: tuple[TextConfig, ...]
    prediction: Prediction = "eps"
    clip_skip_default: int = 1  # the layer the text encoders condition on, from the end (1 = last)
    extras: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


# ---------------------------------------------------------------------------------------------
# presets (the published architectures)

SD1_UNET = unet_config(
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    depth_per_level=(1, 1, 1, 0),
    num_heads=8,
    context_dim=768,
)
SD2_UNET = unet_config(
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    depth_per_level=(1, 1, 1, 0),
    num_heads=-1,
    num_head_channels=64,
    context_dim=1024,
    use_linear_in_transformer=True,
)
SDXL_UNET = unet_config(
    model_channels=320,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    depth_per_level=(0, 2, 10),
    num_heads=-1,
    num_head_channels=64,
    context_dim=2048,
    use_linear_in_transformer=True,
    adm_in_channels=2816,
    transformer_depth_middle=10,
)
SDXL_REFINER_UNET = unet_config(
    model_channels=384,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    depth_per_level=(0, 4, 4, 0),
    num_heads=-1,
    num_head_channels=64,
    context_dim=1280,
    use_linear_in_transformer=True,
    adm_in_channels=2560,
    transformer_depth_middle=4,
)
SD_VAE = VAEConfig()
SDXL_VAE = VAEConfig(scale_factor=0.13025)
CLIP_L = TextConfig()
OPENCLIP_H = TextConfig(
    width=1024,
    layers=24,
    heads=16,
    intermediate=4096,
    act="gelu",
    layout="openclip",
    pad_token=0,
    projection_dim=1024,
)
OPENCLIP_BIGG = TextConfig(
    width=1280,
    layers=32,
    heads=20,
    intermediate=5120,
    act="gelu",
    layout="openclip",
    pad_token=0,
    projection_dim=1280,
)

SD1 = ModelConfig(family="sd1", unet=SD1_UNET, vae=SD_VAE, text=(CLIP_L,))
SD2 = ModelConfig(family="sd2", unet=SD2_UNET, vae=SD_VAE, text=(OPENCLIP_H,), clip_skip_default=2)
SDXL = ModelConfig(
    family="sdxl", unet=SDXL_UNET, vae=SDXL_VAE, text=(CLIP_L, OPENCLIP_BIGG), clip_skip_default=2
)
SDXL_REFINER = ModelConfig(
    family="sdxl-refiner", unet=SDXL_REFINER_UNET, vae=SDXL_VAE, text=(OPENCLIP_BIGG,), clip_skip_default=2
)
