"""The generation pipeline on tiny models: seeds, batches, img2img, inpainting, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import write_tiny

from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.images import read_parameters, save_png, to_tensor
from sdlab.infotext import parse_infotext, request_infotext
from sdlab.pipeline import GenerationRequest, _latents_of, generate, seed_noise


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StableDiffusion]:
    tmp = tmp_path_factory.mktemp("models")
    return {
        name: load_model(write_tiny(name, tmp / f"{name}.safetensors")) for name in ("sd1", "sd2", "inpaint")
    }


def _req(**kw: object) -> GenerationRequest:
    base = dict(
        prompt="a red apple", negative_prompt="blurry", width=32, height=40, steps=4, cfg_scale=5.0, seed=7
    )
    return GenerationRequest(**{**base, **kw})  # type: ignore[arg-type]


def test_seed_noise_follows_the_a1111_convention() -> None:
    noise = seed_noise([5, 6], (4, 8, 8))
    for i, s in enumerate((5, 6)):
        assert torch.equal(
            noise[i : i + 1], torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(s))
        )


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m_sde", "DPM++ 2M Karras"])
def test_batch_equals_single_runs(models: dict[str, StableDiffusion], sampler: str) -> None:
    batch = generate(models["sd1"], _req(batch_size=3, sampler=sampler))
    assert batch.seeds == [7, 8, 9]
    for i, seed in enumerate(batch.seeds):
        single = generate(models["sd1"], _req(seed=seed, sampler=sampler))
        # equal up to fp32 rounding: batched convolutions sum in another order (~1e-6 of the scale)
        scale = single.latents.abs().max()
        assert (batch.latents[i] - single.latents[0]).abs().max() <= 1e-5 * scale


def test_same_seed_same_image_and_random_seed_reported(models: dict[str, StableDiffusion]) -> None:
    a, b = generate(models["sd1"], _req()), generate(models["sd1"], _req())
    assert torch.equal(a.latents, b.latents)
    c = generate(models["sd1"], _req(seed=-1))
    assert c.request.seed >= 0 and c.seeds == [c.request.seed]
    assert not torch.equal(generate(models["sd1"], _req(seed=8)).latents, a.latents)


def test_v_prediction_model_and_guidance_one(models: dict[str, StableDiffusion]) -> None:
    out = generate(models["sd2"], _req(cfg_scale=1.0, sampler="uni_pc"))
    assert out.images[0].size == (32, 40) and torch.isfinite(out.latents).all()


def test_img2img_skips_the_start_of_the_schedule(models: dict[str, StableDiffusion]) -> None:
    init = Image.new("RGB", (48, 48), (200, 30, 30))
    totals: list[int] = []
    out = generate(
        models["sd1"],
        _req(init_image=init, strength=0.5, steps=10),
        callback=lambda i, n, _: totals.append(n),
    )
    assert totals[-1] == 6  # int(0.5 * 10) + 1 steps, as AUTOMATIC1111 runs
    assert out.images[0].size == (32, 40)  # the init image is resized to the request
    weak = generate(models["sd1"], _req(init_image=init, strength=0.05, steps=20, sampler="euler"))
    init_latents = _latents_of(
        models["sd1"], to_tensor(init.resize((32, 40))), torch.Generator().manual_seed(7)
    )
    # a weak strength stays near the init latents, a full one does not
    strong = generate(models["sd1"], _req(init_image=init, strength=1.0, steps=20, sampler="euler"))
    assert (weak.latents - init_latents).abs().mean() < 0.5 * (strong.latents - init_latents).abs().mean()


def test_inpainting_keeps_the_unmasked_latents(models: dict[str, StableDiffusion]) -> None:
    init = Image.new("RGB", (32, 40), (30, 80, 200))
    mask = Image.new("L", (32, 40), 0)
    mask.paste(255, (0, 0, 16, 40))  # repaint the left half
    out = generate(models["sd1"], _req(init_image=init, mask=mask, mask_blur=0, strength=1.0))
    init_latents = _latents_of(models["sd1"], to_tensor(init), torch.Generator().manual_seed(7))
    right = slice(10, None)  # latent columns well inside the kept half (downscale 2: columns 8..15)
    assert torch.equal(out.latents[..., right], init_latents[..., right])
    assert not torch.allclose(out.latents[..., :6], init_latents[..., :6])
    inverted = generate(
        models["sd1"], _req(init_image=init, mask=mask, mask_blur=0, inpainting_mask_invert=True)
    )
    assert torch.equal(inverted.latents[..., :6], init_latents[..., :6])


def test_inpainting_unet_gets_mask_and_masked_image(models: dict[str, StableDiffusion]) -> None:
    init = Image.new("RGB", (32, 40), (30, 80, 200))
    mask = Image.new("L", (32, 40), 255)
    out = generate(models["inpaint"], _req(init_image=init, mask=mask, strength=1.0))
    assert torch.isfinite(out.latents).all() and out.latents.shape == (1, 4, 20, 16)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"width": 33}, "width must be a positive multiple"),
        ({"steps": 0}, "steps"),
        ({"sampler": "nope"}, "unknown sampler 'nope'"),
        ({"scheduler": "nope"}, "unknown schedule"),
        ({"mask": Image.new("L", (8, 8))}, "needs an init image"),
        ({"strength": 0.0}, "strength"),
    ],
)
def test_bad_requests_are_named(models: dict[str, StableDiffusion], kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(models["sd1"], _req(**kw))


def test_png_parameters_round_trip(models: dict[str, StableDiffusion], tmp_path: Path) -> None:
    out = generate(models["sd1"], _req(sampler="DPM++ 2M Karras", prompt='a "quoted", prompt'))
    text = request_infotext(out.request, out.seeds[0], models["sd1"])
    path = save_png(out.images[0], tmp_path / "a.png", text)
    again = save_png(out.images[0], tmp_path / "a.png", text)
    assert again != path and again.name == "a-1.png"  # never overwrites
    params = parse_infotext(read_parameters(path))
    assert params["Prompt"] == 'a "quoted", prompt' and params["Negative prompt"] == "blurry"
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
    assert params["Seed"] == "7" and params["Size"] == "32x40" and params["Steps"] == "4"
    assert params["Model"] == "sd1" and len(params["Model hash"]) == 10


def test_inpainting_pastes_the_original_outside_the_mask(models: dict[str, StableDiffusion]) -> None:
    init = Image.new("RGB", (32, 40), (30, 80, 200))
    mask = Image.new("L", (32, 40), 0)
    mask.paste(255, (0, 0, 16, 40))
    out = generate(models["sd1"], _req(init_image=init, mask=mask, mask_blur=0))
    pixels = out.images[0].load()
    assert all(pixels[x, y] == (30, 80, 200) for x in range(16, 32) for y in range(40))
    assert any(pixels[x, y] != (30, 80, 200) for x in range(16) for y in range(40))


def test_inpainting_unet_txt2img_gets_a_blank_all_masked_image(models: dict[str, StableDiffusion]) -> None:
    out = generate(models["inpaint"], _req())
    assert torch.isfinite(out.latents).all() and out.images[0].size == (32, 40)


def test_every_family_loads_and_generates(tmp_path: Path) -> None:
    """tests/tiny.py builds a model of every family record; each loads as that family and generates
    txt2img, img2img and (inpainting families) a masked repaint that keeps the unmasked part."""
    from tiny import TINY

    from sdlab import families

    assert {cfg.family for cfg in TINY.values()} == set(families.FAMILIES)
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    for name, cfg in TINY.items():
        model = load_model(write_tiny(name, tmp_path / f"{name}.safetensors"))
        assert model.config.family == cfg.family and model.family is families.get(cfg.family)
        txt = generate(model, _req(width=32, height=32, steps=3))
        img = generate(model, _req(width=32, height=32, steps=3, init_image=init, strength=0.6))
        pixels = [to_tensor(r.images[0]) for r in (txt, img)]
        assert all(bool(p.isfinite().all()) and float(p.std()) > 0.01 for p in pixels), name
        assert not torch.equal(pixels[0], pixels[1]), name
        if model.family.inpaint:
            out = to_tensor(
                generate(
                    model, _req(width=32, height=32, steps=3, init_image=init, mask=mask, mask_blur=0)
                ).images[0]
            )
            kept = out[..., 24:]  # far from the blurred mask edge: the init image pasted back
            assert torch.allclose(kept, to_tensor(init)[..., 24:], atol=2 / 255), name


def test_cli_refiner_matches_the_pipeline_and_is_recorded(tmp_path: Path) -> None:
    from sdlab.cli import main

    base = write_tiny("sdxl", tmp_path / "xl.safetensors")
    refiner = write_tiny("sdxl-refiner", tmp_path / "xl-refiner.safetensors")
    out = tmp_path / "out.png"
    args = ["generate", "a cat", "-n", "blurry", "-m", str(base), "-W", "32", "-H", "32", "--steps", "6"]
    args += [
        "-s",
        "3",
        "--sampler",
        "euler",
        "--refiner",
        str(refiner),
        "--refiner-switch",
        "0.5",
        "-o",
        str(out),
    ]
    assert main([*args, "-q"]) == 0
    params = parse_infotext(read_parameters(out))
    assert params["Refiner switch at"] == "0.5" and params["Refiner"].startswith("xl-refiner [")
    req = GenerationRequest(
        "a cat",
        "blurry",
        32,
        32,
        steps=6,
        sampler="euler",
        seed=3,
        refiner="xl-refiner",
        refiner_switch_at=0.5,
    )
    want = generate(load_model(base), req, refiner=load_model(refiner)).images[0]
    assert torch.equal(to_tensor(Image.open(out).convert("RGB")), to_tensor(want))
    alone = generate(
        load_model(base), GenerationRequest("a cat", "blurry", 32, 32, steps=6, sampler="euler", seed=3)
    )
    assert not torch.equal(to_tensor(alone.images[0]), to_tensor(want))
    with pytest.raises(ValueError, match="refiner"):
        generate(load_model(base), req)  # named in the request but not loaded
