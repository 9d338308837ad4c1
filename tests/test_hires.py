"""AUTOMATIC1111's hires fix: target sizes, latent upscale modes, the two passes against sdlab's own
txt2img and img2img, the infotext A1111 writes and its parsing, the CLI and the A1111 API end to end."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from test_server_api import MODEL, folders, serving, unb64
from tiny import write_tiny

from sdlab import pipeline
from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.cli import main
from sdlab.conditioning import encode_prompts
from sdlab.hires import LATENT_UPSCALE_MODES, HiresFix, Target, crop_latents, target, upscale_latents
from sdlab.images import read_parameters
from sdlab.infotext import hires_from_infotext, model_hash, parse_infotext, request_infotext
from sdlab.pipeline import GenerationRequest, Guidance, generate, img2img_sigmas, sample, seed_noise
from sdlab.server.state import Settings
from sdlab.text.schedule import prompt_schedule
from sdlab.upscale import upscale_image
from sdlab.upscale.rrdb import RRDBConfig, RRDBNet

# A1111's `calculate_target_resolution` (opt_f = 8) worked by hand: first pass, hr_scale or
# (hr_resize_x, hr_resize_y) -> (hr_upscale_to_x, hr_upscale_to_y, truncate_x, truncate_y), final size
TARGETS = [
    ((512, 512), 2.0, (0, 0), (1024, 1024, 0, 0), (1024, 1024)),
    ((512, 768), 1.5, (0, 0), (768, 1152, 0, 0), (768, 1152)),
    ((520, 512), 1.3, (0, 0), (676, 665, 0, 0), (672, 664)),  # int(), then whole latents
    ((512, 768), 2.0, (1024, 0), (1024, 1536, 0, 0), (1024, 1536)),  # height from the aspect
    ((512, 768), 2.0, (0, 1024), (682, 1024, 0, 0), (680, 1024)),  # width from the aspect
    ((512, 512), 2.0, (1024, 768), (1024, 1024, 0, 32), (1024, 768)),  # cover, then crop rows
    ((512, 512), 2.0, (768, 1024), (1024, 1024, 32, 0), (768, 1024)),  # cover, then crop columns
    ((512, 768), 2.0, (1000, 1000), (1000, 1500, 0, 62), (1000, 1000)),
    ((512, 512), 2.0, (1920, 1080), (1920, 1920, 0, 105), (1920, 1080)),
]
# A1111's shared.latent_upscale_modes, transcribed
A1111_LATENT_MODES = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
BASE = dict(prompt="a red apple", negative_prompt="blurry", width=32, height=40, steps=4, cfg_scale=5.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Torch on one thread: the machine is shared, and two contended threads run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny("sd1", tmp_path_factory.mktemp("hires") / "sd1.safetensors")


@pytest.fixture(scope="module")
def model(model_file: Path) -> StableDiffusion:
    return load_model(model_file)


def _req(**kw: Any) -> GenerationRequest:
    return GenerationRequest(**{**BASE, "seed": 7, "sampler": "euler", **kw})


def _first_and_final(
    model: StableDiffusion, req: GenerationRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, pipeline.GenerationResult]:
    """The first pass's latents as the hires pass receives them, and the result."""
    seen: list[torch.Tensor] = []
    hires_pass = pipeline._hires_pass

    def spy(model: StableDiffusion, req: GenerationRequest, guidance: Guidance, first: torch.Tensor, *a: Any):
        seen.append(first.clone())
        return hires_pass(model, req, guidance, first, *a)

    monkeypatch.setattr(pipeline, "_hires_pass", spy)
    result = generate(model, req)
    return seen[0], result


# ---------------------------------------------------------------------------------------------
# sizes and upscaling


@pytest.mark.parametrize(("first", "scale", "resize", "upscale_to", "final"), TARGETS)
def test_target_resolution_is_a1111s(
    first: tuple[int, int], scale: float, resize: tuple[int, int], upscale_to: tuple, final: tuple[int, int]
) -> None:
    t = target(*first, HiresFix(scale=scale, resize=resize), 8)
    assert t == Target(*upscale_to) and t.final_size(8) == final
    latents = torch.zeros(1, 4, t.height // 8, t.width // 8)
    assert tuple(crop_latents(latents, t).shape[-2:]) == (final[1] // 8, final[0] // 8)


def test_crop_keeps_the_middle_with_the_odd_row_off_the_end() -> None:
    """A1111: samples[:, :, truncate_y//2 : h - (truncate_y+1)//2, truncate_x//2 : w - (truncate_x+1)//2]."""
    x = torch.arange(10 * 9.0).reshape(1, 1, 10, 9)
    assert torch.equal(crop_latents(x, Target(72, 80, crop_x=3, crop_y=4)), x[..., 2:8, 1:7])


def test_latent_upscale_modes_are_a1111s_interpolations() -> None:
    assert list(LATENT_UPSCALE_MODES) == list(A1111_LATENT_MODES)
    x = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    for name, args in A1111_LATENT_MODES.items():
        expected = F.interpolate(x, size=(11, 13), mode=args["mode"], antialias=args["antialias"])
        assert torch.equal(upscale_latents(x, name, 11, 13), expected), name


def test_prompt_editing_counts_on_from_the_first_pass() -> None:
    """A1111's prompt_parser doctests with hires_steps (base 10, hires 10), and a step number."""
    assert prompt_schedule("a [b:.5] c", 10, first_pass=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, first_pass=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("[x:y:25]", 10, first_pass=20) == [(5, "x"), (10, "y")]
    assert prompt_schedule("[x:y:15]", 10, first_pass=20) == [(10, "y")]


# ---------------------------------------------------------------------------------------------
# the two passes, against sdlab's own txt2img and img2img


def test_latent_hires_is_txt2img_then_img2img_of_the_upscaled_latents(
    model: StableDiffusion, monkeypatch: pytest.MonkeyPatch
) -> None:
    hires = HiresFix(scale=2.0, steps=3, denoise=0.5, upscaler="Latent (bicubic)")
    first, result = _first_and_final(model, _req(hires=hires), monkeypatch)
    plain = generate(model, _req())
    assert torch.equal(first, plain.latents)  # the first pass is the plain txt2img, seed for seed
    # the second pass: img2img's schedule tail and noise of the same seed over the upscaled latents
    up = F.interpolate(first, size=(40, 32), mode="bicubic", antialias=False)
    sigmas = img2img_sigmas(pipeline.sampling_sigmas(model, "euler", "normal", 3), 0.5, 3)
    x = up + seed_noise([7], (4, 40, 32)) * sigmas[0]
    guidance = Guidance(*encode_prompts(model, BASE["prompt"], BASE["negative_prompt"], 3), 5.0)
    expected = sample(model, x, sigmas, guidance, "euler", [7])
    assert torch.equal(result.latents, expected)
    assert result.images[0].size == (64, 80) and result.latents.shape == (1, 4, 40, 32)


def test_pixel_hires_is_img2img_of_the_upscaled_first_image(
    model: StableDiffusion, monkeypatch: pytest.MonkeyPatch
) -> None:
    hires = HiresFix(scale=2.0, steps=3, denoise=0.6, upscaler="Lanczos", sampler="DPM++ 2M")
    first, result = _first_and_final(model, _req(hires=hires, batch_size=2), monkeypatch)
    for i, seed in enumerate((7, 8)):
        # a 2x Lanczos upscaler at multiples of 8 is one Lanczos resize (A1111's Upscaler.upscale)
        upscaled = pipeline.decode(model, first[i : i + 1])[0].resize((64, 80), Image.LANCZOS)
        same = dict(width=64, height=80, steps=3, strength=0.6, sampler="dpmpp_2m")
        img2img = generate(model, _req(seed=seed, init_image=upscaled, **same))
        scale = img2img.latents.abs().max()  # batched convolutions sum in another order
        assert (result.latents[i] - img2img.latents[0]).abs().max() <= 1e-5 * scale


def test_hires_requests_are_checked(model: StableDiffusion) -> None:
    for hires, message in [
        (HiresFix(upscaler="nope"), "hires upscaler 'nope' not found"),
        (HiresFix(scale=0.0), "hires scale"),
        (HiresFix(denoise=1.5), "hires denoising strength"),
        (HiresFix(scale=200.0), "exceeds the limit"),
        (HiresFix(resize=(-1, 0)), "hires resize"),
        (HiresFix(prompt="<lora:other:1> x"), "other <lora:> tags"),
        (HiresFix(sampler="nope"), "unknown sampler 'nope'"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate(model, _req(hires=hires, steps=1))
    with pytest.raises(ValueError, match="hires fix is for txt2img"):
        generate(model, _req(hires=HiresFix(), init_image=Image.new("RGB", (32, 40))))


# ---------------------------------------------------------------------------------------------
# infotext


def test_infotext_is_what_a1111_writes_and_parses_back(model: StableDiffusion, model_file: Path) -> None:
    head = "Steps: 4, Sampler: Euler, Schedule type: Uniform, CFG scale: 5, Seed: 7, Size: 32x40, "
    head += f"Model hash: {model_hash(model_file)}, Model: sd1"
    plain = HiresFix(scale=2.0, steps=10, denoise=0.7)
    other = HiresFix(
        resize=(64, 0),
        denoise=0.4,
        upscaler="Latent (nearest)",
        prompt="a pear, big",
        negative_prompt="dark",
        sampler="DPM++ 2M",
        scheduler="Karras",
    )
    cases = [
        (plain, "Denoising strength: 0.7, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent"),
        (
            other,
            'Denoising strength: 0.4, Hires sampler: DPM++ 2M, Hires prompt: "a pear, big", Hires negative '
            "prompt: dark, Hires schedule type: Karras, Hires resize: 64x0, Hires upscaler: Latent (nearest)",
        ),
    ]
    for hires, fields in cases:
        req = _req(hires=hires.resolved("euler", "normal", BASE["prompt"], BASE["negative_prompt"]))
        text = request_infotext(req, 7, model)
        assert text == f"a red apple\nNegative prompt: blurry\n{head}, {fields}"
        assert hires_from_infotext(parse_infotext(text)) == req.hires
    assert hires_from_infotext(parse_infotext(request_infotext(_req(), 7, model))) is None


def test_a1111s_own_infotext_gives_its_hires_fix() -> None:
    text = (
        "a castle\nNegative prompt: fog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
        "Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
        "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent, Version: v1.10.1"
    )
    assert hires_from_infotext(parse_infotext(text)) == HiresFix(
        scale=2.0, denoise=0.7, upscaler="Latent", sampler="dpmpp_2m", scheduler="karras"
    )


# ---------------------------------------------------------------------------------------------
# CLI and A1111 API end to end


def test_cli_hires_fix(model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hires.png"
    args = ["generate", "a red apple", "-m", str(model_file), "-W", "32", "-H", "40", "-s", "3", "-q"]
    args += ["--steps", "2", "--sampler", "euler"]
    hires = "--hires-scale 1.5 --hires-steps 2 --hires-denoise 0.5 --hires-sampler Euler".split()
    assert main([*args, *hires, "-o", str(out)]) == 0
    assert Image.open(out).size == (48, 60)
    expected = HiresFix(scale=1.5, steps=2, denoise=0.5, sampler="euler", scheduler="normal")
    assert hires_from_infotext(parse_infotext(read_parameters(out))) == expected
    bad = ["--hires-resize", "64x64", "--hires-upscaler", "nope", "-o", str(tmp_path / "x.png")]
    assert main([*args, *bad]) == 2
    assert "hires upscaler 'nope' not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[tuple[str, Path]]:
    """A server's URL and its models folder: the tiny model and a tiny ESRGAN."""
    root = tmp_path_factory.mktemp("hires-server")
    models = root / "models"
    models.mkdir()
    shutil.copy(model_file, models / MODEL)
    torch.manual_seed(0)
    esrgan = RRDBNet(RRDBConfig(nf=8, gc=4, nb=1, stages=1))  # a 2x ESRGAN, random weights
    (models / "ESRGAN").mkdir()
    save_file(esrgan.state_dict(), models / "ESRGAN" / "2x-tiny.safetensors")
    with serving(Settings(folders(root, models))) as base:
        httpx.post(base + "/sdapi/v1/options", json={"sd_model_checkpoint": MODEL})
        yield base, models


def test_a1111_api_hires_fix(server: tuple[str, Path], model: StableDiffusion) -> None:
    url, models = server
    body = {"prompt": "a red apple", "steps": 2, "width": 32, "height": 32, "seed": 5}
    body["sampler_name"] = "Euler"
    hires = {"enable_hr": True, "hr_second_pass_steps": 2, "denoising_strength": 0.5}
    with httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/sdapi/v1/txt2img", json=body | hires | {"hr_resize_x": 48, "hr_resize_y": 64})
        assert r.status_code == 200, r.text
        image, info = unb64(r.json()["images"][0]), json.loads(r.json()["info"])
        assert image.size == (48, 64) and info["denoising_strength"] == 0.5
        assert info["infotexts"][0].endswith(
            "Denoising strength: 0.5, Hires resize: 48x64, Hires steps: 2, Hires upscaler: Latent"
        )
        # the default upscaler and scale (A1111's: Latent, 2); the same image as the pipeline's
        r = client.post("/sdapi/v1/txt2img", json=body | hires | {"hr_upscaler": None})
        image = unb64(r.json()["images"][0])
        assert image.size == (64, 64) and "Hires upscale: 2," in image.info["parameters"]
        req = GenerationRequest("a red apple", width=32, height=32, steps=2, seed=5, sampler="euler")
        direct = generate(model, replace(req, hires=HiresFix(steps=2, denoise=0.5)))  # the same weights
        assert image.tobytes() == direct.images[0].tobytes()
        # an upscaler model: the second pass is img2img of the first image upscaled by it (A1111's way)
        r = client.post("/sdapi/v1/txt2img", json=body | hires | {"hr_upscaler": "2x-tiny"})
        assert r.status_code == 200, r.text
        image = unb64(r.json()["images"][0])
        first = unb64(client.post("/sdapi/v1/txt2img", json=body).json()["images"][0])
        upscaled = upscale_image(first, "2x-tiny", 2.0, [models / "ESRGAN"])
        same = dict(width=64, height=64, init_image=upscaled, strength=0.5)
        direct = generate(model, replace(req, **same))
        assert image.tobytes() == direct.images[0].tobytes()
        assert "Hires upscaler: 2x-tiny" in image.info["parameters"]
        modes = client.get("/sdapi/v1/latent-upscale-modes").json()
        assert modes == [{"name": name} for name in A1111_LATENT_MODES]
        for extra, field in [
            ({"hr_checkpoint_name": "other"}, "'hr_checkpoint_name'"),
            ({"hr_upscaler": "nope"}, "hires upscaler 'nope' not found"),
            ({"hr_scale": 1000}, "exceeds the limit"),
        ]:
            r = client.post("/sdapi/v1/txt2img", json=body | hires | extra)
            assert r.status_code == 422 and field in r.json()["detail"], r.text
