"""IP-Adapter through every interface on the tiny SD1 model (seeded random adapter and image encoder): the
CLI image, a ComfyUI workflow through /prompt (ComfyUI_IPAdapter_plus's nodes) and an A1111 txt2img with
an sd-webui-controlnet IP-Adapter unit each equal the Python API's image for the same request; the A1111
and ComfyUI pixel rules against the extension's own steps (OpenCV + CLIPImageProcessor) and
CLIPImageProcessor; an adapter gated off for the whole run changes nothing."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from reference import max_diff, randomize
from test_ip_adapter import TINY_VISION, _adapter_file, _image
from test_server_api import MODEL, b64png, folders, png, serving, unb64, wait_history, write_models

from sdlab import families
from sdlab.checkpoints.io import write_safetensors
from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.cli import main
from sdlab.images import to_tensor
from sdlab.ip_adapter import IPAdapterSpec
from sdlab.models.clip_vision import CLIPVisionModel, a1111_clip_pixels, comfy_clip_pixels, preprocess_image
from sdlab.pipeline import GenerationRequest, generate
from sdlab.server.library import Library
from sdlab.server.nodes import Model, NodeError
from sdlab.server.nodes_ip_adapter import ipadapter_unified_loader
from sdlab.server.state import Settings

REQ = GenerationRequest("a red apple", "blurry", 32, 32, 4, 7.0, "euler", "normal", 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, StableDiffusion]:
    """(root, models folder, model): adapters in ipadapter/ and ControlNet/, the encoder as clip_h.pth."""
    root = tmp_path_factory.mktemp("ipa")
    models = write_models(root)
    model = load_model(models / MODEL)
    for folder in ("ipadapter", "ControlNet"):
        (models / folder).mkdir(exist_ok=True)
        for plus in (False, True):
            _adapter_file(models / folder, model.unet, plus)
    (models / "clip_vision").mkdir()
    torch.save(
        randomize(CLIPVisionModel(TINY_VISION), 21).state_dict(), models / "clip_vision" / "clip_h.pth"
    )
    return root, models, model


def _spec(models: Path, folder: str, plus: bool = False, **kw) -> IPAdapterSpec:  # noqa: ANN003
    path = models / folder / f"ip-adapter{'-plus' * plus}.safetensors"
    return IPAdapterSpec(str(path), clip_vision=str(models / "clip_vision" / "clip_h.pth"), **kw)


def test_cli_matches_the_python_api(setup, tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    _, models, model = setup
    monkeypatch.setenv("SDLAB_MODELS_DIR", str(models))
    _image().save(tmp_path / "ref.png")
    out = tmp_path / "out.png"
    args = ["generate", "a red apple", "-n", "blurry", "-m", str(models / MODEL), "-W", "32", "-H", "32"]
    args += ["--steps", "4", "--cfg", "7", "--sampler", "euler", "-s", "3", "-o", str(out), "-q"]
    assert (
        main([*args, "--ip-adapter", f"ip-adapter:{tmp_path / 'ref.png'}:0.6", "--clip-vision", "clip_h"])
        == 0
    )
    spec = _spec(models, "ipadapter", image=Image.open(tmp_path / "ref.png"), weight=0.6)
    expected = generate(model, replace(REQ, ip_adapters=(spec,))).images[0]
    assert torch.equal(to_tensor(Image.open(out)), to_tensor(expected))
    capsys.readouterr()
    for extra, named in (
        (["--ip-adapter", f"nothere:{tmp_path / 'ref.png'}"], "nothere: no such IP-Adapter file"),
        (["--ip-adapter", "ip-adapter"], "expected MODEL:IMAGE"),
        (["--clip-vision", "clip_h"], "--clip-vision: give it with --ip-adapter"),
    ):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err and "Traceback" not in err, err


def test_a1111_and_comfy_pixels_follow_their_tools() -> None:
    """sd-webui-controlnet's ClipVisionDetector: cv2.resize to size x size (INTER_AREA), then
    CLIPImageProcessor; ComfyUI's clip_preprocess at the encoder's size agrees with CLIPImageProcessor."""
    cv2 = pytest.importorskip("cv2")
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(crop_size=28, size=28, resample=3)
    image = _image(70, 50)
    squashed = cv2.resize(np.asarray(image), (28, 28), interpolation=cv2.INTER_AREA)
    assert (
        max_diff(a1111_clip_pixels(image, 28), proc(images=squashed, return_tensors="pt").pixel_values) < 1e-6
    )
    square = _image(28, 28)
    comfy = comfy_clip_pixels((to_tensor(square) + 1) / 2, 28)
    assert max_diff(comfy, preprocess_image(square, 28)) < 1e-6


@pytest.mark.parametrize("convention", ["a1111", "comfy"])
def test_an_adapter_gated_off_changes_nothing(setup, convention: str) -> None:  # noqa: ANN001
    """start = end = 1: never reached by a step share below 1 (A1111) nor by a σ above 0 (ComfyUI)."""
    _, models, model = setup
    image = (to_tensor(_image(28, 28)) + 1) / 2 if convention == "comfy" else _image(28, 28)
    spec = _spec(models, "ipadapter", image=image, start=1.0, end=1.0, convention=convention)
    plain = generate(model, REQ).images[0]
    assert torch.equal(
        to_tensor(generate(model, replace(REQ, ip_adapters=(spec,))).images[0]), to_tensor(plain)
    )


@pytest.fixture(scope="module")
def client(setup) -> Iterator[httpx.Client]:  # noqa: ANN001
    root, models, _ = setup
    with serving(Settings(folders(root, models))) as base, httpx.Client(base_url=base, timeout=120) as c:
        c.post("/sdapi/v1/options", json={"sd_model_checkpoint": MODEL})
        yield c


def _workflow(**ipadapter: object) -> dict[str, object]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MODEL}},
        "10": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_h.pth"}},
        "11": {
            "class_type": "IPAdapterModelLoader",
            "inputs": {"ipadapter_file": "ip-adapter-plus.safetensors"},
        },
        "12": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
        "13": {
            "class_type": "IPAdapterAdvanced",
            "inputs": {
                "model": ["4", 0],
                "ipadapter": ["11", 0],
                "image": ["12", 0],
                "weight": 0.7,
                "weight_type": "linear",
                "combine_embeds": "concat",
                "start_at": 0.3,
                "end_at": 1.0,
                "embeds_scaling": "V only",
                "clip_vision": ["10", 0],
            }
            | ipadapter,
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 3,
                "steps": 4,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["13", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ipa", "images": ["8", 0]}},
    }


def test_comfy_workflow_matches_the_python_api(setup, client: httpx.Client) -> None:  # noqa: ANN001
    _, models, model = setup
    client.post("/upload/image", files={"image": ("ref.png", png(_image(70, 50)))})
    r = client.post("/prompt", json={"prompt": _workflow()})
    assert r.status_code == 200, r.text
    entry = wait_history(client, r.json()["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    got = Image.open(io.BytesIO(client.get("/view", params=entry["outputs"]["9"]["images"][0]).content))
    pixels = (to_tensor(_image(70, 50)) + 1) / 2
    spec = _spec(models, "ipadapter", True, image=pixels, weight=0.7, start=0.3, convention="comfy")
    expected = generate(model, replace(REQ, ip_adapters=(spec,))).images[0]
    assert torch.equal(to_tensor(got), to_tensor(expected))
    assert not torch.equal(to_tensor(got), to_tensor(generate(model, REQ).images[0]))  # the adapter acted
    info = client.get("/object_info/IPAdapterAdvanced").json()["IPAdapterAdvanced"]
    assert info["input"]["required"]["weight"] == [
        "FLOAT",
        {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05},
    ]
    assert info["input"]["optional"] == {
        "image_negative": ["IMAGE"],
        "attn_mask": ["MASK"],
        "clip_vision": ["CLIP_VISION"],
    }
    assert client.get("/models/ipadapter").json() == ["ip-adapter-plus.safetensors", "ip-adapter.safetensors"]
    assert client.get("/models/clip_vision").json() == ["clip_h.pth"]
    r = client.post("/prompt", json={"prompt": _workflow(weight_type="ease in")})
    entry = wait_history(client, r.json()["prompt_id"]) if r.status_code == 200 else {"status": r.json()}
    assert "weight_type 'ease in'" in json.dumps(entry["status"])


def _title(models: Path, name: str) -> str:
    data = (models / "ControlNet" / f"{name}.safetensors").read_bytes()[0x100000:0x110000]
    return f"{name} [{hashlib.sha256(data).hexdigest()[:8]}]"


def _txt2img(client: httpx.Client, **unit: object) -> httpx.Response:
    unit = {"module": "ip-adapter_clip_sd15", "model": "ip-adapter", "image": b64png(_image(28, 28))} | unit
    body = {"prompt": "a red apple", "negative_prompt": "blurry", "width": 32, "height": 32, "steps": 4}
    body |= {"sampler_name": "Euler", "scheduler": "normal", "seed": 3, "cfg_scale": 7}
    return client.post(
        "/sdapi/v1/txt2img", json=body | {"alwayson_scripts": {"controlnet": {"args": [unit]}}}
    )


def test_a1111_unit_matches_the_python_api(setup, client: httpx.Client) -> None:  # noqa: ANN001
    _, models, model = setup
    r = _txt2img(client, weight=0.6, guidance_end=0.5)
    assert r.status_code == 200, r.text
    spec = _spec(models, "ControlNet", image=_image(28, 28), weight=0.6, end=0.5, convention="a1111")
    expected = generate(model, replace(REQ, ip_adapters=(spec,))).images[0]
    assert torch.equal(to_tensor(unb64(r.json()["images"][0])), to_tensor(expected))
    assert not torch.equal(
        to_tensor(expected), to_tensor(generate(model, REQ).images[0])
    )  # the adapter acted
    infotext = json.loads(r.json()["info"])["infotexts"][0]
    assert (
        f'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: {_title(models, "ip-adapter")}, Weight: 0.6'
        in infotext
    )
    missing = _txt2img(client, module="ip-adapter_clip_sdxl")
    assert missing.status_code == 422 and "clip_g.pth" in missing.text
    plus = _txt2img(client, model="ip-adapter-plus")
    assert plus.status_code == 422 and "'plus' IP-Adapters through the A1111 API" in plus.text


def test_a1111_lists_ip_adapters_and_runs_ip_adapter_auto(setup, client: httpx.Client) -> None:  # noqa: ANN001
    """/controlnet/model_list lists the IP-Adapters in models/ControlNet ("stem [hash]") and module_list the
    IP-Adapter preprocessors with the extension's (empty) details; "ip-adapter-auto" picks the encoder by
    the model's preset name (IPAdapterPreset.match_model), so ip-adapter_sd15 runs as ip-adapter_clip_h."""
    _, models, model = setup
    folder = models / "ControlNet"
    shutil.copy(folder / "ip-adapter.safetensors", folder / "ip-adapter_sd15.safetensors")
    titles = client.get("/controlnet/model_list").json()["model_list"]
    assert {_title(models, n) for n in ("ip-adapter", "ip-adapter-plus", "ip-adapter_sd15")} <= set(titles)
    labels = {  # the extension's names and UI labels, in its order
        "ip-adapter-auto": "ip-adapter-auto",
        "ip-adapter_clip_sd15": "ip-adapter_clip_h",
        "ip-adapter_clip_sdxl_plus_vith": "ip-adapter_clip_sdxl_plus_vith",
        "ip-adapter_clip_sdxl": "ip-adapter_clip_g",
    }
    for listed in (list(labels), list(labels.values())):
        alias = listed != list(labels)
        modules = client.get("/controlnet/module_list", params={"alias_names": alias}).json()
        assert [m for m in modules["module_list"] if m.startswith("ip-adapter")] == listed
        assert all(modules["module_detail"][m] == {"model_free": False, "sliders": []} for m in listed)
    body = {"controlnet_module": "ip-adapter_clip_h", "controlnet_input_images": [b64png(_image())]}
    r = client.post("/controlnet/detect", json=body)
    assert r.status_code == 422 and "an IP-Adapter preprocessor" in r.text

    r = _txt2img(client, module="ip-adapter-auto", model="ip-adapter_sd15", weight=0.6)
    assert r.status_code == 200, r.text
    spec = IPAdapterSpec(
        str(models / "ControlNet" / "ip-adapter_sd15.safetensors"),
        _image(28, 28),
        0.6,
        str(models / "clip_vision" / "clip_h.pth"),
        convention="a1111",
    )
    expected = generate(model, replace(REQ, ip_adapters=(spec,))).images[0]
    assert torch.equal(to_tensor(unb64(r.json()["images"][0])), to_tensor(expected))
    r = _txt2img(client, module="ip-adapter-auto", model="ip-adapter")
    assert r.status_code == 422 and "ip-adapter is not an IP-Adapter preset name" in r.text


def test_comfy_model_folders_follow_folder_paths(setup, client: httpx.Client) -> None:  # noqa: ANN001
    """/models names the folders as ComfyUI's folder_paths does (ComfyUI_IPAdapter_plus adds `ipadapter`
    last) and /models/{folder} answers its sorted file names; a folder ComfyUI does not have is a 404."""
    _, models, _ = setup
    (models / "upscale_models").mkdir(exist_ok=True)
    (models / "upscale_models" / "4x-test.pth").write_bytes(b"")
    folders = client.get("/models").json()
    assert folders[-5:] == ["clip_vision", "embeddings", "controlnet", "upscale_models", "ipadapter"]
    controlnets = client.get("/models/controlnet").json()
    assert controlnets == sorted(controlnets) and "ip-adapter.safetensors" in controlnets
    assert client.get("/models/upscale_models").json() == ["4x-test.pth"]
    assert client.get("/models/clip_vision").json() == ["clip_h.pth"]
    assert client.get("/models/t2i_adapter").status_code == 404


def test_unified_loader_finds_a_presets_files_and_the_simple_node_applies_them(
    setup,  # noqa: ANN001
    client: httpx.Client,
) -> None:
    """IPAdapterUnifiedLoader's PLUS preset on an SD1.5 model finds ip-adapter-plus_sd15 and the ViT-H
    encoder by ComfyUI_IPAdapter_plus's file-name rules (utils.get_ipadapter_file / get_clipvision_file);
    the IPAdapter node (weight_type standard: linear) then gives the Python API's image. Presets without a
    file, or refused on the model's family, are errors naming the preset."""
    _, models, model = setup
    folder = models / "ipadapter"
    shutil.copy(folder / "ip-adapter-plus.safetensors", folder / "ip-adapter-plus_sd15.safetensors")
    encoder = randomize(CLIPVisionModel(TINY_VISION), 21).state_dict()  # clip_h.pth's weights
    write_safetensors(encoder, models / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    workflow = _workflow()
    workflow["10"] = {
        "class_type": "IPAdapterUnifiedLoader",
        "inputs": {"model": ["4", 0], "preset": "PLUS (high strength)"},
    }
    del workflow["11"]
    simple = {"model": ["10", 0], "ipadapter": ["10", 1], "image": ["12", 0], "weight": 0.7}
    simple |= {"start_at": 0.3, "end_at": 1.0, "weight_type": "standard"}
    workflow["13"] = {"class_type": "IPAdapter", "inputs": simple}
    client.post("/upload/image", files={"image": ("ref.png", png(_image(70, 50)))})
    r = client.post("/prompt", json={"prompt": workflow})
    assert r.status_code == 200, r.text
    entry = wait_history(client, r.json()["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    got = Image.open(io.BytesIO(client.get("/view", params=entry["outputs"]["9"]["images"][0]).content))
    pixels = (to_tensor(_image(70, 50)) + 1) / 2
    spec = _spec(models, "ipadapter", True, image=pixels, weight=0.7, start=0.3, convention="comfy")
    expected = generate(model, replace(REQ, ip_adapters=(spec,))).images[0]
    assert torch.equal(to_tensor(got), to_tensor(expected))

    info = client.get("/object_info/IPAdapterUnifiedLoader").json()["IPAdapterUnifiedLoader"]
    assert info["input"]["required"]["preset"][0] == [  # the pack's INPUT_TYPES
        "LIGHT - SD1.5 only (low strength)",
        "STANDARD (medium strength)",
        "VIT-G (medium strength)",
        "PLUS (high strength)",
        "PLUS FACE (portraits)",
        "FULL FACE - SD1.5 only (portraits stronger)",
    ]
    assert info["input"]["optional"] == {"ipadapter": ["IPADAPTER"]}
    assert (info["output"], info["output_name"]) == (["MODEL", "IPADAPTER"], ["model", "ipadapter"])

    env = SimpleNamespace(library=Library(models))
    xl = SimpleNamespace(sd=SimpleNamespace(family=families.SDXL))
    for on, preset, message in (
        (model, "LIGHT - SD1.5 only (low strength)", r"IPAdapter model not found .*sd15.light"),
        (xl, "LIGHT - SD1.5 only (low strength)", "not supported for SDXL models"),
        (xl, "PLUS (high strength)", r"IPAdapter model not found .*plus.sdxl.vit.h"),
        (model, "VIT-G (medium strength)", r"ClipVision model not found .*ViT.bigG"),
    ):
        with pytest.raises(NodeError, match=f"preset '{re.escape(preset)}': {message}"):
            ipadapter_unified_loader(env, Model(on) if on is model else on, preset)
