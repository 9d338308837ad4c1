"""IP-Adapter against transformers' CLIPVisionModelWithProjection and CLIPImageProcessor, and end to end
against diffusers' `load_ip_adapter` on the tiny SD1 model (seeded random weights)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import diffusers_pipeline, max_diff, psnr, randomize, write_diffusers_config
from tiny import TINY, write_tiny

from sdlab.checkpoints.io import CheckpointError, write_safetensors
from sdlab.checkpoints.load import load_model
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


def _adapter_file(folder: Path, unet: UNetModel, plus: bool) -> Path:
    """An IP-Adapter for `unet` with seeded random weights, in the published flat layout."""
    layers = tuple((2 * i + 1, a.to_k.out_features) for i, a in enumerate(cross_attentions(unet)))
    context = unet.cfg.context_dim
    if plus:
        # depth 4: diffusers assumes it
        cfg = IPAdapterConfig(layers, context, TINY_VISION.width, 6, resampler=(128, 4, 2))
    else:
        cfg = IPAdapterConfig(layers, context, TINY_VISION.projection_dim, 4)
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
