"""No silent ignoring: every field of AUTOMATIC1111's txt2img/img2img request models is honoured, harmless
or refused with HTTP 422 naming it; the start-up listings answer in A1111's shape; options are stored.

The field lists are A1111 1.10's `StableDiffusionTxt2ImgProcessingAPI` / `StableDiffusionImg2ImgProcessingAPI`
(modules/api/models.py: the StableDiffusionProcessingTxt2Img/Img2Img constructor parameters less
API_NOT_ALLOWED, plus the API's own fields), written out here so a change of sdlab's table shows.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from test_server_api import MODEL, b64png, folders, serving, unb64, write_models

from sdlab.server import a1111
from sdlab.server.state import Settings

H, X, R = a1111.HONOURED, a1111.HARMLESS, a1111.REFUSED

# A1111's fields (StableDiffusionProcessing's constructor, then the API's additions) -> sdlab's class
COMMON = {
    "prompt": H,
    "negative_prompt": H,
    "styles": R,
    "seed": H,
    "subseed": X,
    "subseed_strength": R,
    "seed_resize_from_h": R,
    "seed_resize_from_w": R,
    "sampler_name": H,
    "scheduler": H,
    "batch_size": H,
    "n_iter": H,
    "steps": H,
    "cfg_scale": H,
    "width": H,
    "height": H,
    "restore_faces": R,
    "tiling": R,
    "do_not_save_samples": X,
    "do_not_save_grid": X,
    "eta": R,
    "denoising_strength": None,  # per route
    "s_min_uncond": R,
    "s_churn": R,
    "s_tmax": X,
    "s_tmin": X,
    "s_noise": R,
    "override_settings": H,
    "override_settings_restore_afterwards": X,
    "refiner_checkpoint": H,
    "refiner_switch_at": H,
    "disable_extra_networks": R,
    "firstpass_image": R,
    "comments": X,
    # the API's own
    "sampler_index": H,
    "script_name": R,
    "script_args": X,
    "send_images": H,
    "save_images": H,
    "alwayson_scripts": R,
    "force_task_id": X,
    "infotext": R,
}
TXT2IMG = COMMON | {
    "denoising_strength": H,
    "enable_hr": H,
    "firstphase_width": R,
    "firstphase_height": R,
    "hr_scale": H,
    "hr_upscaler": H,
    "hr_second_pass_steps": H,
    "hr_resize_x": H,
    "hr_resize_y": H,
    "hr_checkpoint_name": R,
    "hr_sampler_name": H,
    "hr_scheduler": H,
    "hr_prompt": H,
    "hr_negative_prompt": H,
}
IMG2IMG = COMMON | {
    "denoising_strength": H,
    "init_images": R,
    "resize_mode": H,
    "image_cfg_scale": X,
    "mask": H,
    "mask_blur_x": H,
    "mask_blur_y": H,
    "mask_blur": H,
    "mask_round": H,
    "inpainting_fill": H,
    "inpaint_full_res": H,
    "inpaint_full_res_padding": H,
    "inpainting_mask_invert": H,
    "initial_noise_multiplier": R,
    "latent_mask": R,
    "include_init_images": X,
}

INIT = b64png(Image.new("RGB", (32, 32), (200, 30, 30)))
MASK = b64png(Image.new("L", (32, 32), 255))
BASE = {"prompt": "x", "steps": 1, "width": 32, "height": 32, "seed": 1, "sampler_name": "Euler a"}
BASES = {"txt2img": BASE, "img2img": BASE | {"init_images": [INIT]}}
# a value of each refused field that A1111 would act on (and the other fields that make it count)
REFUSED_VALUES: dict[str, dict[str, Any]] = {
    "styles": {"styles": ["cinematic"]},
    "disable_extra_networks": {"disable_extra_networks": True, "prompt": "a cat <lora:style:0.5>"},
    "subseed_strength": {"subseed_strength": 0.5},
    "seed_resize_from_h": {"seed_resize_from_h": 64, "seed_resize_from_w": 64},
    "seed_resize_from_w": {"seed_resize_from_w": 48, "seed_resize_from_h": 32},
    "restore_faces": {"restore_faces": True},
    "tiling": {"tiling": True},
    "eta": {"eta": 0.5},
    "s_min_uncond": {"s_min_uncond": 0.2},
    "s_churn": {"s_churn": 1.0, "sampler_name": "Euler"},
    "s_noise": {"s_noise": 0.9},
    "firstpass_image": {"firstpass_image": INIT},
    "script_name": {"script_name": "x/y/z plot"},
    "alwayson_scripts": {"alwayson_scripts": {"ADetailer": {"args": [{"ad_model": "face_yolov8n.pt"}]}}},
    "infotext": {"infotext": "y\nSteps: 3, Seed: 2"},
    "hr_checkpoint_name": {"enable_hr": True, "hr_checkpoint_name": "other"},
    "firstphase_width": {"firstphase_width": 16},
    "firstphase_height": {"firstphase_height": 16},
    "init_images": {"init_images": [INIT, INIT]},
    "initial_noise_multiplier": {"initial_noise_multiplier": 0.9},
    "latent_mask": {"latent_mask": MASK, "mask": MASK},
}
# a non-default value of each harmless field
HARMLESS_VALUES: dict[str, Any] = {
    "subseed": 1234,
    "do_not_save_samples": True,
    "do_not_save_grid": True,
    "s_tmax": 10.0,
    "s_tmin": 0.5,
    "override_settings_restore_afterwards": False,
    "comments": {"note": "hello"},
    "script_args": [1, 2],
    "force_task_id": "task-1",
    "image_cfg_scale": 1.5,
    "include_init_images": True,
}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fields")
    with serving(Settings(folders(root, write_models(root)))) as base:
        httpx.post(base + "/sdapi/v1/options", json={"sd_model_checkpoint": MODEL})
        yield base
    torch.set_num_threads(threads)


@pytest.fixture
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c
        c.post("/sdapi/v1/interrupt")


@pytest.mark.parametrize(
    ("route", "expected", "fields", "model"),
    [
        ("txt2img", TXT2IMG, a1111.TXT2IMG_FIELDS, a1111.Txt2ImgRequest),
        ("img2img", IMG2IMG, a1111.IMG2IMG_FIELDS, a1111.Img2ImgRequest),
    ],
)
def test_every_a1111_field_is_classified(
    route: str, expected: dict[str, str], fields: dict[str, a1111.FieldSupport], model: type
) -> None:
    assert set(fields) == set(expected), route  # the table covers A1111's model, nothing else
    assert set(model.model_fields) == set(expected), route  # and so does the request model
    assert {name: support.kind for name, support in fields.items()} == expected
    assert all((s.accepts is not None) == (s.kind == R) for s in fields.values())
    refused = {name for name, kind in expected.items() if kind == R}
    assert refused <= set(REFUSED_VALUES) and {n for n, k in expected.items() if k == X} <= set(
        HARMLESS_VALUES
    )


def test_a1111_defaults() -> None:
    """The defaults are A1111's: a body of defaults is accepted and means what it means there."""
    txt, img = a1111.Txt2ImgRequest(), a1111.Img2ImgRequest()
    assert (txt.steps, txt.cfg_scale, txt.sampler_index, txt.seed_resize_from_h, txt.enable_hr) == (
        50,
        7.0,
        "Euler",
        -1,
        False,
    )
    assert (img.denoising_strength, img.inpaint_full_res, img.inpainting_fill, img.mask_round) == (
        0.75,
        True,
        0,
        True,
    )
    a1111.check_fields(txt, a1111.TXT2IMG_FIELDS)
    a1111.check_fields(img, a1111.IMG2IMG_FIELDS)


@pytest.mark.parametrize(
    ("route", "name"),
    [(r, n) for r, table in (("txt2img", TXT2IMG), ("img2img", IMG2IMG)) for n, k in table.items() if k == R],
)
def test_refused_field_gets_422_naming_it(client: httpx.Client, route: str, name: str) -> None:
    r = client.post(f"/sdapi/v1/{route}", json=BASES[route] | REFUSED_VALUES[name])
    assert r.status_code == 422, r.text
    assert f"'{name}'" in r.json()["detail"] and "does not support" in r.json()["detail"]


@pytest.mark.parametrize(
    ("route", "name"),
    [(r, n) for r, table in (("txt2img", TXT2IMG), ("img2img", IMG2IMG)) for n, k in table.items() if k == X],
)
def test_harmless_field_is_accepted(client: httpx.Client, route: str, name: str) -> None:
    r = client.post(f"/sdapi/v1/{route}", json=BASES[route] | {name: HARMLESS_VALUES[name]})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1


def test_refused_fields_at_values_sdlab_makes_are_accepted(client: httpx.Client) -> None:
    """What webuiapi and A1111's UI send by default, and the values that give A1111's image."""
    same = {"styles": [], "subseed_strength": 0, "restore_faces": False, "tiling": False, "eta": 1.0}
    same |= {"s_churn": 0, "s_noise": 1, "s_min_uncond": 0, "seed_resize_from_h": 0, "seed_resize_from_w": 0}
    same |= {"script_name": "", "alwayson_scripts": {}, "enable_hr": False, "firstphase_width": 0}
    same |= {"hr_checkpoint_name": "other"}  # read only with enable_hr
    assert client.post("/sdapi/v1/txt2img", json=BASE | same).status_code == 200
    # eta is read only by samplers that take one: DDIM runs at 0, Euler has none
    assert client.post("/sdapi/v1/txt2img", json=BASE | {"sampler_name": "DDIM", "eta": 0}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json=BASE | {"sampler_name": "DDIM", "eta": 1}).status_code == 422
    assert (
        client.post("/sdapi/v1/txt2img", json=BASE | {"sampler_name": "Euler", "eta": 0.3}).status_code == 200
    )
    sized = {"seed_resize_from_h": 32, "seed_resize_from_w": 32}  # the image's own size: the same noise
    assert client.post("/sdapi/v1/txt2img", json=BASE | sized).status_code == 200
    inpaint = BASES["img2img"] | {"mask": MASK, "inpainting_fill": 1, "inpaint_full_res": False}
    inpaint |= {"mask_blur_x": 3, "mask_blur_y": 3, "initial_noise_multiplier": 1.0}
    assert client.post("/sdapi/v1/img2img", json=inpaint).status_code == 200
    # without a mask the inpainting fields are not read
    unmasked = BASES["img2img"] | {"inpainting_fill": 0, "inpaint_full_res": True, "mask_round": False}
    assert client.post("/sdapi/v1/img2img", json=unmasked).status_code == 200


def test_override_settings_keys(client: httpx.Client) -> None:
    ok = {"override_settings": {"sd_vae": "tiny-vae", "samples_save": False, "CLIP_stop_at_last_layers": 2}}
    r = client.post("/sdapi/v1/txt2img", json=BASE | ok)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["sd_vae_name"] == "tiny-vae"
    bad = client.post("/sdapi/v1/txt2img", json=BASE | {"override_settings": {"emphasis": "No norm"}})
    assert bad.status_code == 422 and "'emphasis'" in bad.json()["detail"]


def test_options_store_unknown_keys_and_use_sd_vae_and_ensd(client: httpx.Client) -> None:
    r = client.post("/sdapi/v1/options", json={"sd_vae": "tiny-vae.safetensors", "show_progressbar": False})
    assert r.status_code == 200, r.text
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_vae"] == "tiny-vae.safetensors" and options["show_progressbar"] is False
    info = json.loads(client.post("/sdapi/v1/txt2img", json=BASE).json()["info"])
    assert info["sd_vae_name"] == "tiny-vae.safetensors"  # the generation used the option's VAE
    assert client.post("/sdapi/v1/options", json={"sd_vae": "nope"}).status_code == 404
    assert client.post("/sdapi/v1/options", json={"outdir_txt2img_samples": "/tmp"}).status_code == 422
    assert client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 31337}).status_code == 200
    try:
        refused = client.post("/sdapi/v1/txt2img", json=BASE)  # Euler a draws noise from the seed
        assert refused.status_code == 422 and "eta_noise_seed_delta" in refused.json()["detail"]
        assert client.post("/sdapi/v1/txt2img", json=BASE | {"sampler_name": "Euler"}).status_code == 200
    finally:
        client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 0, "sd_vae": "Automatic"})
    assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"


def test_startup_routes_answer_in_a1111_shape(client: httpx.Client) -> None:
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and "ckpt_dir" in flags
    upscalers = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]  # no model files in this server
    assert set(upscalers[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert client.get("/sdapi/v1/latent-upscale-modes").json()[0] == {"name": "Latent"}
    for name in ("hypernetworks", "face-restorers", "realesrgan-models"):
        assert client.get(f"/sdapi/v1/{name}").json() == [], name
    assert client.get("/sdapi/v1/prompt-styles").json() == []
    assert client.get("/sdapi/v1/script-info").json() == []
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    memory = client.get("/sdapi/v1/memory").json()
    ram = memory["ram"]
    assert ram["total"] > ram["used"] > 0 and ram["free"] == ram["total"] - ram["used"]
    assert memory["cuda"] == {"error": "unavailable"}
    for name in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings"):
        r = client.post(f"/sdapi/v1/{name}")
        assert r.status_code == 200 and r.json() is None, name


def test_interrupted_job_returns_finished_and_interrupted_batches(client: httpx.Client) -> None:
    """Interrupted in its second batch, a job returns the first batch's images and the second batch as
    far as it got (A1111), each with its infotext, and makes no third batch."""
    responses: list[httpx.Response] = []
    body = BASE | {"steps": 60, "n_iter": 3, "batch_size": 2, "sampler_name": "Euler"}
    worker = threading.Thread(target=lambda: responses.append(client.post("/sdapi/v1/txt2img", json=body)))
    worker.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        state = client.get("/sdapi/v1/progress").json()["state"]
        if state["job_no"] == 1 and state["sampling_step"] > 0:
            break
        time.sleep(0.02)
    client.post("/sdapi/v1/interrupt")
    worker.join(60)
    out = responses[0].json()
    info = json.loads(out["info"])
    assert len(out["images"]) == 4 and len(info["infotexts"]) == 4
    assert [unb64(i).info["parameters"] for i in out["images"]] == info["infotexts"]


def test_webuiapi_client_with_default_arguments(url: str, tmp_path: Path) -> None:
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", steps=2)  # calls /scripts at start-up
    result = api.txt2img(prompt="a red apple", width=32, height=32, seed=4)
    assert result.image.size == (32, 32) and result.info["all_seeds"] == [4]
    init = Image.new("RGB", (32, 32), (10, 200, 10))
    result = api.img2img(images=[init], prompt="a pear", width=32, height=32, seed=5)
    assert result.image.size == (32, 32)
    assert [m["model_name"] for m in api.get_sd_models()] and api.get_upscalers()[0]["name"] == "None"
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1
    # its inpainting defaults are A1111's API's: only masked, "fill" masked content, padding 0
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (4, 4, 12, 20))
    result = api.img2img(images=[init], mask_image=mask, width=32, height=32, seed=6)
    assert result.image.size == (32, 32) and "Inpaint area: Only masked" in result.info["infotexts"][0]
    assert "Masked content: fill" in result.info["infotexts"][0]


def test_prompt_lora_tags_are_applied_and_recorded(client: httpx.Client) -> None:
    """`<lora:NAME:W>` is looked up in the models folder's Lora/, merged for the job, hashed in the
    infotext; an unknown name is a 422 naming it (no server paths in the message)."""
    import numpy as np

    def image(prompt: str) -> tuple[np.ndarray, str]:
        r = client.post("/sdapi/v1/txt2img", json=BASE | {"prompt": prompt})
        assert r.status_code == 200, r.text
        picture = unb64(r.json()["images"][0])
        return np.asarray(picture, dtype=np.float64), picture.info["parameters"]

    plain, _ = image("a cat")
    tagged, info = image("<lora:style:0.8> a cat")
    again, _ = image("a cat")
    assert np.abs(tagged - plain).mean() > 0.5 and np.array_equal(again, plain)  # merged, then restored
    assert "<lora:style:0.8> a cat" in info and 'Lora hashes: "style: ' in info
    r = client.post("/sdapi/v1/txt2img", json=BASE | {"prompt": "a cat <lora:nope:1>"})
    assert r.status_code == 422 and "<lora:nope>" in r.json()["detail"] and "/tmp" not in r.json()["detail"]
