"""Model families: one record per family, and the only place that knows what a family is.

A record says how the family is recognised (text encoder layouts, the U-Net's vector input width,
input channels, prediction type), its native size, latent format (scale, shift, channels, latent->RGB
preview factors), the layer its text encoders condition on, how their outputs become conditioning
(cross-attention context, pooled vector, size or aesthetic-score embeddings), its kohya LoRA naming,
its single-file and diffusers layout, and its sampling defaults. Detection, loading, the pipeline,
LoRA, previews, training and the servers read the record (ComfyUI's `supported_models` +
`latent_formats` + `model_base.encode_adm`, stable-diffusion.cpp's one params struct). A new family
(SD3, Flux) arrives as a new record and new networks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from sdlab.config import Prediction, TextConfig, UNetConfig

Layout = Literal["openai", "openclip"]
Naming = Literal["diffusers", "ldm"]
# the scalars embedded into SDXL's vector input y, in order, after the pooled text embedding
VectorField = Literal["original_size", "crop_coords_top_left", "target_size", "aesthetic_score"]
FIELD_SCALARS = {"original_size": 2, "crop_coords_top_left": 2, "target_size": 2, "aesthetic_score": 1}
VECTOR_EMBED_DIM = 256  # each scalar's sinusoidal embedding width (sgm ConcatTimestepEmbedderND)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: where it lives in the files, its LoRA names, how it conditions."""

    layout: Layout  # "openai" (CLIP-L, transformers keys) or "openclip" (OpenCLIP keys in single files)
    single_file_prefix: str  # e.g. "cond_stage_model.transformer."
    diffusers_folder: str  # "text_encoder" or "text_encoder_2"
    tokenizer_folder: str  # "tokenizer" or "tokenizer_2"
    kohya_prefix: str  # "lora_te_", "lora_te1_", "lora_te2_"
    final_norm: bool  # a skipped layer's output passes the final layer norm (SD1/SD2 yes, SDXL no)
    pooled: bool = False  # its pooled, projected output feeds the vector conditioning y


@dataclass(frozen=True)
class LatentFormat:
    """How VAE latents are scaled for the U-Net, and the linear latent->RGB map of live previews."""

    scale_factor: float
    shift_factor: float = 0.0
    channels: int = 4
    rgb_factors: tuple[tuple[float, float, float], ...] = ()  # (R, G, B) per latent channel
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def preview(self, latents: Tensor) -> Tensor:
        """Scaled latents (C, h, w) -> RGB (h, w, 3) in [-1, 1] (ComfyUI's latent2rgb previews)."""
        factors = torch.tensor(self.rgb_factors, dtype=torch.float32)
        rgb = torch.einsum("chw,cr->hwr", latents.float().cpu(), factors)
        return rgb + torch.tensor(self.rgb_bias)


@dataclass(frozen=True)
class Family:
    """Everything sdlab needs to know about one model family."""

    name: str  # "sd1", "sd2-v", "sdxl-refiner", ...
    label: str  # for people: "Stable Diffusion XL refiner"
    base: str  # the family the variant belongs to ("sd1", "sd2", "sdxl", "sdxl-refiner"): LoRA compatibility
    text: tuple[TextEncoderSpec, ...]
    latent: LatentFormat
    native_size: int
    clip_skip: int = 1  # the layer the family conditions on, counted from the end (1 = last)
    text_layer: int | None = None  # SD2: layer 23 of OpenCLIP-H, whatever the encoder's depth
    vector: tuple[VectorField, ...] = ()  # y = pooled ‖ embeddings of these fields (SDXL)
    aesthetic_scores: tuple[float, float] = (6.0, 2.5)  # positive, negative (refiner; A1111/diffusers)
    inpaint: bool = False  # 2C+1-channel U-Net input: latents ‖ mask ‖ masked-image latents
    prediction: Prediction | None = None  # the prediction this record requires (None: any)
    v_from_weights: bool = False  # guess v-prediction from the weights (ComfyUI's SD2 heuristic)
    kohya_unet: Naming = "diffusers"  # U-Net module names kohya's sd-scripts write for the family
    zero_empty_negative: bool = False  # A1111 zeroes an empty negative prompt's conditioning (SDXL)
    diffusers_cuts_text: bool = True  # diffusers folders drop the text layers after the used one
    upcast_attention: bool = False  # the family's published diffusers config upcasts attention
    vae_fp16_overflows: bool = False  # its VAE gives Inf in float16 (SDXL): `--dtype auto` avoids it
    diffusers_pipeline: str = "StableDiffusionPipeline"
    comfy_sdxl: bool = False  # ComfyUI's model class is SDXL / SDXLRefiner (IPAdapter_plus picks files by it)
    steps: int = 20
    cfg: float = 7.0

    # ------------------------------------------------------------------------------------------
    # recognition

    def vector_width(self, text: Sequence[TextConfig]) -> int | None:
        """The U-Net's `adm_in_channels` for these text encoders (None: no vector input)."""
        if not self.vector:
            return None
        pooled = sum(t.projection_dim or t.width for t, s in zip(text, self.text, strict=True) if s.pooled)
        return pooled + VECTOR_EMBED_DIM * sum(FIELD_SCALARS[f] for f in self.vector)

    def fits(self, unet: UNetConfig, text: Sequence[TextConfig]) -> bool:
        """Whether networks of these shapes are a model of this family (prediction aside)."""
        if tuple(t.layout for t in text) != tuple(s.layout for s in self.text):
            return False
        return (
            unet.adm_in_channels == self.vector_width(text)
            and unet.in_channels == self.latent.channels * (2 if self.inpaint else 1) + self.inpaint
            and unet.out_channels == self.latent.channels
            and unet.context_dim == sum(t.width for t in text)
        )

    def clip_skip_default(self, text: Sequence[TextConfig], used_layers: int | None = None) -> int:
        """The default layer from the end; `used_layers`: a diffusers text config's depth, for families
        whose folders cut the encoder after the layer they use (SD2 folders keep 23 of 24 layers)."""
        if self.diffusers_cuts_text and used_layers is not None:
            return max(1, text[0].layers - used_layers + 1)
        if self.text_layer is not None:
            return max(1, text[0].layers - self.text_layer + 1)
        return self.clip_skip


# ---------------------------------------------------------------------------------------------
# the records

SD_LATENT = LatentFormat(
    scale_factor=0.18215,
    rgb_factors=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
)
SDXL_LATENT = LatentFormat(
    scale_factor=0.13025,
    rgb_factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    rgb_bias=(0.1084, -0.0175, -0.0011),
)

_CLIP_L = TextEncoderSpec(
    "openai", "cond_stage_model.transformer.", "text_encoder", "tokenizer", "lora_te_", final_norm=True
)
_OPENCLIP_H = replace(_CLIP_L, layout="openclip", single_file_prefix="cond_stage_model.model.")
_XL_CLIP_L = TextEncoderSpec(
    "openai",
    "conditioner.embedders.0.transformer.",
    "text_encoder",
    "tokenizer",
    "lora_te1_",
    final_norm=False,
)
_XL_BIGG = TextEncoderSpec(
    "openclip",
    "conditioner.embedders.1.model.",
    "text_encoder_2",
    "tokenizer_2",
    "lora_te2_",
    final_norm=False,
    pooled=True,
)
# the refiner's only encoder is bigG, at embedder 0; ComfyUI names its LoRA modules lora_te_
_REFINER_BIGG = replace(
    _XL_BIGG, single_file_prefix="conditioner.embedders.0.model.", kohya_prefix="lora_te_"
)

SD1 = Family("sd1", "Stable Diffusion 1.x", "sd1", (_CLIP_L,), SD_LATENT, native_size=512)
SD1_INPAINT = replace(
    SD1,
    name="sd1-inpaint",
    label="Stable Diffusion 1.x inpainting",
    inpaint=True,
    diffusers_pipeline="StableDiffusionInpaintPipeline",
)
SD2 = Family(
    "sd2",
    "Stable Diffusion 2.x (epsilon)",
    "sd2",
    (_OPENCLIP_H,),
    SD_LATENT,
    native_size=512,
    text_layer=23,
    prediction="eps",
    v_from_weights=True,
    upcast_attention=True,
)
SD2_V = replace(
    SD2, name="sd2-v", label="Stable Diffusion 2.x (v-prediction)", prediction="v", native_size=768
)
SD2_INPAINT = replace(
    SD2,
    name="sd2-inpaint",
    label="Stable Diffusion 2.x inpainting",
    inpaint=True,
    prediction=None,
    v_from_weights=False,
    diffusers_pipeline="StableDiffusionInpaintPipeline",
)
SDXL = Family(
    "sdxl",
    "Stable Diffusion XL",
    "sdxl",
    (_XL_CLIP_L, _XL_BIGG),
    SDXL_LATENT,
    native_size=1024,
    clip_skip=2,
    vector=("original_size", "crop_coords_top_left", "target_size"),
    kohya_unet="ldm",
    zero_empty_negative=True,
    diffusers_cuts_text=False,
    vae_fp16_overflows=True,
    diffusers_pipeline="StableDiffusionXLPipeline",
    comfy_sdxl=True,
)
SDXL_INPAINT = replace(
    SDXL,
    name="sdxl-inpaint",
    label="Stable Diffusion XL inpainting",
    inpaint=True,
    diffusers_pipeline="StableDiffusionXLInpaintPipeline",
)
SDXL_REFINER = replace(
    SDXL,
    name="sdxl-refiner",
    label="Stable Diffusion XL refiner",
    base="sdxl-refiner",
    text=(_REFINER_BIGG,),
    vector=("original_size", "crop_coords_top_left", "aesthetic_score"),
    diffusers_pipeline="StableDiffusionXLImg2ImgPipeline",
)

FAMILIES: dict[str, Family] = {
    f.name: f for f in (SD1, SD1_INPAINT, SD2_V, SD2, SD2_INPAINT, SDXL, SDXL_INPAINT, SDXL_REFINER)
}


def get(name: str) -> Family:
    """The record of a family name (as `ModelConfig.family` holds it)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def candidates(unet: UNetConfig, text: Sequence[TextConfig]) -> list[Family]:
    """The families whose structure these networks have (several when only the prediction differs)."""
    return [f for f in FAMILIES.values() if f.fits(unet, text)]


def choose(found: Sequence[Family], prediction: Prediction) -> Family:
    """The first of `found` that accepts this prediction type."""
    for f in found:
        if f.prediction in (None, prediction):
            return f
    raise ValueError(f"no family among {[f.name for f in found]} takes {prediction} prediction")


def describe_structure(unet: UNetConfig | None, text: Sequence[TextConfig]) -> str:
    """What detection saw, for the error when no family fits."""
    layouts = "+".join(t.layout for t in text) or "none"
    if unet is None:
        return f"text encoders {layouts}"
    return (
        f"text encoders {layouts} (widths {[t.width for t in text]}), U-Net context {unet.context_dim}, "
        f"vector input {unet.adm_in_channels}, {unet.in_channels} input channels"
    )
