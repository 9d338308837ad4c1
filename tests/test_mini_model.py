"""The shipped sdlab-mini model: a small ordinary checkpoint that sdlab uses when no model is named,
that `sdlab info` describes, that diffusers loads and draws the same image from, and that draws what
"a red apple" asks for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import diffusers_pipeline, psnr, write_diffusers_config

from sdlab.checkpoints.io import read_metadata
from sdlab.checkpoints.load import default_model_path, load_model, read_checkpoint
from sdlab.cli import main
from sdlab.images import read_parameters
from sdlab.train.mini_classifier import classify
from sdlab.train.mini_data import NAME_TO_OBJ
from sdlab.train.mini_eval import object_crop, read_scene

SHIPPED = default_model_path()


def test_shipped_model_is_a_small_fp16_checkpoint_that_info_describes(capsys) -> None:
    assert SHIPPED.is_file(), f"{SHIPPED}: the shipped model is missing from the package"
    assert SHIPPED.stat().st_size <= 40 * 2**20
    meta = read_metadata(SHIPPED)
    assert meta["sdlab.native_size"] == "64" and int(meta["sdlab.steps"]) > 0 and float(meta["sdlab.cfg"]) > 0
    ckpt = read_checkpoint(SHIPPED)
    tensors = [t for sd in (ckpt.unet, ckpt.vae, *ckpt.text) for t in sd.values() if t.is_floating_point()]
    assert {t.dtype for t in tensors} == {torch.float16}
    assert main(["info"]) == 0  # no model named: the shipped one, like any other checkpoint
    out = capsys.readouterr().out
    assert str(SHIPPED) in out and "family:" in out and "prediction:  v-prediction" in out
    assert main(["info", "sdlab-mini"]) == 0 and capsys.readouterr().out == out


def test_generate_with_no_model_writes_the_shipped_model_s_image(tmp_path: Path, capsys) -> None:
    assert main(["generate", "a red apple", "-s", "0", "--outdir", str(tmp_path), "-q"]) == 0
    path = Path(capsys.readouterr().out.strip())
    with Image.open(path) as im:
        assert im.size == (64, 64)  # the model's native size, from its metadata
    text = read_parameters(path)
    assert "Model: sdlab-mini" in text and "Steps: 20" in text and "CFG scale: 3" in text


def test_a_red_apple_is_a_red_apple(tmp_path: Path, capsys) -> None:
    """The seed's own example: four seeds of "a red apple", each read by the evaluator's readers."""
    assert main(["generate", "a red apple", "--batch", "4", "-s", "0", "--outdir", str(tmp_path), "-q"]) == 0
    paths = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(paths) == 4
    images = [Image.open(p).convert("RGB") for p in paths]
    assert all(im.size == (64, 64) for im in images)
    assert "Model: sdlab-mini" in read_parameters(paths[0])
    readings = [read_scene(im) for im in images]
    assert all(r.box is not None for r in readings)
    crops = torch.stack([object_crop(im, r) for im, r in zip(images, readings, strict=True)])
    apples = int((classify(crops) == NAME_TO_OBJ["red apple"]).sum())
    assert apples >= 3, f"{apples} of 4 images read as a red apple"


@pytest.mark.slow
def test_diffusers_loads_the_shipped_file_and_draws_the_same_image(tmp_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler

    model = load_model(SHIPPED)
    size, steps, cfg, seed = model.native_size, model.default_steps, model.default_cfg, 7
    prompt = "a small cat face in the top left, blue background"
    out = tmp_path / "ours.png"
    argv = ["generate", prompt, "--steps", str(steps), "--cfg", str(cfg), "-s", str(seed), "-o", str(out)]
    assert main([*argv, "--sampler", "euler", "--scheduler", "karras", "-q"]) == 0
    ours = Image.open(out).convert("RGB")

    config = write_diffusers_config(model.config, tmp_path / "config")
    pipe = diffusers_pipeline(SHIPPED, config)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
    )
    f = model.config.vae.downscale
    latents = torch.randn((1, 4, size // f, size // f), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        ref = pipe(
            prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=cfg, latents=latents
        ).images[0]
    value = psnr(ours, ref)
    print(f"\nshipped model, sdlab vs diffusers: PSNR {value:.1f} dB")
    assert np.asarray(ref).std() > 5  # not a flat image
    assert value >= 40.0
