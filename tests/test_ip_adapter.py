"""IP-Adapter against transformers' CLIPVisionModelWithProjection and CLIPImageProcessor, and end to end
against diffusers' `load_ip_adapter` on the tiny SD1 model (seeded random weights)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from reference import diffusers_pipeline, max_diff, psnr, randomize, write_diffusers_config
from tiny import TINY, write_tiny

from sdlab.checkpoints.io import CheckpointError, write_safetensors
from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.ip_adapter import IPAdapterConfig, IPAdapterModel, IPAdapterSpec, cross_attentions
from sdlab.models.clip_vision import CLIPVisionModel, VisionConfig, preprocess_image
from sdlab.models.unet import UNetModel
from sdlab.pipeline import GenerationRequest, generate

TINY_VISION = VisionConfig(
    width=128, layers=3, heads=2, intermediate=256, patch=14, image_size=28, projection_dim=64
)


def _transformers_vision(cfg: VisionConfig, seed: int = 21):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    tcfg = CLIPVisionConfig(
        hidden_size=cfg.width,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch,
        projection_dim=cfg.projection_dim,
        hidden_act=cfg.act,
    )
    ours = randomize(CLIPVisionModel(cfg), seed)
    ref = CLIPVisionModelWithProjection(tcfg).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return ours, ref


def _image(w: int = 70, h: int = 50, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_vision_model_matches_transformers() -> None:
    ours, ref = _transformers_vision(TINY_VISION)
    assert VisionConfig.from_state_dict(ours.state_dict()) == TINY_VISION
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, expected = ours(pixels), ref(pixels, output_hidden_states=True)
    assert max_diff(out.image_embeds, expected.image_embeds) < 1e-5
    assert max_diff(out.hidden_states[-2], expected.hidden_states[-2]) < 1e-5


@pytest.mark.parametrize("size", [(70, 50), (40, 90), (28, 28)])
def test_preprocessing_matches_clip_image_processor(size: tuple[int, int]) -> None:
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    image = _image(*size)
    assert max_diff(preprocess_image(image, 28), proc(image, return_tensors="pt").pixel_values) < 1e-6


def _adapter_file(folder: Path, unet: UNetModel, plus: bool, vision: VisionConfig = TINY_VISION) -> Path:
    """An IP-Adapter for `unet` and an encoder of `vision` with seeded random weights, in the published flat
    layout."""
    layers = tuple((2 * i + 1, a.to_k.out_features) for i, a in enumerate(cross_attentions(unet)))
    context = unet.cfg.context_dim
    if plus:
        # depth 4: diffusers assumes it
        cfg = IPAdapterConfig(layers, context, vision.width, 6, resampler=(128, 4, 2))
    else:
        cfg = IPAdapterConfig(layers, context, vision.projection_dim, 4)
    sd = randomize(IPAdapterModel(cfg), 31).state_dict()
    assert IPAdapterConfig.from_state_dict(sd) == cfg
    return write_safetensors(sd, folder / f"ip-adapter{'-plus' * plus}.safetensors")


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
def test_generate_matches_diffusers_load_ip_adapter(plus: bool, tmp_path: Path) -> None:
    path = write_tiny("sd1", tmp_path / "sd1.safetensors")
    model = load_model(path)
    adapter = _adapter_file(tmp_path, model.unet, plus)
    _, encoder = _transformers_vision(TINY_VISION)
    encoder.save_pretrained(tmp_path / "image_encoder")
    image, seed, size, steps, cfg = _image(), 5, 32, 3, 7.0
    spec = IPAdapterSpec(str(adapter), image, 0.6, clip_vision=str(tmp_path / "image_encoder"))
    plain_req = GenerationRequest("a red apple", "blurry", size, size, steps, cfg, "euler", "karras", seed)
    ours = generate(model, replace(plain_req, ip_adapters=(spec,))).images[0]
    plain = generate(model, plain_req).images[0]

    pipe = diffusers_pipeline(path, write_diffusers_config(TINY["sd1"], tmp_path / "config"))
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
    )
    pipe.load_ip_adapter(
        str(tmp_path),
        subfolder="",
        weight_name=adapter.name,
        image_encoder_folder="image_encoder",
        low_cpu_mem_usage=False,
    )
    pipe.set_ip_adapter_scale(0.6)
    f = model.config.vae.downscale
    latents = torch.randn((1, 4, size // f, size // f), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        ref = pipe(
            "a red apple",
            negative_prompt="blurry",
            ip_adapter_image=image,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=cfg,
            latents=latents,
        ).images[0]
    value = psnr(ours, ref)
    print(f"\nIP-Adapter ({'plus' if plus else 'plain'}) vs diffusers: PSNR {value:.1f} dB")
    assert np.asarray(ref).std() > 5
    assert value >= 40.0
    assert psnr(plain, ref) < 35.0  # the image prompt changes the image


def test_adapters_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    model = load_model(write_tiny("sd1", tmp_path / "sd1.safetensors"))
    other = UNetModel(TINY["sd2"].unet)
    adapter = _adapter_file(tmp_path, other, plus=False)
    spec = IPAdapterSpec(str(adapter), _image(), clip_vision=str(tmp_path))
    req = GenerationRequest("x", width=32, height=32, steps=1, ip_adapters=(spec,))
    with pytest.raises(CheckpointError, match="cross-attention layers"):
        generate(model, req)
    with pytest.raises(ValueError, match=r"ip_adapters\[0\]: no image"):
        GenerationRequest("x", ip_adapters=(IPAdapterSpec(str(adapter)),)).validate()


# ---------------------------------------------------------------------------------------------
# SDXL: the published adapters' shapes, and parity on a reduced-width SDXL

# the published encoders (their config.json): OpenAI ViT-L/14, LAION ViT-H/14 and ViT-bigG/14
PUBLISHED_VISION = {
    "vit-l": VisionConfig(1024, 24, 16, 4096, projection_dim=768, act="quick_gelu"),
    "vit-h": VisionConfig(1280, 32, 16, 5120, projection_dim=1024, act="gelu"),
    "vit-bigg": VisionConfig(1664, 48, 16, 8192, projection_dim=1280, act="gelu"),
}


@pytest.mark.parametrize("name", list(PUBLISHED_VISION))
def test_published_encoders_are_read_from_their_shapes(name: str) -> None:
    """Heads and activation are not in the shapes: 16 heads (bigG: of 104 channels) and gelu except OpenAI's
    ViT-L, as their configs say."""
    with torch.device("meta"):
        sd = CLIPVisionModel(PUBLISHED_VISION[name]).state_dict()
    assert VisionConfig.from_state_dict(sd) == PUBLISHED_VISION[name]


# the published SDXL adapters (h94/IP-Adapter): (image feature width, tokens, "plus" Resampler)
PUBLISHED_XL_ADAPTERS = {
    "ip-adapter_sdxl": (1280, 4, None),  # ViT-bigG's image embedding
    "ip-adapter_sdxl_vit-h": (1024, 4, None),
    "ip-adapter-plus_sdxl_vit-h": (1280, 16, (1280, 4, 20)),  # ViT-H's hidden states
}


@pytest.mark.parametrize("name", list(PUBLISHED_XL_ADAPTERS))
def test_published_sdxl_adapters_fit_sdxl_only(name: str) -> None:
    """The published SDXL adapters' shapes (h94/IP-Adapter: ip_adapter.1 ... ip_adapter.139 of inner width
    640 / 1280 at context 2048) fit sdlab's SDXL U-Net and are refused on SD1.5's."""
    from sdlab.config import SD1, SDXL_UNET
    from sdlab.ip_adapter import check_fit

    with torch.device("meta"):
        xl, sd1 = UNetModel(SDXL_UNET), UNetModel(SD1.unet)
        layers = tuple((2 * i + 1, 640 if i < 4 or 54 <= i < 60 else 1280) for i in range(70))
        adapter = IPAdapterModel(IPAdapterConfig(layers, 2048, *PUBLISHED_XL_ADAPTERS[name]))
    sd = adapter.state_dict()
    assert max(int(k.split(".")[1]) for k in sd if k.startswith("ip_adapter.")) == 139
    assert IPAdapterConfig.from_state_dict(sd) == adapter.cfg
    check_fit(adapter, xl)
    with pytest.raises(CheckpointError, match="70 cross-attention layers .* the model's 16"):
        check_fit(adapter, sd1)


# reduced-width stand-ins for the encoders the SDXL adapters read: "vit-g" for ip-adapter_sdxl, "vit-h" for
# ip-adapter_sdxl_vit-h and ip-adapter-plus_sdxl_vit-h (different widths and projections)
XL_VISION = {
    "vit-g": VisionConfig(
        width=192, layers=2, heads=3, intermediate=384, patch=14, image_size=28, projection_dim=160
    ),
    "vit-h": TINY_VISION,
}


@dataclass
class XL:
    model: StableDiffusion
    pipe: Any
    folder: Path


@pytest.fixture(scope="module")
def xl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XL]:
    """The reduced-width SDXL of test_controlnet (SDXL's 70 cross-attentions at a fifth of the width) and
    diffusers' StableDiffusionXLPipeline from the folder sdlab's converter writes (Euler over Karras σ); one
    torch thread (many small products)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from test_controlnet import XL_REDUCED
    from tiny import tiny_checkpoint

    from sdlab.checkpoints.load import convert, save_single_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("ip-xl")
    path = save_single_file(tiny_checkpoint(XL_REDUCED, seed=30), folder / "xl.safetensors")
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(convert(path, folder / "xl")), local_files_only=True, add_watermarker=False
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    yield XL(load_model(path), pipe, folder)
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("encoder", "plus"),
    [("vit-g", False), ("vit-h", False), ("vit-h", True)],
    ids=["sdxl-vit-g", "sdxl-vit-h", "plus-sdxl-vit-h"],
)
def test_sdxl_generate_matches_diffusers_load_ip_adapter(encoder: str, plus: bool, xl: XL) -> None:
    folder = xl.folder / f"{encoder}-{'plus' if plus else 'plain'}"
    _, reference_encoder = _transformers_vision(XL_VISION[encoder])
    reference_encoder.save_pretrained(folder / "image_encoder")
    adapter = _adapter_file(folder, xl.model.unet, plus, XL_VISION[encoder])
    image, seed, size, steps, cfg = _image(), 5, 64, 3, 6.0
    spec = IPAdapterSpec(str(adapter), image, 0.7, clip_vision=str(folder / "image_encoder"))
    request = GenerationRequest("a red apple", "blurry", size, size, steps, cfg, "euler", "karras", seed)
    ours = generate(xl.model, replace(request, ip_adapters=(spec,))).images[0]

    xl.pipe.load_ip_adapter(
        str(folder), subfolder="", weight_name=adapter.name, image_encoder_folder="image_encoder"
    )
    xl.pipe.set_ip_adapter_scale(0.7)
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(seed))
    try:
        with torch.no_grad():
            ref = xl.pipe(
                "a red apple",
                negative_prompt="blurry",
                ip_adapter_image=image,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=cfg,
                latents=latents,
            ).images[0]
    finally:
        xl.pipe.unload_ip_adapter()
    value = psnr(ours, ref)
    print(f"\nSDXL IP-Adapter ({encoder}, {'plus' if plus else 'plain'}) vs diffusers: PSNR {value:.1f} dB")
    assert np.asarray(ref).std() > 5
    assert value >= 40.0
    if not plus:  # once: the image prompt changes the image
        assert psnr(generate(xl.model, request).images[0], ref) < 30.0


def test_an_encoder_of_the_wrong_width_is_refused(xl: XL, tmp_path: Path) -> None:
    """ip-adapter_sdxl with a ViT-H encoder (the usual mix-up) is refused naming both widths."""
    adapter = _adapter_file(tmp_path, xl.model.unet, False, XL_VISION["vit-g"])
    encoder = randomize(CLIPVisionModel(XL_VISION["vit-h"]), 3)
    spec = IPAdapterSpec(str(adapter), _image(), clip_vision=encoder)
    request = GenerationRequest("x", width=64, height=64, steps=1, ip_adapters=(spec,))
    with pytest.raises(
        CheckpointError, match="image embeddings of width 160; the CLIP vision model gives 64"
    ):
        generate(xl.model, request)
