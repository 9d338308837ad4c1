"""LoRA at the real SDXL shapes against diffusers: sdlab's image with a LoRA at weight 0.7 equals diffusers'
`load_lora_weights` + `set_adapters(..., 0.7)` image, for a kohya file and a PEFT file (seeded random
rank-4 LoRA weights on the cross-attention of every U-Net transformer and the self-attention of both text
encoders), at 64x64 px and 3 steps.

Two fp32 SDXL models do not fit in memory together, so the file is written, converted and run by diffusers
in processes of their own, then sdlab loads the same fp16 file. Measured here: 8 min 38 s, peak RSS
19.5 GiB, kohya 80.6 dB and PEFT 82.0 dB; far over the default run's time budget, so it runs only with
SDLAB_SDXL_REAL=1 (under `flock /tmp/sdlab-bigmem.lock`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import psnr

from sdlab import families, lora
from sdlab.checkpoints.io import write_safetensors
from sdlab.checkpoints.load import empty_modules, load_model
from sdlab.config import SDXL
from sdlab.models.clip import CLIPTextModel
from sdlab.models.unet import UNetModel
from sdlab.pipeline import GenerationRequest, generate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("SDLAB_SDXL_REAL") != "1", reason="set SDLAB_SDXL_REAL=1 (~9 min, 19.5 GiB peak)"
    ),
]
SEED, SIZE, STEPS, CFG, RANK, WEIGHT = 4321, 64, 3, 7.0, 4, 0.7
PROMPT, NEGATIVE = "a red apple on a wooden table", "blurry"
LAYOUTS = ("kohya", "peft")
ROOT = Path(__file__).resolve().parents[1]


def _random_lora(layout: str, folder: Path) -> Path:
    """A rank-4 LoRA on U-Net cross-attention and text self-attention (names and shapes from networks
    built on the meta device), as a kohya file (alpha 2) or a PEFT file (no alpha: scale 1)."""
    with empty_modules():
        unet, texts = UNetModel(SDXL.unet), [CLIPTextModel(t) for t in SDXL.text]
    family = families.get(SDXL.family)
    g = torch.Generator().manual_seed(7)
    folders = tuple(f"{s.diffusers_folder}.text_model." for s in family.text)
    dotted = {
        id(layer): name
        for name, layer in lora.dotted_layer_map(unet, texts, family).items()
        if name.startswith(("unet.", *folders))
    }
    targets = lora.training_targets(unet, texts, family)
    sd: dict[str, torch.Tensor] = {}
    for name, layer in ((n, t) for n, t in targets.items() if "attn2" in n or "self_attn" in n):
        w = layer.weight
        down = torch.randn(RANK, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], RANK, *[1] * (w.ndim - 2), generator=g) * 0.5
        if layout == "kohya":
            sd |= {
                f"{name}.lora_down.weight": down,
                f"{name}.lora_up.weight": up,
                f"{name}.alpha": torch.tensor(2.0),
            }
        else:
            sd |= {f"{dotted[id(layer)]}.lora_A.weight": down, f"{dotted[id(layer)]}.lora_B.weight": up}
    return write_safetensors(sd, folder / f"{layout}.safetensors", metadata={"format": "pt"})


def diffusers_images(folder: str, out: str) -> None:
    """In its own process: diffusers' images without LoRA and with each file at WEIGHT, as PNGs in `out`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    os.environ["HF_HUB_OFFLINE"] = "1"
    pipe = StableDiffusionXLPipeline.from_pretrained(
        folder, torch_dtype=torch.float32, local_files_only=True, add_watermarker=False
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(SEED))
    for layout in (None, *LAYOUTS):
        if layout is not None:
            pipe.load_lora_weights(load_file(Path(out) / f"{layout}.safetensors"), adapter_name=layout)
            pipe.set_adapters([layout], adapter_weights=[WEIGHT])
        with torch.no_grad():
            image = pipe(
                PROMPT,
                negative_prompt=NEGATIVE,
                height=SIZE,
                width=SIZE,
                num_inference_steps=STEPS,
                guidance_scale=CFG,
                latents=latents,
            ).images[0]
        image.save(Path(out) / f"diffusers-{layout or 'plain'}.png")
        if layout is not None:
            pipe.delete_adapters(layout)


def write_sdxl(path: str) -> None:
    """The real-shape random-weight fp16 SDXL file, written as `bench/sdxl_real_size.py` writes it."""
    spec = importlib.util.spec_from_file_location("sdxl_real_size", ROOT / "bench" / "sdxl_real_size.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.write_checkpoint(Path(path), tiny=False)


def _run(code: str) -> None:
    """Python code in a fresh process (its memory is freed when it ends), with the tests folder importable."""
    prefix = f"import sys; sys.path[:0] = {[str(ROOT / 'tests')]!r}; "
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", prefix + code], check=True, env=env)


def test_sdxl_lora_images_match_diffusers(tmp_path: Path) -> None:
    path = tmp_path / "sdxl.safetensors"
    folder = tmp_path / "diffusers"  # written, converted, diffusers' images: each in a process of its own
    _run(f"import test_lora_parity_sdxl as t; t.write_sdxl({str(path)!r})")
    _run(f"from sdlab.checkpoints.load import convert; convert({str(path)!r}, {str(folder)!r})")
    files = {layout: _random_lora(layout, tmp_path) for layout in LAYOUTS}
    _run(f"import test_lora_parity_sdxl as t; t.diffusers_images({str(folder)!r}, {str(tmp_path)!r})")

    model = load_model(path)
    req = GenerationRequest(PROMPT, NEGATIVE, SIZE, SIZE, STEPS, CFG, "euler", "karras", SEED)
    plain = generate(model, req).images[0]
    assert psnr(plain, Image.open(tmp_path / "diffusers-plain.png").convert("RGB")) >= 40.0
    for layout, file in files.items():
        with_lora = GenerationRequest(**{**req.__dict__, "loras": ((str(file), WEIGHT),)})
        mine = generate(model, with_lora).images[0]
        ref = Image.open(tmp_path / f"diffusers-{layout}.png").convert("RGB")
        value, effect = psnr(mine, ref), psnr(mine, plain)
        print(f"\nSDXL {layout} at {WEIGHT} vs diffusers: PSNR {value:.1f} dB (no LoRA: {effect:.1f} dB)")
        assert np.asarray(ref).std() > 5 and effect < 30  # the LoRA changes the image
        assert value >= 40.0
