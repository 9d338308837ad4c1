"""End to end: `sdlab generate` against diffusers' StableDiffusionPipeline on the same SD1.5-shaped
weights (seeded random), prompt, seed noise, sampler (Euler, Karras σ) and guidance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import diffusers_pipeline, psnr

from sdlab.cli import main

pytestmark = pytest.mark.slow


def test_generate_matches_diffusers_euler_karras(real_size_files, tmp_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler

    path, config = real_size_files("sd1")
    seed, size, steps, cfg = 1234, 128, 6, 7.0
    prompt, negative = "a red apple on a wooden table", "blurry"
    out = tmp_path / "ours.png"
    args = [
        "generate",
        prompt,
        "-n",
        negative,
        "-m",
        str(path),
        "-W",
        str(size),
        "-H",
        str(size),
        "--steps",
        str(steps),
        "--cfg",
        str(cfg),
        "--sampler",
        "euler",
        "--scheduler",
        "karras",
        "-s",
        str(seed),
        "-o",
        str(out),
        "-q",
    ]
    assert main(args) == 0
    ours = Image.open(out).convert("RGB")

    pipe = diffusers_pipeline(path, config)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
    )
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        ref = pipe(
            prompt,
            negative_prompt=negative,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=cfg,
            latents=latents,
        ).images[0]
    value = psnr(ours, ref)
    print(f"\ngenerate vs diffusers: PSNR {value:.1f} dB")
    assert np.asarray(ref).std() > 5  # not a flat image
    assert value >= 40.0
