"""The web UI at `/` end to end in headless Chromium, against a live server with the tiny model.

txt2img (gallery parameters, live progress preview, interrupt), img2img with a mask painted on the
canvas, and the VAE page. The browser may only reach 127.0.0.1: any other request is aborted and fails
the test, as does any console error (a blocked script or style shows up there). Screenshots are kept in
pytest's tmp dir and copied to $SDLAB_ARTEFACTS when it is set.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from reference import randomize
from test_controlnet import _controlnet
from test_ip_adapter import TINY_VISION, _adapter_file
from test_server_api import MODEL, b64png, folders, serving, unb64, write_models

from sdlab.checkpoints.io import write_safetensors
from sdlab.checkpoints.load import load_model
from sdlab.control import ControlSpec
from sdlab.images import to_tensor
from sdlab.ip_adapter import IPAdapterSpec
from sdlab.models.clip_vision import CLIPVisionModel
from sdlab.pipeline import GenerationRequest, generate
from sdlab.preprocess import preprocess
from sdlab.server.controlnet_api import MODULES, control_map
from sdlab.server.state import Settings
from sdlab.vae_tools import roundtrip

try:
    from playwright.sync_api import expect
except ImportError:
    expect = None

PROMPT = "a red apple on a wooden table"
Shoot = Callable[[Any, str], Path]


class Traffic:
    """What the page asked for: requests it tried to send elsewhere, its POST bodies, console errors."""

    def __init__(self) -> None:
        self.offsite: list[str] = []
        self.posts: list[tuple[str, Any]] = []
        self.errors: list[str] = []

    def route(self, route: Any, request: Any) -> None:
        if urlsplit(request.url).hostname != "127.0.0.1":
            self.offsite.append(request.url)
            route.abort()
            return
        if request.method == "POST":
            self.posts.append((urlsplit(request.url).path, request.post_data_json))
        route.continue_()

    def console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def last_post(self, path: str) -> dict[str, Any]:
        return [body for p, body in self.posts if p == path][-1]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = write_models(tmp_path_factory.mktemp("webui-server"))
    (models / "ControlNet").mkdir()
    sd = {f"control_model.{k}": v for k, v in _controlnet("sd1").state_dict().items()}
    write_safetensors(sd, models / "ControlNet" / "cn-tiny.safetensors")
    return models


@pytest.fixture(scope="module")
def url(models: Path) -> Iterator[str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared
    with serving(Settings(folders(models.parent, models))) as base:
        yield base
    torch.set_num_threads(threads)


@pytest.fixture
def page(browser: Any, url: str) -> Iterator[tuple[Any, Traffic]]:
    """A fresh page on the UI; after the test, no request left loopback and the console shows no error."""
    traffic = Traffic()
    page = browser.new_page()
    page.route("**/*", traffic.route)
    page.on("console", traffic.console)
    page.on("pageerror", lambda error: traffic.errors.append(str(error)))
    page.set_default_timeout(30_000)
    page.goto(url)
    expect(page.locator("#model option")).not_to_have_count(0)  # the lists are loaded
    yield page, traffic
    page.close()
    assert traffic.offsite == [], "the page tried to reach beyond 127.0.0.1"
    assert traffic.errors == []


@pytest.fixture(scope="module")
def shoot(tmp_path_factory: pytest.TempPathFactory) -> Shoot:
    """`shoot(page, name)`: a screenshot in the tmp dir, copied to $SDLAB_ARTEFACTS when set."""
    folder = tmp_path_factory.mktemp("webui-screenshots")

    def take(page: Any, name: str) -> Path:
        path = folder / f"webui-{name}.png"
        page.screenshot(path=path)
        if os.environ.get("SDLAB_ARTEFACTS"):
            Path(os.environ["SDLAB_ARTEFACTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, os.environ["SDLAB_ARTEFACTS"])
        return path

    return take


def picture(path: Path, size: tuple[int, int]) -> Path:
    """A colourful test picture: a red-green gradient with a blue square."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    rgb = np.stack([x, y, np.full_like(x, 60)], axis=-1).astype(np.uint8)
    rgb[h // 4 : h // 2, w // 4 : w // 2] = (30, 60, 220)
    Image.fromarray(rgb).save(path)
    return path


def decode(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def settings(page: Any, size: int = 64, steps: int = 3, seed: int = 1234) -> None:
    page.select_option("#model", label=Path(MODEL).stem)
    for field, value in (("#width", size), ("#height", size), ("#steps", steps), ("#seed", seed)):
        page.fill(field, str(value))


# ---------------------------------------------------------------------------------------------
# the routes behind the page (no browser)


def test_vae_roundtrip_route_answers_what_vae_tools_computes(url: str, models: Path, tmp_path: Path) -> None:
    image = Image.open(picture(tmp_path / "vae.png", (65, 49)))
    expected = roundtrip(load_model(models / MODEL), image)
    with httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/sdlab/v1/vae/roundtrip", json={"image": b64png(image), "model": MODEL})
        assert answer.status_code == 200, answer.text
        r = answer.json()
        assert client.post("/sdlab/v1/vae/roundtrip", json={"image": "not base64!"}).status_code == 422
        tiny = b64png(Image.new("RGB", (1, 1)))
        assert client.post("/sdlab/v1/vae/roundtrip", json={"image": tiny}).status_code == 422
        unknown = client.post("/sdlab/v1/vae/roundtrip", json={"image": tiny, "model": "../tiny.safetensors"})
        assert unknown.status_code == 404
        page = client.get("/")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert (r["latent_shape"], r["size"], r["compression_ratio"]) == ([4, 24, 32], [64, 48], 3.0)
    assert r["psnr_db"] == pytest.approx(expected.psnr_db) and "cropped 65x49 to 64x48" in r["note"]
    assert np.array_equal(np.asarray(unb64(r["reconstruction"])), np.asarray(expected.reconstruction))
    channels = [np.asarray(unb64(c)) for c in r["channels"]]
    assert [(c.shape, c.min(), c.max()) for c in channels] == [((24, 32), 0, 255)] * 4  # each normalised
    assert all(low < high for low, high in r["channel_ranges"])


# ---------------------------------------------------------------------------------------------
# the page in Chromium


def test_layout_fits_and_every_control_is_labelled(page: tuple[Any, Traffic], shoot: Shoot) -> None:
    page, _ = page
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    unlabelled = page.evaluate(
        """[...document.querySelectorAll('input, select, textarea, canvas')]
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
            .map(e => e.id)"""
    )
    assert unlabelled == []
    assert page.get_by_role("tab", name="Generate").get_attribute("aria-selected") == "true"
    shoot(page, "start")


def test_txt2img_shows_the_image_with_its_parameters(page: tuple[Any, Traffic], shoot: Shoot) -> None:
    page, traffic = page
    settings(page)
    page.fill("#prompt", PROMPT)
    page.get_by_role("button", name="Generate").click()
    card = page.locator("#gallery .card")
    expect(card).to_have_count(1)
    expect(card.locator("pre")).to_contain_text(PROMPT)
    expect(card.locator("pre")).to_contain_text("Seed: 1234")
    expect(card.locator("pre")).to_contain_text("Steps: 3")
    assert card.locator("img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    expect(page.locator("#progress-text")).to_contain_text("1 image in")
    card.get_by_role("button", name="Reuse seed").click()
    expect(page.locator("#seed")).to_have_value("1234")
    card.get_by_role("button", name="To img2img").click()
    expect(page.locator("#init-box")).to_be_visible()
    body = traffic.last_post("/sdapi/v1/txt2img")
    assert body["override_settings"]["sd_model_checkpoint"].startswith(MODEL)
    assert (body["width"], body["steps"], body["sampler_name"]) == (64, 3, "Euler a")
    shoot(page, "txt2img")  # with the image sent to img2img


def test_progress_shows_a_live_preview_and_interrupt_stops(page: tuple[Any, Traffic], shoot: Shoot) -> None:
    page, _ = page
    settings(page, steps=100)
    page.fill("#prompt", "a slow one")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#preview")).to_be_visible()
    assert page.locator("#preview").get_attribute("src").startswith("data:image/png;base64,")
    assert float(page.locator("#progress").evaluate("p => p.value")) > 0
    expect(page.locator("#progress-text")).to_contain_text("Step ")
    shoot(page, "progress")
    page.get_by_role("button", name="Interrupt").click()
    expect(page.locator("#progress-text")).to_contain_text("Interrupted: 1 image as far as it got")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.locator("#gallery .card")).to_have_count(1)  # A1111 keeps the image as far as it got
    expect(page.locator("#gallery .card pre")).to_contain_text("Steps: 100")


def test_img2img_with_a_painted_mask(page: tuple[Any, Traffic], shoot: Shoot, tmp_path: Path) -> None:
    page, traffic = page
    settings(page, size=256, seed=77)  # the init image's size replaces these
    page.set_input_files("#init-file", picture(tmp_path / "init.png", (64, 64)))
    expect(page.locator("#init-box")).to_be_visible()
    expect(page.locator("#width")).to_have_value("64")
    canvas = page.get_by_label("Inpainting mask: paint over the parts to repaint")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    shoot(page, "img2img-mask")
    page.fill("#prompt", "an apple, repainted")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#gallery .card")).to_have_count(1)
    params = page.locator("#gallery .card pre")
    expect(params).to_contain_text("Denoising strength: 0.75")
    expect(params).to_contain_text("Mask blur")  # A1111 writes it only for inpainting
    expect(params).to_contain_text("Seed: 77")
    body = traffic.last_post("/sdapi/v1/img2img")
    assert decode(body["init_images"][0]).size == (64, 64)
    mask = np.asarray(decode(body["mask"]).convert("L"))
    assert mask.shape == (64, 64) and mask[32, 32] == 255 and mask[2, 2] == 0  # the stroke, not elsewhere
    # A1111's web UI inpainting defaults, sent in full (its API's defaults are only masked and fill)
    inpainting = ("inpaint_full_res", "inpainting_fill", "mask_blur", "inpaint_full_res_padding")
    assert [body[k] for k in inpainting] == [False, 1, 4, 32]
    assert (body["width"], body["height"]) == (64, 64)
    shoot(page, "img2img")


def test_txt2img_with_the_hires_fix(page: tuple[Any, Traffic], shoot: Shoot) -> None:
    page, traffic = page
    settings(page, size=32, steps=2)
    page.fill("#prompt", PROMPT)
    page.get_by_text("Hires fix").click()
    page.get_by_label("Upscale, then redraw").check()
    expect(page.locator("#hr-upscaler option")).to_contain_text(["Latent", "Latent (antialiased)"])
    page.select_option("#hr-upscaler", "Latent (nearest)")
    page.fill("#hr-steps", "2")
    shoot(page, "hires")
    page.get_by_role("button", name="Generate").click()
    card = page.locator("#gallery .card")
    expect(card).to_have_count(1)
    hires = "Denoising strength: 0.7, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (nearest)"
    expect(card.locator("pre")).to_contain_text(hires)
    assert card.locator("img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    body = traffic.last_post("/sdapi/v1/txt2img")
    assert (body["enable_hr"], body["hr_scale"], body["hr_second_pass_steps"]) == (True, 2, 2)


def test_txt2img_with_a_controlnet_unit(
    page: tuple[Any, Traffic], shoot: Shoot, models: Path, tmp_path: Path
) -> None:
    """The ControlNet section sends one unit in sd-webui-controlnet's format; the image is the pipeline's
    with the equivalent ControlSpec (canny at the image's own size, A1111's guidance range)."""
    page, traffic = page
    settings(page, size=32, steps=4)
    page.fill("#prompt", PROMPT)
    page.select_option("#sampler", "Euler")
    page.get_by_text("ControlNet", exact=True).click()
    control = Image.open(picture(tmp_path / "control.png", (64, 64)))  # the resolution slider's minimum
    page.set_input_files("#cn-file", tmp_path / "control.png")
    expect(page.get_by_label("Enable ControlNet")).to_be_checked()
    expect(page.locator("#cn-model option")).to_have_text([re.compile(r"cn-tiny \[[0-9a-f]{8}\]")])
    page.select_option("#cn-module", "canny")
    for field, value in (("#cn-weight", "0.6"), ("#cn-start", "0.2"), ("#cn-end", "0.9")):
        page.fill(field, value)
    page.select_option("#cn-mode", "My prompt is more important")
    page.select_option("#cn-resize", "Just Resize")
    page.get_by_role("button", name="Preview preprocessor").click()
    expect(page.locator("#cn-detected")).to_be_visible()
    detected = np.asarray(decode(page.locator("#cn-detected").get_attribute("src")).convert("RGB"))
    assert np.array_equal(detected, np.asarray(preprocess("canny", control, None, 100, 200)))
    shoot(page, "controlnet")
    page.get_by_role("button", name="Generate").click()
    card = page.locator("#gallery .card")
    expect(card).to_have_count(1)
    expect(card.locator("pre")).to_contain_text('ControlNet 0: "Module: canny, Model: cn-tiny [')
    unit = traffic.last_post("/sdapi/v1/txt2img")["alwayson_scripts"]["controlnet"]["args"][0]
    assert decode(unit.pop("image")).size == (64, 64)
    assert unit == {
        "enabled": True,
        "model": page.locator("#cn-model").input_value(),
        "module": "canny",
        "weight": 0.6,
        "guidance_start": 0.2,
        "guidance_end": 0.9,
        "control_mode": "My prompt is more important",
        "resize_mode": "Just Resize",
        "processor_res": 64,
    }
    # the A1111 API makes the extension's map (canny at processor_res, fitted by its detectmap_proc)
    fitted = control_map(MODULES["canny"], control, 64, 100, 200, "resize", (32, 32), "unit")
    spec = ControlSpec(
        str(models / "ControlNet" / "cn-tiny.safetensors"),
        fitted,
        weight=0.6,
        guidance_start=0.2,
        guidance_end=0.9,
        control_mode="prompt",
    )
    req = GenerationRequest(PROMPT, "", 32, 32, steps=4, sampler="euler", seed=1234, controls=(spec,))
    expected = generate(load_model(models / MODEL), req).images[0]
    ours = decode(card.locator("img").get_attribute("src"))
    assert torch.equal(to_tensor(ours.convert("RGB")), to_tensor(expected))


def test_txt2img_with_an_ip_adapter(
    page: tuple[Any, Traffic], shoot: Shoot, models: Path, tmp_path: Path
) -> None:
    """The IP-Adapter section sends one sd-webui-controlnet IP-Adapter unit (model, encoder module, image,
    weight); the image is the pipeline's with the equivalent IPAdapterSpec (the A1111 conventions)."""
    page, traffic = page
    model = load_model(models / MODEL)
    adapter = _adapter_file(models / "ControlNet", model.unet, plus=False)
    encoder = models / "clip_vision" / "clip_h.pth"
    encoder.parent.mkdir(exist_ok=True)
    torch.save(randomize(CLIPVisionModel(TINY_VISION), 21).state_dict(), encoder)
    try:
        page.reload()  # the lists with the adapter
        settings(page, size=32, steps=4)
        page.fill("#prompt", PROMPT)
        page.select_option("#sampler", "Euler")
        page.get_by_text("IP-Adapter", exact=True).click()
        page.set_input_files("#ip-file", picture(tmp_path / "prompt.png", (28, 28)))  # the encoder's size
        expect(page.get_by_label("Enable IP-Adapter")).to_be_checked()
        title = page.locator("#ip-model option", has_text="ip-adapter [").get_attribute("value")
        page.select_option("#ip-model", title)
        page.select_option("#ip-module", "ip-adapter_clip_sd15")
        page.fill("#ip-weight", "0.6")
        shoot(page, "ip-adapter")
        page.get_by_role("button", name="Generate").click()
        card = page.locator("#gallery .card")
        expect(card).to_have_count(1)
        [unit] = traffic.last_post("/sdapi/v1/txt2img")["alwayson_scripts"]["controlnet"]["args"]
        assert decode(unit.pop("image")).size == (28, 28)
        assert unit == {"enabled": True, "model": title, "module": "ip-adapter_clip_sd15", "weight": 0.6}
        image = Image.open(tmp_path / "prompt.png")
        spec = IPAdapterSpec(str(adapter), image, 0.6, str(encoder), convention="a1111")
        req = GenerationRequest(PROMPT, "", 32, 32, steps=4, sampler="euler", seed=1234, ip_adapters=(spec,))
        ours = decode(card.locator("img").get_attribute("src"))
        assert torch.equal(to_tensor(ours.convert("RGB")), to_tensor(generate(model, req).images[0]))
    finally:
        adapter.unlink()
        encoder.unlink()


def test_vae_page_shows_reconstruction_channels_and_psnr(
    page: tuple[Any, Traffic], shoot: Shoot, tmp_path: Path
) -> None:
    page, _ = page
    page.select_option("#model", label=Path(MODEL).stem)  # not the shipped model, listed first
    page.get_by_role("tab", name="VAE").click()
    expect(page.locator("#page-vae")).to_be_visible()
    expect(page.locator("#page-generate")).to_be_hidden()
    page.set_input_files("#vae-file", picture(tmp_path / "vae.png", (65, 49)))
    expect(page.locator("#vae-results")).to_be_visible()
    expect(page.locator("#vae-note")).to_contain_text("cropped 65x49 to 64x48")  # the tiny VAE: even sides
    stats = page.locator("#vae-stats .stat")
    expect(stats.filter(has_text="Latent")).to_contain_text("4×24×32 = 3,072 numbers")
    expect(stats.filter(has_text="Compression")).to_contain_text("3.0× fewer")
    expect(stats.filter(has_text="PSNR")).to_have_text(re.compile(r"PSNR\s*\d+\.\d\d dB"))
    images = page.locator("#vae-results img")
    expect(images).to_have_count(6)  # original, reconstruction, 4 channels
    sizes = images.evaluate_all("imgs => imgs.map(i => i.complete && [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[65, 49], [64, 48]] + [[32, 24]] * 4
    expect(page.locator("#vae-channels figcaption")).to_have_count(4)
    assert page.locator("#vae-difference").evaluate("c => [c.width, c.height]") == [64, 48]
    shoot(page, "vae")
