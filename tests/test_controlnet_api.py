"""ControlNet through the A1111 API in sd-webui-controlnet's format: a unit draws what the pipeline draws
with the equivalent ControlSpec, the infotext entry is the extension's, the `/controlnet/*` routes answer
in its shapes, and what sdlab cannot honour is refused naming the field."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_controlnet import _controlnet
from test_server_api import MODEL, b64png, folders, serving, unb64, write_models

from sdlab.checkpoints.io import write_safetensors
from sdlab.checkpoints.load import load_model
from sdlab.control import ControlSpec
from sdlab.images import to_tensor
from sdlab.infotext import parse_infotext
from sdlab.pipeline import GenerationRequest, generate
from sdlab.preprocess import preprocess
from sdlab.server.state import Settings

CN = "cn-tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cnapi")
    models = write_models(root)
    (models / "ControlNet").mkdir()
    sd = {f"control_model.{k}": v for k, v in _controlnet("sd1").state_dict().items()}
    write_safetensors(sd, models / "ControlNet" / f"{CN}.safetensors")
    with serving(Settings(folders(root, models))) as base:
        httpx.post(base + "/sdapi/v1/options", json={"sd_model_checkpoint": MODEL})
        yield base, models
    torch.set_num_threads(threads)


@pytest.fixture
def client(served: tuple[str, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=120) as c:
        yield c


def _title(models: Path) -> str:
    """The extension's title: stem [A1111's old hash: SHA-256 of 64 KiB at 1 MiB, 8 digits]."""
    data = (models / "ControlNet" / f"{CN}.safetensors").read_bytes()[0x100000:0x110000]
    return f"{CN} [{hashlib.sha256(data).hexdigest()[:8]}]"


def _control_image(size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


BODY = {"prompt": "a red apple", "negative_prompt": "blurry", "width": 32, "height": 32, "steps": 4}
BODY |= {"sampler_name": "Euler", "seed": 3, "cfg_scale": 7}


def _expected(models: Path, **kw: Any) -> Image.Image:
    spec = ControlSpec(str(models / "ControlNet" / f"{CN}.safetensors"), _control_image(), **kw)
    req = GenerationRequest(
        "a red apple", "blurry", 32, 32, steps=4, sampler="euler", seed=3, cfg_scale=7.0, controls=(spec,)
    )
    return generate(load_model(models / MODEL), req).images[0]


def _unit(**kw: Any) -> dict[str, Any]:
    return {"enabled": True, "module": "none", "model": CN, "image": b64png(_control_image())} | kw


def _txt2img(client: httpx.Client, *units: dict[str, Any], **body: Any) -> httpx.Response:
    scripts = {"controlnet": {"args": list(units)}}
    return client.post("/sdapi/v1/txt2img", json=BODY | {"alwayson_scripts": scripts} | body)


def test_unit_draws_what_the_pipeline_draws(client: httpx.Client, served: tuple[str, Path]) -> None:
    models = served[1]
    unit = _unit(
        weight=0.6, control_mode=1, guidance_end=0.5, resize_mode="Crop and Resize", model=CN.upper()
    )
    r = _txt2img(client, unit)
    assert r.status_code == 200, r.text
    image = unb64(r.json()["images"][0])
    expected = _expected(models, weight=0.6, control_mode="prompt", guidance_end=0.5, resize_mode="crop")
    assert torch.equal(to_tensor(image), to_tensor(expected))
    plain = client.post("/sdapi/v1/txt2img", json=BODY).json()["images"][0]
    assert not torch.equal(to_tensor(unb64(plain)), to_tensor(image))  # the unit changes the image
    info = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
    assert info["ControlNet 0"] == (
        f"Module: none, Model: {_title(models)}, Weight: 0.6, Resize Mode: Crop and Resize, "
        "Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 0.5, "
        "Pixel Perfect: False, Control Mode: My prompt is more important"
    )
    # a disabled unit is skipped; the remaining one keeps its index in the infotext
    r = _txt2img(client, _unit(enabled=False), unit)
    assert torch.equal(to_tensor(unb64(r.json()["images"][0])), to_tensor(image))
    assert "ControlNet 1" in parse_infotext(json.loads(r.json()["info"])["infotexts"][0])


def test_webuiapi_controlnet_unit(served: tuple[str, Path]) -> None:
    webuiapi = pytest.importorskip("webuiapi")
    url, models = served
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", steps=4)
    unit = webuiapi.ControlNetUnit(image=_control_image(), model=_title(models), weight=0.8, control_mode=2)
    result = api.txt2img(**(BODY | {"sampler_name": "Euler"}), controlnet_units=[unit])
    # webuiapi's defaults: "Resize and Fill", thresholds 64 (out of range for `none`: its defaults)
    expected = _expected(models, weight=0.8, control_mode="control", resize_mode="fill")
    assert torch.equal(to_tensor(result.image), to_tensor(expected))


def test_controlnet_routes(client: httpx.Client, served: tuple[str, Path]) -> None:
    assert client.get("/controlnet/version").json() == {"version": 3}
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
    assert client.get("/controlnet/model_list").json() == {"model_list": [_title(served[1])]}
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"][:2] == ["none", "canny"] and "openpose" not in modules["module_list"]
    assert modules["module_detail"]["canny"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1},
    ]
    aliases = client.get("/controlnet/module_list", params={"alias_names": True}).json()["module_list"]
    assert "invert (from white bg & black line)" in aliases

    photo = _control_image(64)
    body = {"controlnet_module": "canny", "controlnet_input_images": [b64png(photo)]}
    r = client.post(
        "/controlnet/detect", json=body | {"controlnet_processor_res": 64, "controlnet_threshold_a": 50}
    )
    assert r.status_code == 200, r.text
    detected = unb64(r.json()["images"][0])
    assert np.array_equal(
        np.asarray(detected.convert("RGB")), np.asarray(preprocess("canny", photo, None, 50, 200))
    )
    r = client.post("/controlnet/detect", json=body)  # processor_res 512: the image would be scaled first
    assert r.status_code == 422 and "processor_res" in r.text
    r = client.post("/controlnet/detect", json=body | {"controlnet_module": "openpose"})
    assert r.status_code == 422 and "OpenPose" in r.text


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"alwayson_scripts": {"ADetailer": {"args": []}}}, "alwayson_scripts"),
        ({"unit": {"module": "openpose"}}, "OpenPose model weights"),
        ({"unit": {"model": "missing"}}, "controlnet model 'missing' not found"),
        ({"unit": {"model": "None"}}, "controlnet model 'None'"),
        ({"unit": {"weight": 3}}, "weight must be in [0, 2]"),
        ({"unit": {"guidance_start": 0.9, "guidance_end": 0.1}}, "guidance_start"),
        ({"unit": {"control_mode": "Loud"}}, "control_mode"),
        ({"unit": {"resize_mode": "Stretch"}}, "resize_mode"),
        ({"unit": {"module": "canny"}}, "args[0].processor_res = 512"),
        ({"unit": {"module": "canny", "pixel_perfect": True, "image": b64png(_control_image(64))}}, "= 32"),
        ({"unit": {"effective_region_mask": b64png(_control_image())}}, "args[0].effective_region_mask"),
        ({"unit": {"hr_option": "Low res only"}}, "args[0].hr_option"),
        ({"unit": {"image": None}}, "args[0].image: no control image"),
        ({"unit": {"mask": b64png(_control_image())}}, "args[0].mask"),
        ({"enable_hr": True}, "controls with a refiner or the hires fix"),
    ],
)
def test_refusals_name_the_field(client: httpx.Client, change: dict[str, Any], named: str) -> None:
    body = {k: v for k, v in change.items() if k != "unit"}
    r = _txt2img(client, _unit(**change.get("unit", {})), **body)
    assert r.status_code == 422 and named in r.json()["detail"], r.text


def test_img2img_unit_without_image_uses_the_init_image(client: httpx.Client) -> None:
    init = _control_image()
    body = BODY | {"init_images": [b64png(init)], "denoising_strength": 0.6}
    with_image = _unit(image=b64png(init))
    images = []
    for unit in (with_image, _unit(image=None)):
        r = client.post(
            "/sdapi/v1/img2img", json=body | {"alwayson_scripts": {"ControlNet": {"args": [unit]}}}
        )
        assert r.status_code == 200, r.text
        images.append(to_tensor(unb64(r.json()["images"][0])))
    assert torch.equal(*images)
