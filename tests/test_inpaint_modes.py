"""AUTOMATIC1111's inpainting modes: mask blur along x and y, mask_round, "only masked" crops pasted back,
the four masked contents, the overlay; their A1111 API fields and CLI flags.

Oracles: OpenCV's GaussianBlur at the kernel size A1111 gives it (2·int(2.5σ + 0.5) + 1 taps) for the
mask blur; crop regions worked out by hand from the rules of A1111 1.10's modules/masking.py
(get_crop_region_v2, expand_crop_region), one of them the example in its docstring; analytic results
for fill (a uniform surround fills a hole with its colour), the resize modes and the overlay; for the
masked contents, the VAE latents of the (filled) image, the seeds' noise and zeros.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi import HTTPException
from PIL import Image
from tiny import write_tiny

from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.images import (
    MASKED_CONTENT,
    blur_mask,
    expand_box,
    fill_masked,
    latent_mask,
    mask_box,
    read_mask,
    read_parameters,
    resize_image,
    to_tensor,
)
from sdlab.infotext import parse_infotext
from sdlab.pipeline import (
    GenerationRequest,
    _image_conditioning,
    _latents_of,
    decode,
    generate,
    prepare_init_image,
    seed_noise,
)
from sdlab.server import a1111


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("inpaint")
    return {name: write_tiny(name, tmp / f"{name}.safetensors") for name in ("sd1", "inpaint")}


@pytest.fixture(scope="module")
def models(files: dict[str, Path]) -> dict[str, StableDiffusion]:
    return {name: load_model(path) for name, path in files.items()}


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _rect_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def _req(**kw: object) -> GenerationRequest:
    base = dict(prompt="a red apple", negative_prompt="blurry", width=32, height=32, steps=3, seed=7)
    return GenerationRequest(**{**base, "cfg_scale": 5.0, "sampler": "euler", **kw})  # type: ignore[arg-type]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


# ---------------------------------------------------------------------------------------------
# the image helpers


@pytest.mark.parametrize(("blur_x", "blur_y"), [(4, 4), (1, 9), (0, 3), (16, 0), (64, 64)])
def test_mask_blur_is_a1111s_opencv_blur_bit_for_bit(blur_x: int, blur_y: int) -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(blur_x * 100 + blur_y)
    mask = np.zeros((48, 40), np.uint8)
    mask[10:30, 5:22] = 255
    mask[40:, 30:] = rng.integers(0, 256, (8, 10))
    expected = mask  # A1111: cv2.GaussianBlur(mask, (k, 1), blur_x), then (1, k) with blur_y
    for sigma, shape in ((blur_x, lambda k: (k, 1)), (blur_y, lambda k: (1, k))):
        if sigma > 0:  # 64: 321 taps, wider than the mask (mirrored again and again)
            expected = cv2.GaussianBlur(expected, shape(2 * int(2.5 * sigma + 0.5) + 1), sigma)
    assert np.array_equal(np.asarray(blur_mask(Image.fromarray(mask), blur_x, blur_y)), expected)


@pytest.mark.parametrize(
    ("size", "box", "pad", "target", "expected"),
    [
        ((512, 512), (100, 200, 228, 232), 0, (512, 512), (100, 152, 228, 280)),  # A1111's docstring
        ((64, 48), (10, 5, 20, 9), 4, (32, 32), (6, 0, 24, 18)),  # padded; grown past the top: moved down
        ((64, 48), (58, 40, 64, 48), 0, (64, 32), (48, 40, 64, 48)),  # grown past the right: moved left
        ((64, 48), (30, 0, 34, 48), 0, (32, 32), (8, 0, 56, 48)),  # a column grown to a square
        ((64, 48), (0, 20, 64, 22), 0, (16, 32), (0, 0, 64, 48)),  # wants 128 rows: the whole height
    ],
)
def test_only_masked_crop_region(
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    pad: int,
    target: tuple[int, int],
    expected: tuple[int, int, int, int],
) -> None:
    found = mask_box(_rect_mask(size, box), pad)
    assert found == (max(box[0] - pad, 0), max(box[1] - pad, 0), min(box[2] + pad, size[0]), box[3] + pad)
    assert expand_box(found, *target, *size) == expected
    assert mask_box(Image.new("L", size), pad) is None  # nothing masked: no region


def test_fill_replaces_the_masked_part_by_the_surrounding_colour() -> None:
    image = Image.new("RGB", (48, 40), (30, 160, 90))
    image.paste((250, 0, 0), (10, 8, 30, 24))
    masked = np.zeros((40, 48), bool)
    masked[8:24, 10:30] = True
    out = _pixels(fill_masked(image, _rect_mask((48, 40), (10, 8, 30, 24))))
    assert np.array_equal(out[~masked], _pixels(image)[~masked])  # kept pixels untouched
    # the red hole filled from around it, up to the 8-bit premultiplied colours of small blurred alphas
    green = np.array([30, 160, 90])
    assert np.abs(out[masked] - green).max() <= 8 < np.abs(_pixels(image)[masked] - green).min()


def test_resize_modes_crop_the_centre_and_fill_with_the_edges() -> None:
    wide = _picture(40, 20, seed=1)
    assert np.array_equal(_pixels(resize_image(wide, 20, 20, "crop")), _pixels(wide.crop((10, 0, 30, 20))))
    row = np.random.default_rng(2).integers(0, 256, (1, 32, 3), dtype=np.uint8)
    strip = Image.fromarray(np.repeat(row, 8, axis=0))  # 32x8, every row the same
    filled = _pixels(resize_image(strip, 32, 32, "fill"))  # the strip at rows 12..19, its edges around
    assert np.array_equal(filled, np.repeat(_pixels(strip)[:1], 32, axis=0))


def test_mask_round_reads_an_alpha_mask_thresholded_or_as_grey_levels() -> None:
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 100))
    rgba.paste((0, 0, 0, 200), (0, 0, 8, 16))
    assert _pixels(read_mask(rgba))[0, [0, 15]].tolist() == [255, 0]  # > 128 is 255, as A1111
    assert _pixels(read_mask(rgba, round_alpha=False))[0, [0, 15]].tolist() == [200, 100]
    assert _pixels(read_mask(rgba, invert=True))[0, [0, 15]].tolist() == [0, 255]
    soft = latent_mask(Image.new("L", (16, 16), 100), 8, 8, round_=False)
    assert torch.allclose(soft, torch.full((1, 1, 8, 8), 100 / 255))
    assert torch.equal(latent_mask(Image.new("L", (16, 16), 100), 8, 8), torch.zeros(1, 1, 8, 8))


# ---------------------------------------------------------------------------------------------
# the pipeline


def test_whole_picture_overlay_keeps_the_init_image_outside_the_mask(
    models: dict[str, StableDiffusion],
) -> None:
    init, mask = _picture(32, 32), _rect_mask((32, 32), (8, 8, 20, 24))
    out = generate(models["sd1"], _req(init_image=init, mask=mask, mask_blur=2))
    result, before = _pixels(out.images[0]), _pixels(init)
    raw = _pixels(decode(models["sd1"], out.latents)[0])
    doubled = np.minimum(2 * _pixels(blur_mask(mask, 2, 2)), 255)[..., None]  # A1111's overlay mask
    assert np.array_equal(result[doubled[..., 0] == 0], before[doubled[..., 0] == 0])
    assert np.array_equal(result[doubled[..., 0] == 255], raw[doubled[..., 0] == 255])
    mixed = (before * (255 - doubled) + raw * doubled) / 255
    # 8 bits: the premultiplied overlay colour (±0.5, ±0.5·α) and the composite (±0.5) round
    assert np.abs(result - mixed).max() <= 1.5
    assert (result != before).any()


def test_only_masked_crops_the_region_and_pastes_the_result_back(models: dict[str, StableDiffusion]) -> None:
    init, mask = _picture(64, 48), _rect_mask((64, 48), (40, 10, 52, 22))
    req = _req(init_image=init, mask=mask, mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=4)
    prepared = prepare_init_image(req)
    assert prepared is not None and prepared.mask is not None
    assert prepared.paste_to == (36, 6, 20, 20)  # the mask box +4 (36, 6, 56, 26): square already
    crop = resize_image(init.crop((36, 6, 56, 26)), 32, 32, "fill")
    assert np.array_equal(_pixels(prepared.pixels), _pixels(crop))
    assert np.array_equal(_pixels(prepared.mask), _pixels(resize_image(mask.crop((36, 6, 56, 26)), 32, 32)))
    out = generate(models["sd1"], req)
    assert out.images[0].size == (64, 48)  # the init image's size, as A1111 returns it
    result, raw = _pixels(out.images[0]), _pixels(resize_image(decode(models["sd1"], out.latents)[0], 20, 20))
    assert np.array_equal(result[10:22, 40:52], raw[4:16, 4:16])  # the repaint, in place
    outside = _pixels(mask) == 0
    assert np.array_equal(result[outside], _pixels(init)[outside])


def test_only_masked_with_a_blank_mask_is_a_plain_img2img(models: dict[str, StableDiffusion]) -> None:
    init, blank_mask = _picture(32, 32), Image.new("L", (32, 32))
    blank = generate(models["sd1"], _req(init_image=init, mask=blank_mask, inpaint_full_res=True))
    plain = generate(models["sd1"], _req(init_image=init))
    assert torch.equal(blank.latents, plain.latents)
    assert np.array_equal(_pixels(blank.images[0]), _pixels(plain.images[0]))
    assert (blank.request.inpaint_full_res, blank.request.inpainting_fill) == (False, "original")  # as A1111


@pytest.mark.parametrize("content", MASKED_CONTENT)
def test_masked_content_sets_the_initial_latents(models: dict[str, StableDiffusion], content: str) -> None:
    init, mask = _picture(32, 32), _rect_mask((32, 32), (0, 0, 16, 32))
    req = _req(init_image=init, mask=mask, mask_blur=0, inpainting_fill=MASKED_CONTENT.index(content))
    prepared = prepare_init_image(req)
    assert prepared is not None and req.inpainting_fill == content
    noise = seed_noise([7, 8], (4, 16, 16))
    latents, keep, _ = _image_conditioning(models["sd1"], req, prepared, noise)
    masked = torch.zeros(1, 1, 16, 16)
    masked[..., :8] = 1  # the left half, at the VAE's downscale of 2
    assert keep is not None and torch.equal(keep, 1 - masked)
    pixels = fill_masked(init, mask) if content == "fill" else init
    assert np.array_equal(_pixels(prepared.pixels), _pixels(pixels))
    encoded = _latents_of(models["sd1"], to_tensor(pixels), torch.Generator().manual_seed(7))
    expected = {
        "fill": encoded,
        "original": encoded,
        "latent noise": encoded * (1 - masked) + noise * masked,  # the seeds' own noise (A1111)
        "latent nothing": encoded * (1 - masked),
    }[content]
    assert torch.equal(latents, expected.expand(2, -1, -1, -1))


def test_inpainting_unet_gets_the_rounded_mask_and_blends_the_latents(
    models: dict[str, StableDiffusion],
) -> None:
    init, mask = _picture(32, 32), _rect_mask((32, 32), (4, 4, 20, 28))
    req = _req(init_image=init, mask=mask, mask_blur=3)
    prepared = prepare_init_image(req)
    assert prepared is not None and prepared.mask is not None
    _, keep, extra = _image_conditioning(models["inpaint"], req, prepared, seed_noise([7], (4, 16, 16)))
    soft = torch.from_numpy(np.asarray(prepared.mask, dtype=np.float32) / 255)[None, None]
    assert torch.equal(extra["c_concat"][:, :1], F.interpolate(soft.round(), size=(16, 16), mode="nearest"))
    assert keep is not None and torch.equal(keep, 1 - latent_mask(prepared.mask, 16, 16))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"inpainting_fill": "smear"}, "inpainting_fill must be one of fill, original"),
        ({"inpainting_fill": 4}, "inpainting_fill"),
        ({"mask_blur_x": -1}, "mask_blur_x must be between 0 and 256"),
        ({"mask_blur_y": 300}, "mask_blur_y"),
        ({"inpaint_full_res_padding": -4}, "inpaint_full_res_padding must be at least 0"),
    ],
)
def test_bad_inpainting_fields_are_named(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _req(init_image=_picture(32, 32), mask=Image.new("L", (32, 32)), **kw).validate()


# ---------------------------------------------------------------------------------------------
# the A1111 API fields and the CLI flags


def test_a1111_inpainting_fields_become_the_request_fields() -> None:
    defaults = a1111._inpainting(a1111.Img2ImgRequest())  # A1111 API's: only masked, fill, padding 0
    assert defaults == {
        "mask_blur": 4,
        "mask_blur_x": 4,
        "mask_blur_y": 4,
        "mask_round": True,
        "inpainting_fill": "fill",
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 0,
    }
    body = a1111.Img2ImgRequest(mask_blur_x=2, mask_blur_y=6, inpainting_fill=3, inpaint_full_res=False)
    assert a1111._inpainting(body)["mask_blur_y"] == 6 and a1111._inpainting(body)["inpainting_fill"] == (
        "latent nothing"
    )
    both = a1111._inpainting(body.model_copy(update={"mask_blur": 5}))
    assert (both["mask_blur_x"], both["mask_blur_y"]) == (5, 5)  # mask_blur, when given, sets both
    with pytest.raises(HTTPException) as e:
        a1111._inpainting(a1111.Img2ImgRequest(inpainting_fill=7))
    assert e.value.status_code == 422 and "inpainting_fill" in e.value.detail


def _cli_request(args: list[str], monkeypatch: pytest.MonkeyPatch) -> GenerationRequest:
    """The request `sdlab generate ARGS` hands to the pipeline (model loading and generation stubbed)."""
    import sdlab.checkpoints.load
    import sdlab.pipeline
    from sdlab.cli import main

    class Seen(Exception):
        pass

    class Model:
        name, native_size, default_steps, default_cfg = "m", 64, 1, 7.0

    def seen(model: object, request: GenerationRequest, **_: object) -> None:
        raise Seen(request)

    monkeypatch.setattr(sdlab.checkpoints.load, "load_model", lambda *a, **k: Model())
    monkeypatch.setattr(sdlab.checkpoints.load, "resolve_model", lambda m: m)
    monkeypatch.setattr(sdlab.pipeline, "generate", seen)
    with pytest.raises(Seen) as caught:
        main(["generate", "a cat", *args, "-q"])
    return caught.value.args[0]


def test_cli_inpaint_flags(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdlab.cli import main

    _picture(48, 40).save(tmp_path / "init.png")
    _rect_mask((48, 40), (30, 4, 44, 20)).save(tmp_path / "mask.png")
    args = ["-i", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]
    masked = ["--inpaint-area", "masked", "--inpaint-padding", "8", "--masked-content", "noise"]
    fields = ("inpaint_full_res", "inpaint_full_res_padding", "inpainting_fill", "mask_blur")
    with monkeypatch.context() as stubs:
        plain, flagged = (_cli_request(a, stubs) for a in (args, [*args, *masked]))
    assert [getattr(plain, f) for f in fields] == [False, 32, "original", 4]  # as before the flags
    assert [getattr(flagged, f) for f in fields] == [True, 8, "latent noise", 4]
    run = ["generate", "a cat", "-m", str(files["sd1"]), "-W", "32", "-H", "32", "--steps", "2", "-s", "3"]
    assert main([*run, *args, *masked, "-q", "-o", str(tmp_path / "masked.png")]) == 0
    params = parse_infotext(read_parameters(tmp_path / "masked.png") or "")
    assert (params["Inpaint area"], params["Masked area padding"], params["Masked content"]) == (
        "Only masked",
        "8",
        "latent noise",
    )
    with Image.open(tmp_path / "masked.png") as out:
        assert out.size == (48, 40)  # pasted back into the whole init image
