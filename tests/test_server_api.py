"""`sdlab serve` over real HTTP on loopback: the AUTOMATIC1111 and ComfyUI APIs, /ws, files, auth.

One server (uvicorn in a thread, tiny model in a temp models folder) serves most tests; torch runs
on one thread meanwhile, as the machine is shared.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny import write_tiny
from websockets.sync.client import connect

from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.images import read_parameters
from sdlab.infotext import parse_infotext
from sdlab.lora import layer_map, save_lora
from sdlab.server.app import create_app
from sdlab.server.paths import Folders
from sdlab.server.state import Settings

MODEL = "tiny.safetensors"


# ---------------------------------------------------------------------------------------------
# helpers shared with test_server_queue.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_models(root: Path) -> Path:
    """A models folder: the tiny SD1 checkpoint, its VAE alone, a LoRA for it and an (unused) embedding."""
    models = root / "models"
    for sub in ("VAE", "Lora", "embeddings"):
        (models / sub).mkdir(parents=True)
    ckpt = write_tiny("sd1", models / MODEL)
    vae = {k: v for k, v in load_file(ckpt).items() if k.startswith("first_stage_model.")}
    save_file(vae, models / "VAE" / "tiny-vae.safetensors")
    save_lora(tiny_lora(load_model(ckpt)), models / "Lora" / "style.safetensors")
    save_file({"emb_params": torch.zeros(1, 128)}, models / "embeddings" / "nice.safetensors")
    return models


def tiny_lora(model: StableDiffusion, rank: int = 2) -> dict[str, torch.Tensor]:
    """A rank-2 kohya LoRA on every Linear layer of the U-Net and text encoder, seeded."""
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for name, layer in layer_map(model.unet, model.text_encoders, model.family).items():
        if isinstance(layer, torch.nn.Linear):
            lora[f"{name}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.1
            lora[f"{name}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.1
            lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora


def folders(root: Path, models: Path) -> Folders:
    return Folders(models, root / "outputs", root / "input", root / "state")


def txt2img_workflow(
    seed: int = 3, steps: int = 4, size: int = 32, prefix: str = "ComfyUI"
) -> dict[str, Any]:
    """ComfyUI's default workflow (node ids as in its default graph)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MODEL}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def wait_history(client: httpx.Client, prompt_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = client.get(f"/history/{prompt_id}").json()
        if entry:
            return entry[prompt_id]
        time.sleep(0.05)
    raise TimeoutError(f"prompt {prompt_id} did not finish")


def wait_running(client: httpx.Client, prompt_id: str, timeout: float = 30) -> None:
    """Until the job samples (progress reported for it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = client.get("/sdapi/v1/progress").json()["state"]
        if state["job"] == prompt_id and state["sampling_step"] > 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"prompt {prompt_id} did not start")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64png(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


def unb64(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


@contextmanager
def serving(settings: Settings, port: int | None = None) -> Iterator[str]:
    """Run a server for settings on a loopback port (a free one unless given); yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port or free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def url(root: Path, one_thread: None) -> Iterator[str]:
    # previews over /ws are sent only when the server's preview method asks for them (ComfyUI's default: none)
    settings = Settings(folders(root, write_models(root)), max_queue=3, preview_method="latent2rgb")
    with serving(settings) as base:
        httpx.post(base + "/sdapi/v1/options", json={"sd_model_checkpoint": MODEL})  # not the shipped model
        yield base


@pytest.fixture
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c
        c.post("/queue", json={"clear": True})  # leave nothing running for the next test
        c.post("/interrupt")


# ---------------------------------------------------------------------------------------------
# AUTOMATIC1111


def test_a1111_lists_models_samplers_and_options(client: httpx.Client) -> None:
    models = client.get("/sdapi/v1/sd-models").json()
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    assert {"model_name": "tiny", "filename": MODEL} in [
        {k: m[k] for k in ("model_name", "filename")} for m in models
    ]
    assert {"name": "Euler a", "aliases": ["euler_ancestral"], "options": {}} in client.get(
        "/sdapi/v1/samplers"
    ).json()
    assert {s["label"] for s in client.get("/sdapi/v1/schedulers").json()} >= {
        "Automatic",
        "Karras",
        "Uniform",
    }
    assert client.get("/sdapi/v1/sd-vae").json() == [
        {"model_name": "tiny-vae", "filename": "tiny-vae.safetensors"}
    ]
    assert client.get("/sdapi/v1/loras").json()[0]["name"] == "style"
    assert "nice" in client.get("/sdapi/v1/embeddings").json()["loaded"]  # (1, 128) fits the tiny CLIP
    assert client.get("/embeddings").json() == ["nice"]
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"].startswith(MODEL) and options["CLIP_stop_at_last_layers"] == 1
    assert client.post(
        "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "tiny"}
    )
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200
    # nothing that touches paths can be set, and models are names from the listing only
    assert client.post("/sdapi/v1/options", json={"outdir_samples": "/tmp"}).status_code == 422
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../models/tiny"}).status_code == 404


def test_a1111_txt2img_batches_seeds_info_and_saving(client: httpx.Client, root: Path) -> None:
    body = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 4, "width": 32, "height": 40}
    body |= {"seed": 11, "batch_size": 2, "n_iter": 2, "unknown_field": [1, 2], "styles": None}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert len(out["images"]) == 4 and info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert info["sampler_name"] == "Euler" and info["scheduler"] == "Uniform" and info["n_iter"] == 2
    for key in ("all_prompts", "subseed", "all_subseeds", "job_timestamp", "sd_model_name", "sd_model_hash"):
        assert key in info
    assert info["sd_model_name"] == "tiny" and len(info["sd_model_hash"]) == 10 and info["clip_skip"] == 1
    assert out["parameters"]["prompt"] == "a red apple" and out["parameters"]["cfg_scale"] == 7.0
    images = [unb64(i) for i in out["images"]]
    assert all(im.size == (32, 40) for im in images)
    params = parse_infotext(images[3].info["parameters"])
    assert params["Seed"] == "14" and params["Negative prompt"] == "blurry" and params["Steps"] == "4"
    assert info["infotexts"][3] == images[3].info["parameters"]
    assert not (root / "outputs" / "txt2img-images").exists()  # save_images defaults to false
    # the same seed again gives the same image; save_images writes it with its parameters
    again = client.post(
        "/sdapi/v1/txt2img", json=body | {"seed": 13, "n_iter": 1, "save_images": True}
    ).json()
    assert unb64(again["images"][0]).tobytes() == images[2].tobytes()
    saved = sorted((root / "outputs" / "txt2img-images").glob("*.png"))
    assert [p.name for p in saved] == ["00001-13.png", "00002-14.png"]
    assert "Seed: 13" in read_parameters(saved[0])


def test_a1111_request_errors(client: httpx.Client) -> None:
    assert client.post("/sdapi/v1/txt2img", json={"steps": "many"}).status_code == 422
    assert client.post("/sdapi/v1/txt2img", json={"steps": 4, "width": 33, "height": 32}).status_code == 422
    assert client.post("/sdapi/v1/txt2img", json={"sampler_name": "nope"}).status_code == 422
    unknown_model = {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}
    assert client.post("/sdapi/v1/txt2img", json=unknown_model).status_code == 404
    assert client.post("/sdapi/v1/img2img", json={"init_images": ["not base64!"]}).status_code == 422
    assert client.post("/sdapi/v1/img2img", json={"prompt": "x"}).status_code == 404
    assert (
        client.post(
            "/sdapi/v1/txt2img", json={"send_images": False, "steps": 1, "width": 32, "height": 32}
        ).json()["images"]
        == []
    )


def test_a1111_img2img_and_inpainting(client: httpx.Client) -> None:
    init = Image.new("RGB", (48, 48), (200, 30, 30))
    mask = Image.new("L", (48, 48), 0)
    mask.paste(255, (0, 0, 24, 48))
    body = {"prompt": "a cat", "init_images": [b64png(init)], "denoising_strength": 0.5, "steps": 6}
    body |= {"width": 32, "height": 32, "seed": 5, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}
    plain = client.post("/sdapi/v1/img2img", json=body)
    assert plain.status_code == 200, plain.text
    info = json.loads(plain.json()["info"])
    assert (
        info["denoising_strength"] == 0.5
        and info["sampler_name"] == "DPM++ 2M"
        and info["scheduler"] == "Karras"
    )
    assert plain.json()["parameters"]["init_images"] is None  # not echoed back (include_init_images)
    assert "Denoising strength: 0.5" in info["infotexts"][0]
    data_url = "data:image/png;base64," + b64png(mask)
    inpaint = client.post("/sdapi/v1/img2img", json=body | {"mask": data_url, "mask_blur": 0}).json()
    assert unb64(inpaint["images"][0]).size == (48, 48)  # A1111's "only masked": pasted into the init image
    infotext = json.loads(inpaint["info"])["infotexts"][0]
    assert "Mask blur" not in infotext and "Inpaint area: Only masked" in infotext  # A1111 omits blur 0


def test_a1111_png_info_reads_parameters(client: httpx.Client) -> None:
    out = client.post(
        "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32, "height": 32, "seed": 9}
    )
    info = client.post("/sdapi/v1/png-info", json={"image": out.json()["images"][0]}).json()
    assert info["parameters"]["Seed"] == "9" and info["info"].startswith("x\nSteps: 2")
    empty = client.post("/sdapi/v1/png-info", json={"image": b64png(Image.new("RGB", (8, 8)))}).json()
    assert empty == {"info": "", "items": {}, "parameters": {}}


def test_a1111_progress_preview_and_interrupt(client: httpx.Client) -> None:
    responses: list[httpx.Response] = []
    body = {"prompt": "slow", "steps": 1000, "width": 64, "height": 64, "n_iter": 3}
    worker = threading.Thread(target=lambda: responses.append(client.post("/sdapi/v1/txt2img", json=body)))
    worker.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] > 1 and progress["current_image"]:
            break
        time.sleep(0.05)
    state = progress["state"]
    assert state["sampling_steps"] == 1000 and state["job_count"] == 3 and 0 < progress["progress"] < 0.5
    assert unb64(progress["current_image"]).size == (32, 32)  # latent size (tiny VAE: /2), no VAE decode
    job = client.get(f"/sdlab/v1/jobs/{state['job']}").json()
    assert job["state"] == "running" and job["progress"]["total"] == 1000 and job["kind"] == "a1111"
    client.post("/sdapi/v1/interrupt")
    worker.join(30)
    # A1111 keeps the interrupted image as far as it got (the last denoised step), with its infotext,
    # and makes no further batches
    out = responses[0].json()
    assert responses[0].status_code == 200 and len(out["images"]) == 1
    image = unb64(out["images"][0])
    assert image.size == (64, 64) and "Steps: 1000" in image.info["parameters"]
    assert json.loads(out["info"])["infotexts"] == [image.info["parameters"]]
    assert client.get("/sdapi/v1/progress").json()["state"]["job"] == ""


def check_skip(client: httpx.Client, timeout: float = 60) -> None:
    """A1111's /skip: the image being sampled stops early and is kept, and the job goes on with its next batch
    (here interrupted as soon as it runs)."""
    responses: list[httpx.Response] = []
    body = {"prompt": "slow", "steps": 1000, "width": 32, "height": 32, "n_iter": 2, "seed": 21}
    request = threading.Thread(target=lambda: responses.append(client.post("/sdapi/v1/txt2img", json=body)))
    request.start()
    deadline = time.time() + timeout
    for job_no, stop in ((0, "/sdapi/v1/skip"), (1, "/sdapi/v1/interrupt")):
        while (state := client.get("/sdapi/v1/progress").json()["state"])["job_no"] != job_no or (
            state["sampling_step"] < 1
        ):
            assert time.time() < deadline and not responses, (state, responses and responses[0].text)
            time.sleep(0.05)
        client.post(stop)
    request.join(timeout)
    assert responses[0].status_code == 200, responses[0].text
    out = responses[0].json()
    # the skipped first image (1000 steps would take a minute) is kept; the interrupted second one too
    seeds = [unb64(image).info["parameters"].split("Seed: ")[1].split(",")[0] for image in out["images"]]
    assert seeds == ["21", "22"] and json.loads(out["info"])["all_seeds"] == [21, 22]


def test_a1111_skip_keeps_the_image_and_goes_on(client: httpx.Client) -> None:
    check_skip(client)


# ---------------------------------------------------------------------------------------------
# ComfyUI


def ws_messages(url: str, client_id: str, prompt_id_box: list[str], run: Any) -> list[Any]:
    """Connect /ws, call run(), and collect messages until the prompt's final `executing` null."""
    messages: list[Any] = []
    with connect(url.replace("http", "ws") + f"/ws?clientId={client_id}", open_timeout=10) as ws:
        messages.append(json.loads(ws.recv(timeout=10)))
        run()
        while True:
            message = ws.recv(timeout=60)
            messages.append(message if isinstance(message, bytes) else json.loads(message))
            if isinstance(message, str):
                data = messages[-1]["data"]
                if messages[-1]["type"] == "executing" and data["node"] is None:
                    assert data["prompt_id"] == prompt_id_box[0]
                    return messages


def test_comfy_default_workflow_with_history_view_and_ws(client: httpx.Client, url: str) -> None:
    box: list[str] = []

    def submit() -> None:
        r = client.post("/prompt", json={"prompt": txt2img_workflow(seed=3, steps=5), "client_id": "me"})
        assert r.status_code == 200 and r.json()["node_errors"] == {}
        box.append(r.json()["prompt_id"])

    messages = ws_messages(url, "me", box, submit)
    assert messages[0]["type"] == "status" and messages[0]["data"]["sid"] == "me"
    assert "queue_remaining" in messages[0]["data"]["status"]["exec_info"]
    events = [m["type"] for m in messages if isinstance(m, dict)]
    assert events.index("execution_start") < events.index("executed") < events.index("execution_success")
    executing = [m["data"]["node"] for m in messages if isinstance(m, dict) and m["type"] == "executing"]
    assert sorted(executing[:-1]) == ["3", "4", "5", "6", "7", "8", "9"] and executing.index(
        "4"
    ) < executing.index("3")
    progress = [m["data"] for m in messages if isinstance(m, dict) and m["type"] == "progress"]
    assert [p["value"] for p in progress] == [1, 2, 3, 4, 5] and {p["max"] for p in progress} == {5}
    assert progress[0]["node"] == "3" and progress[0]["prompt_id"] == box[0]
    frames = [m for m in messages if isinstance(m, bytes)]
    assert len(frames) == 5 and struct.unpack(">II", frames[0][:8]) == (1, 2)
    assert Image.open(io.BytesIO(frames[0][8:])).size == (16, 16)
    executed = next(m["data"] for m in messages if isinstance(m, dict) and m["type"] == "executed")
    assert executed["node"] == "9" and executed["prompt_id"] == box[0]
    ref = executed["output"]["images"][0]
    assert ref["type"] == "output" and ref["subfolder"] == "" and ref["filename"].startswith("ComfyUI_")

    entry = wait_history(client, box[0])
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    assert entry["outputs"]["9"]["images"] == [ref] and entry["prompt"][1] == box[0]
    assert box[0] in client.get("/history").json() and box[0] in client.get("/api/history?max_items=5").json()
    view = client.get("/view", params=ref)
    assert view.status_code == 200 and view.headers["content-type"] == "image/png"
    # the same generation through the A1111 API gives the same pixels
    a1111 = client.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "a red apple",
            "negative_prompt": "blurry",
            "seed": 3,
            "steps": 5,
            "width": 32,
            "height": 32,
        },
    ).json()
    same = Image.open(io.BytesIO(view.content)).convert("RGB").tobytes()
    assert unb64(a1111["images"][0]).convert("RGB").tobytes() == same


def test_comfy_img2img_workflow_with_upload(client: httpx.Client, url: str) -> None:
    upload = client.post(
        "/upload/image", files={"image": ("init.png", png(Image.new("RGB", (40, 32), (20, 160, 60))))}
    )
    assert upload.json() == {"name": "init.png", "subfolder": "", "type": "input"}
    workflow = txt2img_workflow(steps=5, prefix="img2img")
    workflow["10"] = {"class_type": "LoadImage", "inputs": {"image": "init.png"}}
    workflow["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    workflow["3"]["inputs"] |= {"latent_image": ["11", 0], "denoise": 0.6}
    box: list[str] = []

    def submit() -> None:
        box.append(
            client.post("/api/prompt", json={"prompt": workflow, "client_id": "i2i"}).json()["prompt_id"]
        )

    messages = ws_messages(url, "i2i", box, submit)
    progress = [m["data"] for m in messages if isinstance(m, dict) and m["type"] == "progress"]
    assert [p["value"] for p in progress] == [
        1,
        2,
        3,
        4,
        5,
    ]  # ComfyUI's denoise: `steps` steps, the last ones
    executing = [m["data"]["node"] for m in messages if isinstance(m, dict) and m["type"] == "executing"]
    assert "5" not in executing  # the unused EmptyLatentImage does not run
    ref = wait_history(client, box[0])["outputs"]["9"]["images"][0]
    assert Image.open(io.BytesIO(client.get("/view", params=ref).content)).size == (40, 32)


def test_comfy_more_nodes(client: httpx.Client) -> None:
    """CLIPSetLastLayer, KSamplerAdvanced, LatentUpscale, VAELoader, ImageScale, masks, inpainting."""
    rgba = Image.new("RGBA", (32, 32), (90, 90, 200, 255))
    rgba.paste((255, 255, 255, 0), (0, 0, 16, 32))  # transparent left half: LoadImage's mask
    client.post("/upload/image", files={"image": ("rgba.png", png(rgba))}, data={"subfolder": "masks"})
    w = txt2img_workflow(steps=3)
    w["5"]["inputs"]["batch_size"] = 2
    nodes = {
        "12": ("CLIPSetLastLayer", {"clip": ["4", 1], "stop_at_clip_layer": -2}),
        "13": (
            "KSamplerAdvanced",
            {
                "model": ["4", 0],
                "add_noise": "enable",
                "noise_seed": 5,
                "steps": 6,
                "cfg": 5,
                "sampler_name": "euler_ancestral",
                "scheduler": "karras",
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
                "start_at_step": 0,
                "end_at_step": 3,
                "return_with_leftover_noise": "enable",
            },
        ),
        "14": (
            "KSamplerAdvanced",
            {
                "model": ["4", 0],
                "add_noise": "disable",
                "noise_seed": 5,
                "steps": 6,
                "cfg": 5,
                "sampler_name": "euler",
                "scheduler": "karras",
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["13", 0],
                "start_at_step": 3,
                "end_at_step": 10000,
                "return_with_leftover_noise": "disable",
            },
        ),
        "15": (
            "LatentUpscale",
            {
                "samples": ["14", 0],
                "upscale_method": "bilinear",
                "width": 48,
                "height": 48,
                "crop": "disabled",
            },
        ),
        "16": ("VAELoader", {"vae_name": "tiny-vae.safetensors"}),
        "17": ("VAEDecode", {"samples": ["15", 0], "vae": ["16", 0]}),
        "18": (
            "ImageScale",
            {"image": ["17", 0], "upscale_method": "lanczos", "width": 40, "height": 0, "crop": "center"},
        ),
        "20": ("LoadImage", {"image": "masks/rgba.png"}),
        "21": ("LoadImageMask", {"image": "masks/rgba.png", "channel": "red"}),
        "22": (
            "VAEEncodeForInpaint",
            {"pixels": ["20", 0], "vae": ["4", 2], "mask": ["21", 0], "grow_mask_by": 2},
        ),
        "23": ("SetLatentNoiseMask", {"samples": ["22", 0], "mask": ["20", 1]}),
        "24": ("KSampler", {**w["3"]["inputs"], "latent_image": ["23", 0], "positive": ["25", 0]}),
        "25": ("CLIPTextEncode", {"text": "sky", "clip": ["12", 0]}),
        "26": ("VAEDecode", {"samples": ["24", 0], "vae": ["4", 2]}),
        "27": ("PreviewImage", {"images": ["26", 0]}),
    }
    w |= {k: {"class_type": c, "inputs": i} for k, (c, i) in nodes.items()}
    w["9"]["inputs"] = {"images": ["18", 0], "filename_prefix": "sink/more"}
    del w["3"], w["8"]
    r = client.post("/prompt", json={"prompt": w})
    assert r.status_code == 200, r.text
    entry = wait_history(client, r.json()["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["9"]["images"]
    assert len(saved) == 2 and {s["subfolder"] for s in saved} == {"sink"}
    assert Image.open(io.BytesIO(client.get("/view", params=saved[1]).content)).size == (40, 40)
    preview = entry["outputs"]["27"]["images"][0]
    assert preview["type"] == "temp" and client.get("/view", params=preview).status_code == 200


def test_comfy_lora_loader_merges_only_while_used(client: httpx.Client) -> None:
    def image(strength: float | None) -> bytes:
        w = txt2img_workflow(seed=8, steps=3)
        if strength is not None:
            lora = {"lora_name": "style.safetensors", "strength_model": strength, "strength_clip": strength}
            w["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], **lora}}
            w["3"]["inputs"]["model"] = ["10", 0]
            w["6"]["inputs"]["clip"] = ["10", 1]
        entry = wait_history(client, client.post("/prompt", json={"prompt": w}).json()["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        return client.get("/view", params=entry["outputs"]["9"]["images"][0]).content

    plain = Image.open(io.BytesIO(image(None))).tobytes()
    assert Image.open(io.BytesIO(image(0.0))).tobytes() == plain
    assert Image.open(io.BytesIO(image(1.0))).tobytes() != plain
    assert Image.open(io.BytesIO(image(None))).tobytes() == plain  # the shared model is restored


@pytest.mark.parametrize(
    ("change", "node", "error_type"),
    [
        (lambda w: w["3"]["inputs"].pop("seed"), "3", "required_input_missing"),
        (lambda w: w["3"]["inputs"].update(sampler_name="nope"), "3", "value_not_in_list"),
        (lambda w: w["3"]["inputs"].update(steps="many"), "3", "invalid_input_type"),
        (lambda w: w["3"]["inputs"].update(steps=0), "3", "value_smaller_than_min"),
        (lambda w: w["3"]["inputs"].update(model=["4", 2]), "3", "return_type_mismatch"),
        (lambda w: w["3"]["inputs"].update(model=["99", 0]), "3", "bad_linked_input"),
        (lambda w: w["4"]["inputs"].update(ckpt_name="../tiny.safetensors"), "4", "value_not_in_list"),
        (lambda w: w["5"]["inputs"].update(width=8), "5", "value_smaller_than_min"),
        (lambda w: w["6"]["inputs"].update(clip=["8", 0]), "6", "return_type_mismatch"),
    ],
)
def test_comfy_invalid_graph_gives_node_errors(
    client: httpx.Client, change: Any, node: str, error_type: str
) -> None:
    workflow = txt2img_workflow()
    change(workflow)
    r = client.post("/prompt", json={"prompt": workflow})
    assert r.status_code == 400
    body = r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"][node]["class_type"] == workflow[node]["class_type"]
    assert body["node_errors"][node]["dependent_outputs"] == ["9"]
    assert [e["type"] for e in body["node_errors"][node]["errors"]] == [error_type]


def test_comfy_invalid_prompts(client: httpx.Client) -> None:
    unknown = client.post("/prompt", json={"prompt": {"1": {"class_type": "Nope", "inputs": {}}}})
    assert unknown.status_code == 400 and unknown.json()["error"]["type"] == "invalid_prompt"
    no_output = txt2img_workflow()
    del no_output["9"]
    assert client.post("/prompt", json={"prompt": no_output}).json()["error"]["type"] == "prompt_no_outputs"
    assert client.post("/prompt", json={"number": 1}).json() == {"error": "no prompt", "node_errors": []}
    cycle = txt2img_workflow()
    cycle["6"]["inputs"]["clip"] = ["12", 0]
    cycle["12"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["12", 0], "stop_at_clip_layer": -1}}
    errors = client.post("/prompt", json={"prompt": cycle}).json()["node_errors"]
    assert errors["12"]["errors"][0]["type"] == "dependency_cycle"
    partial = txt2img_workflow(steps=1)  # one good output runs; the bad one is reported
    partial["10"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 5], "filename_prefix": "x"}}
    r = client.post("/prompt", json={"prompt": partial})
    assert r.status_code == 200 and list(r.json()["node_errors"]) == ["10"]
    assert wait_history(client, r.json()["prompt_id"])["status"]["status_str"] == "success"


def test_object_info_describes_the_nodes(client: httpx.Client) -> None:
    info = client.get("/object_info").json()
    expected = {
        "CheckpointLoaderSimple",
        "CLIPTextEncode",
        "CLIPTextEncodeSDXL",
        "CLIPTextEncodeSDXLRefiner",
        "CLIPSetLastLayer",
        "EmptyLatentImage",
        "KSampler",
        "KSamplerAdvanced",
        "VAEDecode",
        "VAEEncode",
        "VAEEncodeForInpaint",
        "SetLatentNoiseMask",
        "VAELoader",
        "LoraLoader",
        "LatentUpscale",
        "ImageScale",
        "UpscaleModelLoader",
        "ImageUpscaleWithModel",
        "LoadImage",
        "LoadImageMask",
        "SaveImage",
        "PreviewImage",
    }
    assert expected <= set(info)  # and the nodes of nodes_core / nodes_controlnet
    assert MODEL in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert info["CheckpointLoaderSimple"]["output"] == ["MODEL", "CLIP", "VAE"]
    assert info["SaveImage"]["output_node"] is True
    assert client.get("/api/object_info/KSampler").json()["KSampler"]["input"]["required"]["steps"] == [
        "INT",
        {"default": 20, "min": 1, "max": 10000, "step": 1},
    ]


# ---------------------------------------------------------------------------------------------
# the queue


def test_queue_cancel_interrupt_and_429(client: httpx.Client) -> None:
    long = client.post("/prompt", json={"prompt": txt2img_workflow(steps=10000, size=64)}).json()["prompt_id"]
    wait_running(client, long)
    waiting = [client.post("/prompt", json={"prompt": txt2img_workflow(prefix=f"q{i}")}) for i in range(4)]
    assert [r.status_code for r in waiting] == [200, 200, 200, 429]  # --max-queue 3
    assert waiting[3].json()["error"]["type"] == "queue_full"
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 429
    queue = client.get("/queue").json()
    assert [q[1] for q in queue["queue_running"]] == [long] and len(queue["queue_pending"]) == 3
    assert client.get("/prompt").json() == {"exec_info": {"queue_remaining": 4}}
    ids = [r.json()["prompt_id"] for r in waiting[:3]]
    status = client.get(f"/sdlab/v1/jobs/{ids[2]}").json()
    assert status["state"] == "pending" and status["queue_position"] == 2
    client.post("/queue", json={"delete": [ids[0]]})
    assert client.post(f"/sdlab/v1/jobs/{ids[1]}/cancel").json()["state"] == "cancelled"
    assert [q[1] for q in client.get("/queue").json()["queue_pending"]] == [ids[2]]
    client.post("/api/interrupt", json={"prompt_id": long})
    entry = wait_history(client, long)
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in dict(
        entry["status"]["messages"]
    )
    assert wait_history(client, ids[2])["status"]["status_str"] == "success"
    assert client.get(f"/history/{ids[0]}").json() == {}  # deleted before it ran: not in the history
    assert client.get(f"/sdlab/v1/jobs/{ids[0]}").json()["state"] == "cancelled"
    assert client.post(f"/sdlab/v1/jobs/{ids[2]}/cancel").status_code == 409
    assert client.get("/sdlab/v1/jobs/nope").status_code == 404


# ---------------------------------------------------------------------------------------------
# paths from requests stay in their folders


def test_view_and_upload_stay_in_their_folders(client: httpx.Client, root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(Image.new("RGB", (4, 4))))
    (root / "outputs" / "out").symlink_to(tmp_path, target_is_directory=True)
    (root / "outputs" / "link.png").symlink_to(secret)
    (root / "input" / "in").symlink_to(tmp_path, target_is_directory=True)
    for params in (
        {"filename": "../state/jobs.sqlite3"},
        {"filename": "jobs.sqlite3", "subfolder": ".."},
        {"filename": "secret.png", "subfolder": "../../" + tmp_path.name},
        {"filename": str(secret)},
        {"filename": "secret.png", "subfolder": str(tmp_path)},
        {"filename": "secret.png", "subfolder": "out"},
        {"filename": "link.png"},
        {"filename": "x.png", "type": "../outputs"},
        {"filename": "a\\..\\b.png"},
    ):
        assert client.get("/view", params=params).status_code == 400, params
    assert client.get("/view", params={"filename": "missing.png"}).status_code == 404
    image = png(Image.new("RGB", (8, 8)))
    for name, data in (
        ("../evil.png", {}),
        ("ok.png", {"subfolder": "../x"}),
        ("ok.png", {"subfolder": "/tmp"}),
        ("ok.png", {"subfolder": "in"}),
        ("ok.png", {"type": "output"}),
    ):
        r = client.post("/upload/image", files={"image": (name, image)}, data=data)
        assert r.status_code == 400, (name, data)
    assert not (root / "evil.png").exists() and not (tmp_path / "ok.png").exists()
    bad = client.post("/upload/image", files={"image": ("x.png", b"not an image")})
    assert bad.status_code == 400
    # uploads never overwrite unless asked; identical bytes reuse the name
    first = client.post("/upload/image", files={"image": ("same.png", image)}).json()["name"]
    other = png(Image.new("RGB", (8, 8), (1, 2, 3)))
    assert client.post("/upload/image", files={"image": ("same.png", image)}).json()["name"] == first
    assert client.post("/upload/image", files={"image": ("same.png", other)}).json()["name"] == "same (1).png"
    forced = client.post("/upload/image", files={"image": ("same.png", other)}, data={"overwrite": "true"})
    assert forced.json()["name"] == "same.png" and (root / "input" / "same.png").read_bytes() == other
    # workflow names are checked the same way
    w = txt2img_workflow()
    w["10"] = {"class_type": "LoadImage", "inputs": {"image": "in/secret.png"}}
    w["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "y"}}
    assert client.post("/prompt", json={"prompt": w}).json()["node_errors"]["10"]["errors"][0]["type"] == (
        "value_not_in_list"
    )
    escape = txt2img_workflow(steps=1, prefix="../escaped")
    entry = wait_history(client, client.post("/prompt", json={"prompt": escape}).json()["prompt_id"])
    assert (
        "outside the output folder"
        in dict(entry["status"]["messages"])["execution_error"]["exception_message"]
    )
    assert not (root / "escaped_00001_.png").exists()


# ---------------------------------------------------------------------------------------------
# authentication


def test_api_key_is_enforced(tmp_path: Path, one_thread: None) -> None:
    settings = Settings(folders(tmp_path, tmp_path / "none"), api_key="s3cret")
    with serving(settings) as base:
        open_routes = ("/sdapi/v1/sd-models", "/queue", "/api/queue", "/", "/view?filename=x.png")
        for path in open_routes:
            r = httpx.get(base + path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
        assert httpx.get(base + "/queue", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(base + "/queue", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(base + "/queue", auth=("anyone", "s3cret")).status_code == 200
        assert httpx.get(base + "/queue", auth=("anyone", "wrong")).status_code == 401
        assert httpx.post(base + "/prompt", json={"prompt": {}}).status_code == 401
        ws = base.replace("http", "ws") + "/ws"
        with pytest.raises(Exception, match="403"):
            connect(ws, open_timeout=5)
        with connect(ws, additional_headers={"Authorization": "Bearer s3cret"}, open_timeout=5) as socket_:
            assert json.loads(socket_.recv(timeout=5))["type"] == "status"
        # a page on another site cannot drive the server, even with the browser's credentials
        cross = {"Authorization": "Bearer s3cret", "Origin": "http://evil.example"}
        assert httpx.post(base + "/prompt", json={}, headers=cross).status_code == 403


def test_cross_site_requests_are_refused(client: httpx.Client, url: str) -> None:
    assert client.get("/queue", headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.get("/queue", headers={"Origin": url}).status_code == 200
    assert client.get("/").text.startswith("<!doctype html>")
