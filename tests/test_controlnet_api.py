"""ControlNet through the A1111 API in sd-webui-controlnet's format: a unit draws what the pipeline draws
with the equivalent ControlSpec, the infotext entry is the extension's, the `/controlnet/*` routes answer
in its shapes, and what sdlab cannot honour is refused naming the field. T2I-Adapters: an adapter unit
(canny at a processor_res, the map fitted as the extension fits it) and a ComfyUI graph through `/prompt`
each draw what the Python API draws with the same control image."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from reference import randomize
from test_controlnet import _controlnet
from test_controlnet_maps import canny, extension_detectmap_proc
from test_server_api import (
    MODEL,
    b64png,
    folders,
    png,
    serving,
    txt2img_workflow,
    unb64,
    wait_history,
    write_models,
)

from sdlab.checkpoints.io import write_safetensors
from sdlab.checkpoints.load import load_model
from sdlab.control import ControlSpec
from sdlab.images import to_tensor
from sdlab.infotext import parse_infotext
from sdlab.models.t2i_adapter import T2IAdapterConfig, T2IAdapterModel
from sdlab.pipeline import GenerationRequest, generate
from sdlab.preprocess import preprocess
from sdlab.server.state import Settings

CN = "cn-tiny"
ADAPTER = "t2iadapter_canny_sd15v2"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cnapi")
    models = write_models(root)
    (models / "ControlNet").mkdir()
    sd = {f"control_model.{k}": v for k, v in _controlnet("sd1").state_dict().items()}
    write_safetensors(sd, models / "ControlNet" / f"{CN}.safetensors")
    adapter = randomize(T2IAdapterModel(T2IAdapterConfig((32, 64), "full")), 3)
    write_safetensors(adapter.state_dict(), models / "ControlNet" / f"{ADAPTER}.safetensors")
    with serving(Settings(folders(root, models))) as base:
        httpx.post(base + "/sdapi/v1/options", json={"sd_model_checkpoint": MODEL})
        yield base, models
    torch.set_num_threads(threads)


@pytest.fixture
def client(served: tuple[str, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=120) as c:
        yield c


def _title(models: Path, name: str = CN) -> str:
    """The extension's title: stem [A1111's old hash: SHA-256 of 64 KiB at 1 MiB, 8 digits]."""
    data = (models / "ControlNet" / f"{name}.safetensors").read_bytes()[0x100000:0x110000]
    return f"{name} [{hashlib.sha256(data).hexdigest()[:8]}]"


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
    titles = client.get("/controlnet/model_list").json()["model_list"]
    assert sorted(titles) == [_title(served[1]), _title(served[1], ADAPTER)]
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"][:2] == ["none", "canny"] and "openpose" not in modules["module_list"]
    assert modules["module_detail"]["canny"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1},
    ]
    aliases = client.get("/controlnet/module_list", params={"alias_names": True}).json()["module_list"]
    assert "invert (from white bg & black line)" in aliases and "t2ia_color_grid" in aliases

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
    # processor_res 96: the image scaled by cubic, padded to 64s and cut back, as the extension does
    r = client.post("/controlnet/detect", json=body | {"controlnet_processor_res": 96})
    assert np.array_equal(np.asarray(unb64(r.json()["images"][0])), canny(np.asarray(photo), 96, 100, 200))
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
        ({"unit": {"module": "t2ia_sketch_pidi"}}, "PiDiNet model weights"),
        ({"unit": {"module": "t2ia_style_clipvision"}}, "CLIP vision"),
        (
            {
                "unit": {
                    "module": "canny",
                    "processor_res": 2048,
                    "image": b64png(_control_image(40).crop((0, 0, 1, 40))),
                }
            },
            "processor_res",
        ),
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


def _adapter_expected(models: Path, image: Image.Image, **kw: Any) -> Image.Image:
    spec = ControlSpec(str(models / "ControlNet" / f"{ADAPTER}.safetensors"), image, **kw)
    req = GenerationRequest(
        "a red apple", "blurry", 32, 32, steps=4, sampler="euler", seed=3, cfg_scale=7.0, controls=(spec,)
    )
    return generate(load_model(models / MODEL), req).images[0]


def test_t2i_adapter_unit_with_the_extensions_map(client: httpx.Client, served: tuple[str, Path]) -> None:
    """A canny unit on a T2I-Adapter model: a 40x30 photo scaled to processor_res 72 for canny, the edge
    map cropped and resized to 32x32 as the extension does (a binary map: thinned), then the adapter."""
    models = served[1]
    photo = _control_image(40).crop((0, 0, 40, 30))
    unit = _unit(module="canny", model=ADAPTER, image=b64png(photo), processor_res=72, weight=0.9)
    r = _txt2img(client, unit)
    assert r.status_code == 200, r.text
    edges = canny(np.asarray(photo), 72, 100, 200)
    fitted = Image.fromarray(extension_detectmap_proc(edges, "crop", 32, 32))
    expected = _adapter_expected(models, fitted, weight=0.9)
    image = to_tensor(unb64(r.json()["images"][0]))
    assert torch.equal(image, to_tensor(expected))
    other = _adapter_expected(models, Image.fromarray(np.asarray(photo.resize((32, 32)))), weight=0.9)
    assert not torch.equal(image, to_tensor(other))  # the map matters
    info = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])["ControlNet 0"]
    assert (
        info.startswith(f"Module: canny, Model: {_title(models, ADAPTER)}, Weight: 0.9") and "Res: 72" in info
    )


def test_comfy_graph_with_a_t2i_adapter_equals_the_python_api(
    client: httpx.Client, served: tuple[str, Path]
) -> None:
    """ControlNetLoader loads the adapter; with the control image at the latents' size x 8 (no resize on
    either side), strength 1 over the whole schedule, the graph's image is the Python API's."""
    control = _control_image(128)  # the tiny VAE downscales by 2: 32 px -> 16 latents -> 128 px hint
    name = client.post("/upload/image", files={"image": ("adapter.png", png(control))}).json()["name"]
    workflow = txt2img_workflow(seed=3, steps=4, size=32, prefix="adapter")
    workflow["10"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    workflow["11"] = {
        "class_type": "ControlNetLoader",
        "inputs": {"control_net_name": f"{ADAPTER}.safetensors"},
    }
    workflow["12"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["6", 0],
            "negative": ["7", 0],
            "control_net": ["11", 0],
            "image": ["10", 0],
            "strength": 1.0,
            "start_percent": 0.0,
            "end_percent": 1.0,
        },
    }
    workflow["3"]["inputs"] |= {"positive": ["12", 0], "negative": ["12", 1]}
    r = client.post("/prompt", json={"prompt": workflow})
    assert r.status_code == 200, r.text
    entry = wait_history(client, r.json()["prompt_id"], timeout=120)
    ref = entry["outputs"]["9"]["images"][0]
    graph = Image.open(io.BytesIO(client.get("/view", params=ref).content)).convert("RGB")
    expected = _adapter_expected(served[1], control)
    assert torch.equal(to_tensor(graph), to_tensor(expected))
