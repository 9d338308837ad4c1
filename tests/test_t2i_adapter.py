"""T2I-Adapter: the three networks against diffusers' T2IAdapter, the key map and detection, both file
layouts, where the U-Net adds the features (against diffusers' UNet2DConditionModel and
sd-webui-controlnet's block lists), and a whole generation against StableDiffusionAdapterPipeline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import diffusers_unet, max_diff, randomize
from tiny import TINY, tiny_checkpoint

from sdlab.checkpoints.io import write_safetensors
from sdlab.checkpoints.load import load_model, save_single_file
from sdlab.config import SD1_UNET, SDXL_UNET
from sdlab.control import Control, ControlSpec, adapter_features, load_controlnet
from sdlab.models.t2i_adapter import (
    T2IAdapterConfig,
    T2IAdapterModel,
    aligned,
    detect_adapter,
    diffusers_to_original,
    feature_slots,
    halve,
    place_features,
)
from sdlab.pipeline import GenerationRequest, generate

# diffusers' T2IAdapter arguments -> sdlab's config of the same network
VARIANTS = {
    "full": (dict(channels=[32, 64], adapter_type="full_adapter"), T2IAdapterConfig((32, 64), "full")),
    "full_xl": (
        dict(channels=[32, 64, 128, 128], adapter_type="full_adapter_xl", downscale_factor=16),
        T2IAdapterConfig((32, 64, 128, 128), "full_xl"),
    ),
    "light": (
        dict(channels=[32, 64, 64], adapter_type="light_adapter", num_res_blocks=3, in_channels=1),
        T2IAdapterConfig((32, 64, 64, 64), "light", 3, hint_channels=1),
    ),
}


def _diffusers_adapter(variant: str, seed: int = 4):
    from diffusers import T2IAdapter

    return randomize(T2IAdapter(**VARIANTS[variant][0]), seed).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_matches_diffusers_and_detects_its_config(variant: str) -> None:
    ref = _diffusers_adapter(variant)
    sd = diffusers_to_original(ref.state_dict())
    cfg = detect_adapter(sd)
    assert cfg == VARIANTS[variant][1]
    ours = T2IAdapterModel(cfg)
    ours.load_state_dict(sd, strict=True)
    hint = torch.rand(2, cfg.hint_channels, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(hint), ref(hint)
    assert len(a) == len(b) == len(cfg.channels)
    for x, y, shape in zip(a, b, cfg.feature_shapes(8, 12), strict=True):
        assert x.shape[1:] == shape
        assert max_diff(x, y) <= 1e-5 * y.abs().max()


def test_feature_places_are_the_extensions() -> None:
    """sd-webui-controlnet adds the four features after input blocks 2, 5, 8, 11 (SD1) and 3, 5, 8 and
    the middle block (SDXL) of the real U-Nets."""
    sd1 = T2IAdapterConfig().feature_shapes(64, 64)
    xl = T2IAdapterConfig(kind="full_xl").feature_shapes(128, 128)
    assert feature_slots(SD1_UNET, sd1, 64, 64) == [2, 5, 8, 11]
    assert feature_slots(SDXL_UNET, xl, 128, 128) == [3, 5, 8, 9]
    with pytest.raises(ValueError, match="fits no place"):
        feature_slots(SD1_UNET, xl, 64, 64)


def test_a1111_pooling_and_alignment_are_the_extensions() -> None:
    """sd-webui-controlnet's adapter (scripts/adapter.py) pools with a plain AvgPool2d(2, 2) (odd sides
    floored) and its `aligned_adding` resizes a feature whose shape differs from the U-Net's by nearest."""
    x = torch.rand(1, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(halve(x, "a1111"), torch.nn.AvgPool2d(kernel_size=2, stride=2)(x))
    cfg = T2IAdapterConfig((32, 64), "full")
    net = randomize(T2IAdapterModel(cfg), 1)
    with torch.no_grad():
        feats = net(torch.rand(1, 3, 72, 56, generator=torch.Generator().manual_seed(1)), pooling="a1111")
    assert [tuple(f.shape[-2:]) for f in feats] == [(9, 7), (4, 3)]
    fitted = aligned(cfg, feats, 9, 7)
    assert torch.equal(fitted[0], feats[0])
    theirs = torch.nn.functional.interpolate(feats[1], size=(5, 4), mode="nearest")  # aligned_adding
    assert torch.equal(fitted[1], theirs)


def test_unet_adds_features_as_diffusers_does() -> None:
    from sdlab.models.unet import UNetModel

    cfg = TINY["sd1"]
    unet = randomize(UNetModel(cfg.unet), 7)
    adapter = _diffusers_adapter("full")
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, cfg.unet.context_dim, generator=g)
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        feats = adapter(torch.rand(2, 3, 64, 64, generator=g))
        ours = unet(x, t, context, None, None, place_features(cfg.unet, feats, 8, 8))
        plain = unet(x, t, context)
        ref = diffusers_unet(unet.state_dict(), cfg.unet, cfg.vae)
        theirs = ref(x, t, context, down_intrablock_additional_residuals=[f.clone() for f in feats]).sample
    assert max_diff(ours, theirs) <= 1e-5 * theirs.abs().max()
    assert max_diff(ours, plain) > 1e-2  # the features change the prediction


def test_both_file_layouts_load_the_same_network(tmp_path: Path) -> None:
    ref = _diffusers_adapter("full")
    sd = diffusers_to_original(ref.state_dict())
    original = write_safetensors(sd, tmp_path / "t2iadapter_canny_tiny.safetensors")
    folder = tmp_path / "t2i-adapter-diffusers"
    ref.save_pretrained(folder)  # diffusers' layout, written by diffusers
    for source in (original, folder, folder / "diffusion_pytorch_model.safetensors"):
        net = load_controlnet(source)
        assert isinstance(net, T2IAdapterModel)
        loaded = net.state_dict()
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd), source


def test_soft_injection_and_control_mode() -> None:
    """ "My prompt is more important": the extension's weights 0.25, 0.62, 0.825, 1; "ControlNet is more
    important": features on the conditional rows only."""
    cfg = T2IAdapterConfig((32, 64, 64, 64), "light", 2)
    net = randomize(T2IAdapterModel(cfg), 2)
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = torch.zeros(2, 4, 8, 8)
    unet = TINY["sd1"].unet.__class__(
        model_channels=32,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=(1, 1, 1, 1),
        transformer_depth=(0,) * 4,
        transformer_depth_output=(0,) * 8,
        context_dim=128,
    )
    with torch.no_grad():
        feats = net(hint)
    mark = torch.tensor([1.0, 0.0])
    for mode, want in (("balanced", (1, 1, 1, 1)), ("prompt", (0.25, 0.62, 0.825, 1.0))):
        got = adapter_features([Control(net, hint, 0.5, 0, 1, mode)], x, mark, 0.0, unet)
        placed = [f for f in got if f is not None]
        for p, f, w in zip(placed, feats, want, strict=True):
            assert torch.allclose(p, f * 0.5 * w)
    got = adapter_features([Control(net, hint, 0.5, 0, 1, "control")], x, mark, 0.0, unet)
    placed = [f for f in got if f is not None]
    assert torch.equal(placed[0][1], torch.zeros_like(placed[0][1]))
    assert torch.allclose(placed[0][0], feats[0][0] * 0.5 * 0.25)
    assert adapter_features([Control(net, hint, 0.5, 0.5, 1, "balanced")], x, mark, 0.2, unet) is None


def test_generation_matches_diffusers_adapter_pipeline(tmp_path: Path) -> None:
    """Tiny SD1 model (its VAE downscaling by 8, as the adapter's image is) and adapter with seeded random
    weights: sdlab's image equals diffusers' StableDiffusionAdapterPipeline's (Euler, Karras, CFG 7) from
    the original file and the diffusers folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionAdapterPipeline
    from reference import diffusers_pipeline, psnr, write_diffusers_config

    model_cfg = replace(TINY["sd1"], vae=replace(TINY["sd1"].vae, ch_mult=(1, 1, 1, 1)))
    path = save_single_file(tiny_checkpoint(model_cfg), tmp_path / "sd1.safetensors")
    config = write_diffusers_config(model_cfg, tmp_path / "config")
    adapter = _diffusers_adapter("full", seed=9)
    original = write_safetensors(
        diffusers_to_original(adapter.state_dict()), tmp_path / "t2iadapter.safetensors"
    )
    folder = tmp_path / "adapter-diffusers"
    adapter.save_pretrained(folder)
    size, steps, cfg, seed = 64, 4, 7.0, 11
    prompt, negative = "a red apple", "blurry"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))

    base = diffusers_pipeline(path, config)
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet")}
    pipe = StableDiffusionAdapterPipeline(
        **parts,
        adapter=adapter,
        scheduler=EulerDiscreteScheduler.from_config(
            base.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        ref = pipe(
            prompt,
            image,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=cfg,
            negative_prompt=negative,
            latents=latents,
            adapter_conditioning_scale=0.8,
        ).images[0]

    model = load_model(path)
    request = GenerationRequest(prompt, negative, size, size, steps, cfg, "euler", "karras", seed)
    plain = generate(model, request).images[0]
    for source in (original, folder):
        spec = ControlSpec(str(source), image, weight=0.8)
        ours = generate(model, replace(request, controls=(spec,))).images[0]
        value = psnr(ours, ref)
        print(f"\nT2I-Adapter ({source.name}) vs diffusers: PSNR {value:.1f} dB")
        assert value >= 40.0
    assert psnr(plain, ref) < 30.0  # the adapter changes the image
