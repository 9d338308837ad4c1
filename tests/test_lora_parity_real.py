"""LoRA at the real SD1.5 shapes against diffusers: sdlab's image with a LoRA at weight 0.7 equals
diffusers' `load_lora_weights` + `set_adapters(..., 0.7)` image, for a kohya file and a PEFT file
(seeded random LoRA weights on the kohya default targets: U-Net transformers, text attention and MLP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reference import diffusers_pipeline, psnr

from sdlab import lora
from sdlab.checkpoints.io import write_safetensors
from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.pipeline import GenerationRequest, generate

pytestmark = pytest.mark.slow
SEED, SIZE, STEPS, CFG, RANK = 4321, 128, 6, 7.0, 4
PROMPT, NEGATIVE = "a red apple on a wooden table", "blurry"


def _random_lora(model: StableDiffusion, layout: str, folder: Path) -> Path:
    """A rank-4 LoRA on every kohya default target, written as a kohya or a PEFT (diffusers) file."""
    g = torch.Generator().manual_seed(7)
    targets = lora.training_targets(model.unet, model.text_encoders, model.family)
    dotted = {
        id(layer): name
        for name, layer in lora.dotted_layer_map(model.unet, model.text_encoders, model.family).items()
        if name.startswith(("unet.", "text_encoder.text_model."))
    }
    sd: dict[str, torch.Tensor] = {}
    for name, layer in targets.items():
        w = layer.weight
        down = torch.randn(RANK, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], RANK, *[1] * (w.ndim - 2), generator=g) * 0.5
        if layout == "kohya":
            sd |= {
                f"{name}.lora_down.weight": down,
                f"{name}.lora_up.weight": up,
                f"{name}.alpha": torch.tensor(2.0),
            }
        else:  # PEFT: no alpha anywhere, so scale 1 in both engines
            sd |= {f"{dotted[id(layer)]}.lora_A.weight": down, f"{dotted[id(layer)]}.lora_B.weight": up}
    return write_safetensors(sd, folder / f"{layout}.safetensors", metadata={"format": "pt"})


def test_lora_images_match_diffusers(real_size_files, tmp_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler
    from safetensors.torch import load_file

    path, config = real_size_files("sd1")
    ours = load_model(path)
    pipe = diffusers_pipeline(path, config)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
    )
    latents = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(SEED))
    req = GenerationRequest(PROMPT, NEGATIVE, SIZE, SIZE, STEPS, CFG, "euler", "karras", SEED)
    plain = generate(ours, req).images[0]
    for layout in ("kohya", "peft"):
        file = _random_lora(ours, layout, tmp_path)
        mine = generate(ours, GenerationRequest(**{**req.__dict__, "loras": ((str(file), 0.7),)})).images[0]
        pipe.load_lora_weights(load_file(file), adapter_name=layout)
        pipe.set_adapters([layout], adapter_weights=[0.7])
        with torch.no_grad():
            ref = pipe(
                PROMPT,
                negative_prompt=NEGATIVE,
                height=SIZE,
                width=SIZE,
                num_inference_steps=STEPS,
                guidance_scale=CFG,
                latents=latents,
            ).images[0]
        pipe.delete_adapters(layout)
        value, effect = psnr(mine, ref), psnr(mine, plain)
        print(f"\n{layout} LoRA at 0.7 vs diffusers: PSNR {value:.1f} dB (vs no LoRA: {effect:.1f} dB)")
        assert np.asarray(ref).std() > 5 and effect < 30  # the LoRA changes the image
        assert value >= 40.0
