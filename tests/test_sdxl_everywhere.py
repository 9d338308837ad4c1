"""SDXL end to end on tiny models: the AUTOMATIC1111 API (base and refiner), ComfyUI graphs
(CLIPTextEncodeSDXL, base -> refiner with KSamplerAdvanced, LoraLoader), live previews with the SDXL
latent->RGB factors, kohya SDXL LoRAs (merging and `sdlab train lora`) and the web UI.

Images made by the servers are compared with what `sdlab.pipeline` computes directly for the same
request: the same code on the same weights with torch on one thread is bit-exact, so the pixels must
be equal.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_server_api import folders, serving, unb64, wait_history, ws_messages
from tiny import write_tiny

from sdlab import families, lora
from sdlab.checkpoints.io import read_metadata
from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.conditioning import Conditioning, encode_text
from sdlab.diffusion.denoiser import add_noise
from sdlab.images import to_pil
from sdlab.infotext import model_hash, parse_infotext
from sdlab.models.unet import timestep_embedding
from sdlab.pipeline import GenerationRequest, Guidance, generate, sample, sampling_sigmas, seed_noise
from sdlab.server.preview import latent_preview
from sdlab.server.state import Settings
from sdlab.train.cli import add_train_parser
from sdlab.vae_tools import decode_pixels

XL, REFINER, SD1 = "xl.safetensors", "xl-refiner.safetensors", "sd1.safetensors"
XL_LORA = "xl-style.safetensors"


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; and server and direct runs then compute alike
    yield
    torch.set_num_threads(threads)


def random_lora(targets: dict[str, torch.nn.Module], seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    """A kohya LoRA with seeded non-zero down and up weights on every target (alpha = rank)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, layer in targets.items():
        fan_in = layer.weight[0].numel()
        sd[f"{name}.lora_down.weight"] = (
            torch.randn(rank, *layer.weight.shape[1:], generator=gen) / fan_in**0.5
        )
        sd[f"{name}.lora_up.weight"] = (
            torch.randn(layer.weight.shape[0], rank, *([1] * (layer.weight.ndim - 2)), generator=gen) * 0.5
        )
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return sd


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder: the tiny SDXL base and refiner, a tiny SD1 model and a kohya LoRA for SDXL."""
    folder = tmp_path_factory.mktemp("sdxl-server") / "models"
    (folder / "Lora").mkdir(parents=True)
    write_tiny("sdxl", folder / XL)
    write_tiny("sdxl-refiner", folder / REFINER, seed=10)
    write_tiny("sd1", folder / SD1)
    xl = load_model(folder / XL)
    lora.save_lora(
        random_lora(lora.training_targets(xl.unet, xl.text_encoders, xl.family), seed=5),
        folder / "Lora" / XL_LORA,
    )
    return folder


@pytest.fixture(scope="module")
def loaded(models: Path) -> dict[str, StableDiffusion]:
    """The models as `load_model` gives them, for direct computations (never modified)."""
    return {name: load_model(models / name) for name in (XL, REFINER)}


@pytest.fixture(scope="module")
def url(models: Path, one_thread: None) -> Iterator[str]:
    with serving(Settings(folders(models.parent, models), preview_method="latent2rgb")) as base:  # previews
        yield base


@pytest.fixture
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c
        c.post("/queue", json={"clear": True})
        c.post("/interrupt")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def viewed(client: httpx.Client, entry: dict[str, Any], node: str) -> Image.Image:
    """The image an output node of a finished ComfyUI prompt saved."""
    assert entry["status"]["status_str"] == "success", entry["status"]
    ref = entry["outputs"][node]["images"][0]
    return Image.open(io.BytesIO(client.get("/view", params=ref).content))


def run_prompt(client: httpx.Client, workflow: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/prompt", json={"prompt": workflow})
    assert r.status_code == 200, r.text
    return wait_history(client, r.json()["prompt_id"])


# ---------------------------------------------------------------------------------------------
# AUTOMATIC1111 API

A1111_BODY = {
    "prompt": "a red apple",
    "negative_prompt": "blurry",
    "steps": 4,
    "cfg_scale": 5,
    "width": 32,
    "height": 48,  # not square: a swapped height/width in the size conditioning would show
    "seed": 21,
    "sampler_name": "Euler",
    "scheduler": "Karras",
    "override_settings": {"sd_model_checkpoint": "xl"},
}
DIRECT = GenerationRequest(
    "a red apple",
    "blurry",
    width=32,
    height=48,
    steps=4,
    cfg_scale=5,
    sampler="euler",
    scheduler="karras",
    seed=21,
)


def test_a1111_txt2img_sdxl_base_and_refiner_equal_generate(
    client: httpx.Client, models: Path, loaded: dict[str, StableDiffusion]
) -> None:
    r = client.post("/sdapi/v1/txt2img", json=A1111_BODY)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    image = unb64(r.json()["images"][0])
    assert image.format == "PNG" and image.size == (32, 48)
    params = parse_infotext(image.info["parameters"])
    assert params["Model"] == "xl" and params["Model hash"] == model_hash(models / XL)
    assert (params["Size"], params["Seed"], params["Sampler"], params["Schedule type"]) == (
        "32x48",
        "21",
        "Euler",
        "Karras",
    )
    assert "Refiner" not in params and info["sd_model_name"] == "xl"
    base = generate(loaded[XL], DIRECT)
    assert np.array_equal(pixels(image), pixels(base.images[0]))

    refined = client.post(
        "/sdapi/v1/txt2img", json=A1111_BODY | {"refiner_checkpoint": "xl-refiner", "refiner_switch_at": 0.5}
    )
    assert refined.status_code == 200, refined.text
    with_refiner = unb64(refined.json()["images"][0])
    params = parse_infotext(with_refiner.info["parameters"])
    assert params["Refiner"] == f"xl-refiner [{model_hash(models / REFINER)}]"
    assert params["Refiner switch at"] == "0.5" and params["Model"] == "xl"
    assert json.loads(refined.json()["info"])["infotexts"][0] == with_refiner.info["parameters"]
    assert with_refiner.size == (32, 48)
    assert np.abs(pixels(with_refiner) - pixels(image)).mean() > 0.5
    # not only the refiner's VAE: the refiner sampled part of the way
    base_latents_by_refiner_vae = decoded(loaded[REFINER], base.latents)
    assert np.abs(pixels(with_refiner) - pixels(base_latents_by_refiner_vae)).mean() > 0.5
    req = replace(DIRECT, refiner="xl-refiner", refiner_switch_at=0.5)
    direct = generate(loaded[XL], req, refiner=loaded[REFINER]).images[0]
    assert np.array_equal(pixels(with_refiner), pixels(direct))


def test_a1111_refiner_errors(client: httpx.Client) -> None:
    unknown = client.post(
        "/sdapi/v1/txt2img",
        json=A1111_BODY | {"refiner_checkpoint": "no-such-refiner", "refiner_switch_at": 0.5},
    )
    assert unknown.status_code == 404 and "no-such-refiner" in unknown.json()["detail"]
    too_late = client.post(
        "/sdapi/v1/txt2img", json=A1111_BODY | {"refiner_checkpoint": "xl-refiner", "refiner_switch_at": 1.5}
    )
    assert too_late.status_code == 422 and "refiner_switch_at" in too_late.json()["detail"]


def test_a1111_progress_previews_a_running_sdxl_job(client: httpx.Client) -> None:
    responses: list[httpx.Response] = []
    body = A1111_BODY | {"steps": 1000, "width": 48, "height": 32}
    worker = threading.Thread(target=lambda: responses.append(client.post("/sdapi/v1/txt2img", json=body)))
    worker.start()
    progress: dict[str, Any] = {}
    deadline = time.time() + 60
    while time.time() < deadline:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] > 1 and progress["current_image"]:
            break
        time.sleep(0.05)
    client.post("/sdapi/v1/interrupt")
    worker.join(60)
    assert progress["current_image"] is not None and progress["state"]["sampling_steps"] == 1000
    assert unb64(progress["current_image"]).size == (24, 16)  # the latent's size (tiny VAE: /2)
    assert responses[0].status_code == 200 and len(responses[0].json()["images"]) == 1  # as far as it got


# ---------------------------------------------------------------------------------------------
# live preview factors


def test_latent_preview_uses_the_sdxl_matrix_and_bias() -> None:
    latents = torch.zeros(2, 4, 3, 5)
    latents[0, :, 1, 2] = torch.tensor([0.5, -1.0, 2.0, 0.25])
    latents[1] = 7.0  # only the first image of a batch is previewed
    image = latent_preview(latents, families.SDXL.latent)
    assert image is not None and image.size == (5, 3)
    # ComfyUI's SDXL latent_rgb_factors (rows: latent channels) and latent_rgb_factors_bias, by hand
    r = 0.5 * 0.3651 - 1.0 * -0.2533 + 2.0 * 0.1076 + 0.25 * -0.3165 + 0.1084
    g = 0.5 * 0.4232 - 1.0 * -0.0042 + 2.0 * 0.1111 + 0.25 * -0.2492 - 0.0175
    b = 0.5 * 0.4341 - 1.0 * 0.1068 + 2.0 * -0.0362 + 0.25 * -0.2188 - 0.0011
    expected = tuple(round(min(max((v + 1) / 2, 0), 1) * 255) for v in (r, g, b))
    assert expected == (214, 173, 125)
    assert image.getpixel((2, 1)) == expected
    assert image.getpixel((0, 0)) == tuple(round((v + 1) / 2 * 255) for v in (0.1084, -0.0175, -0.0011))
    assert latent_preview(latents, families.SD1.latent).getpixel((2, 1)) != expected  # SD's own factors
    assert latent_preview(latents[:, :3], families.SDXL.latent) is None
    assert latent_preview(latents, None) is None


# ---------------------------------------------------------------------------------------------
# ComfyUI API

SIZES = {"width": 96, "height": 64, "crop_w": 8, "crop_h": 4, "target_width": 32, "target_height": 48}


def sdxl_workflow(
    target: tuple[int, int] = (32, 48), text_g: str = "a red apple", text_l: str = "oil paint"
) -> dict:
    """CheckpointLoaderSimple(SDXL) -> CLIPTextEncodeSDXL (+ and -) -> KSampler -> VAEDecode -> SaveImage."""
    sizes = SIZES | {"target_width": target[0], "target_height": target[1]}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": XL}},
        "2": {
            "class_type": "CLIPTextEncodeSDXL",
            "inputs": {"clip": ["1", 1], "text_g": text_g, "text_l": text_l, **sizes},
        },
        "3": {
            "class_type": "CLIPTextEncodeSDXL",
            "inputs": {"clip": ["1", 1], "text_g": "blurry", "text_l": "blurry", **sizes},
        },
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 48, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": 7,
                "steps": 4,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "xl"}},
    }


def sdxl_conditioning(model: StableDiffusion, text_l: str, text_g: str) -> Conditioning:
    """What CLIPTextEncodeSDXL makes of SIZES: ComfyUI's (height, width) order in each pair."""
    cond = encode_text(model, [text_l, text_g])  # the model's encoders in order: CLIP-L, then bigG
    return replace(cond, original_size=(64, 96), crop=(4, 8), target_size=(48, 32))


def direct_latents(
    model: StableDiffusion, pos: Conditioning, neg: Conditioning, sigmas: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    with torch.inference_mode():
        return sample(model, x, sigmas, Guidance(pos, neg, 5.0), "euler", [7])


def decoded(model: StableDiffusion, latents: torch.Tensor) -> Image.Image:
    with torch.inference_mode():
        return to_pil(decode_pixels(model.vae, latents))[0]


def test_comfy_clip_text_encode_sdxl_graph_equals_direct_sampling(
    client: httpx.Client, url: str, loaded: dict[str, StableDiffusion]
) -> None:
    box: list[str] = []

    def submit() -> None:
        r = client.post("/prompt", json={"prompt": sdxl_workflow(), "client_id": "xl"})
        assert r.status_code == 200, r.text
        box.append(r.json()["prompt_id"])

    messages = ws_messages(url, "xl", box, submit)
    image = viewed(client, wait_history(client, box[0]), "7")
    assert image.size == (32, 48)

    model = loaded[XL]
    pos, neg = (
        sdxl_conditioning(model, "oil paint", "a red apple"),
        sdxl_conditioning(model, "blurry", "blurry"),
    )
    # y = pooled ‖ 256-wide embeddings of (orig h, orig w, crop top, crop left, target h, target w)
    sizes = torch.tensor([64.0, 96.0, 4.0, 8.0, 48.0, 32.0])
    y = torch.cat([pos.pooled, timestep_embedding(sizes, 256).reshape(1, -1)], dim=1)
    assert torch.equal(pos.vector(model.family, 48, 32), y)
    sigmas = sampling_sigmas(model, "euler", "normal", 4)
    x = add_noise(torch.zeros(1, 4, 24, 16), seed_noise([7], (4, 24, 16)), sigmas[:1])
    latents = direct_latents(model, pos, neg, sigmas, x)
    assert np.array_equal(pixels(image), pixels(decoded(model, latents)))
    swapped = direct_latents(model, sdxl_conditioning(model, "a red apple", "oil paint"), neg, sigmas, x)
    assert not torch.equal(swapped, latents)  # text_l and text_g reach different encoders

    # the live previews of the job: the last one is the final latents through the SDXL factors
    frames = [m for m in messages if isinstance(m, bytes)]
    assert len(frames) == 4
    last = pixels(Image.open(io.BytesIO(frames[-1][8:])))
    assert last.shape == (24, 16, 3)
    assert np.abs(last - pixels(latent_preview(latents, families.SDXL.latent))).max() <= 1
    assert np.abs(last - pixels(latent_preview(latents, families.SD1.latent))).max() > 1

    again = viewed(client, run_prompt(client, sdxl_workflow()), "7")
    assert np.array_equal(pixels(again), pixels(image))  # deterministic
    other_target = viewed(client, run_prompt(client, sdxl_workflow(target=(48, 32))), "7")
    assert not np.array_equal(pixels(other_target), pixels(image))  # the size conditioning is honoured


def test_comfy_base_to_refiner_graph(client: httpx.Client, loaded: dict[str, StableDiffusion]) -> None:
    workflow = sdxl_workflow()
    advanced = {
        "noise_seed": 7,
        "steps": 6,
        "cfg": 5.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "end_at_step": 10000,
    }
    refiner_text = {"width": 96, "height": 64, "clip": ["11", 1]}
    workflow |= {
        "11": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": REFINER}},
        "12": {
            "class_type": "CLIPTextEncodeSDXLRefiner",
            "inputs": {"ascore": 6.0, "text": "a red apple", **refiner_text},
        },
        "13": {
            "class_type": "CLIPTextEncodeSDXLRefiner",
            "inputs": {"ascore": 2.5, "text": "blurry", **refiner_text},
        },
        "5": {
            "class_type": "KSamplerAdvanced",
            "inputs": advanced
            | {
                "model": ["1", 0],
                "add_noise": "enable",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "start_at_step": 0,
                "end_at_step": 4,
                "return_with_leftover_noise": "enable",
            },
        },
        "15": {
            "class_type": "KSamplerAdvanced",
            "inputs": advanced
            | {
                "model": ["11", 0],
                "add_noise": "disable",
                "positive": ["12", 0],
                "negative": ["13", 0],
                "latent_image": ["5", 0],
                "start_at_step": 4,
                "return_with_leftover_noise": "disable",
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["11", 2]}},
    }
    image = viewed(client, run_prompt(client, workflow), "7")
    assert image.size == (32, 48)

    base, refiner = loaded[XL], loaded[REFINER]
    pos, neg = (
        sdxl_conditioning(base, "oil paint", "a red apple"),
        sdxl_conditioning(base, "blurry", "blurry"),
    )
    sigmas = sampling_sigmas(base, "euler", "normal", 6)
    x = add_noise(torch.zeros(1, 4, 24, 16), seed_noise([7], (4, 24, 16)), sigmas[:1])
    noisy = direct_latents(base, pos, neg, sigmas[:5], x)  # steps 0..4, the noise of σ_4 left in
    r_pos, r_neg = (
        replace(encode_text(refiner, text), original_size=(64, 96), aesthetic_score=score)
        for text, score in (("a red apple", 6.0), ("blurry", 2.5))
    )
    assert r_pos.vector(refiner.family, 48, 32).shape == (1, 128 + 5 * 256)
    refined = direct_latents(refiner, r_pos, r_neg, sampling_sigmas(refiner, "euler", "normal", 6)[4:], noisy)
    assert np.array_equal(pixels(image), pixels(decoded(refiner, refined)))
    base_only = direct_latents(base, pos, neg, sigmas, x)
    assert np.abs(pixels(image) - pixels(decoded(refiner, base_only))).mean() > 0.5


def test_comfy_sdxl_nodes_on_the_wrong_model_are_node_errors(client: httpx.Client) -> None:
    on_sd1 = sdxl_workflow()
    on_sd1["1"]["inputs"]["ckpt_name"] = SD1
    entry = run_prompt(client, on_sd1)
    assert entry["status"]["status_str"] == "error"
    error = dict(entry["status"]["messages"])["execution_error"]
    assert error["node_id"] in ("2", "3") and error["node_type"] == "CLIPTextEncodeSDXL"
    assert (
        "CLIPTextEncodeSDXL" in error["exception_message"]
        and "Stable Diffusion 1.x" in error["exception_message"]
    )
    refiner_node_on_base = sdxl_workflow()
    refiner_node_on_base["2"] = {
        "class_type": "CLIPTextEncodeSDXLRefiner",
        "inputs": {"ascore": 6.0, "width": 32, "height": 32, "text": "x", "clip": ["1", 1]},
    }
    error = dict(run_prompt(client, refiner_node_on_base)["status"]["messages"])["execution_error"]
    assert error["node_id"] == "2" and "aesthetic_score" in error["exception_message"]
    base_node_on_refiner = sdxl_workflow()  # the refiner has no CLIP-L for text_l, no target size
    base_node_on_refiner["1"]["inputs"]["ckpt_name"] = REFINER
    error = dict(run_prompt(client, base_node_on_refiner)["status"]["messages"])["execution_error"]
    assert "target_size" in error["exception_message"] and "refiner" in error["exception_message"]


def test_comfy_lora_loader_on_sdxl(client: httpx.Client, models: Path) -> None:
    workflow = sdxl_workflow()
    workflow["10"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "lora_name": XL_LORA,
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    }
    workflow["5"]["inputs"]["model"] = ["10", 0]
    workflow["2"]["inputs"]["clip"] = workflow["3"]["inputs"]["clip"] = ["10", 1]
    with_lora = viewed(client, run_prompt(client, workflow), "7")
    plain = viewed(client, run_prompt(client, sdxl_workflow()), "7")
    assert np.abs(pixels(with_lora) - pixels(plain)).mean() > 0.5

    model = load_model(models / XL)
    with lora.apply_lora(model, models / "Lora" / XL_LORA) as merged:
        assert not merged.unmatched
        pos, neg = (
            sdxl_conditioning(model, "oil paint", "a red apple"),
            sdxl_conditioning(model, "blurry", "blurry"),
        )
        sigmas = sampling_sigmas(model, "euler", "normal", 4)
        x = add_noise(torch.zeros(1, 4, 24, 16), seed_noise([7], (4, 24, 16)), sigmas[:1])
        expected = decoded(model, direct_latents(model, pos, neg, sigmas, x))
    assert np.array_equal(pixels(with_lora), pixels(expected))


# ---------------------------------------------------------------------------------------------
# LoRA


def outputs(model: StableDiffusion) -> list[torch.Tensor]:
    """Each text encoder's penultimate hidden states and pooled output, and the U-Net's output."""
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 3])
    out = []
    with torch.no_grad():
        for encoder, spec in zip(model.text_encoders, model.family.text, strict=True):
            pad = ids.clone()
            pad[0, 4:] = encoder.cfg.pad_token
            out += list(encoder.encode(pad, 2, spec.final_norm))
        g = torch.Generator().manual_seed(3)
        x = torch.randn(1, 4, 16, 16, generator=g)
        context = torch.randn(1, 7, model.config.unet.context_dim, generator=g)
        y = torch.randn(1, model.config.unet.adm_in_channels, generator=g)
        out.append(model.unet(x, torch.tensor([500.0]), context, y))
    return out


def test_kohya_sdxl_lora_merges_into_both_encoders_and_the_unet_and_restores(models: Path) -> None:
    model = load_model(models / XL)
    targets = lora.training_targets(model.unet, model.text_encoders, model.family)
    names = set(targets)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_k" in names
    assert "lora_unet_middle_block_1_proj_in" in names
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_")) for n in names)
    sd = random_lora(targets, seed=1)
    weights = {k: v.clone() for k, v in model.unet.state_dict().items()}
    weights |= {
        f"te{i}.{k}": v.clone() for i, e in enumerate(model.text_encoders) for k, v in e.state_dict().items()
    }
    before = outputs(model)

    merged = lora.apply_lora(model, sd)
    assert not merged.unmatched and sorted(merged.applied) == sorted(names)
    after = outputs(model)
    labels = ["CLIP-L hidden", "CLIP-L pooled", "bigG hidden", "bigG pooled", "U-Net"]
    changed = [
        label
        for label, a, b in zip(labels, before, after, strict=True)
        if not torch.allclose(a, b, atol=1e-3)
    ]
    # CLIP-L's pooled output is not used by SDXL but its last layer is LoRA'd too: all five change
    assert changed == labels

    merged.restore()
    restored = {k: v for k, v in model.unet.state_dict().items()}
    restored |= {
        f"te{i}.{k}": v for i, e in enumerate(model.text_encoders) for k, v in e.state_dict().items()
    }
    assert restored.keys() == weights.keys() and all(torch.equal(restored[k], weights[k]) for k in weights)
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), before, strict=True))


def test_sdlab_train_lora_on_sdxl_writes_ldm_and_two_encoder_names(
    models: Path, tmp_path: Path, one_thread: None
) -> None:
    parser = argparse.ArgumentParser(prog="sdlab")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    argv = [
        "train",
        "lora",
        "--model",
        str(models / XL),
        "--out",
        str(tmp_path / "run"),
        "--resolution",
        "32",
    ]
    argv += ["--steps", "2", "--batch-size", "2", "--rank", "2", "--lr", "1e-2", "--train-text-encoder"]
    args = parser.parse_args([*argv, "--no-progress", "--log-every", "1"])
    assert args.func(args) == 0
    path = tmp_path / "run" / "lora.safetensors"
    sd = lora.read_lora(path)
    modules = {k.partition(".")[0] for k in sd}
    for prefix in (
        "lora_unet_input_blocks_",
        "lora_unet_middle_block_",
        "lora_unet_output_blocks_",
        "lora_te1_",
        "lora_te2_",
    ):
        trained = [m for m in modules if m.startswith(prefix) and sd[f"{m}.lora_up.weight"].any()]
        assert trained, f"no trained {prefix}* module"
    assert not any(
        m.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_")) for m in modules
    )
    meta = read_metadata(path)
    assert meta["ss_network_dim"] == "2" and meta["sdlab.base_model"] == "xl"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))

    model = load_model(models / XL)
    before = outputs(model)
    with lora.apply_lora(model, path) as merged:
        assert not merged.unmatched and len(merged.applied) == len(modules)
        after = outputs(model)
    assert not torch.equal(after[-1], before[-1])  # the U-Net
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])  # both encoders
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), before, strict=True))


# ---------------------------------------------------------------------------------------------
# the web UI


def test_webui_generates_with_the_sdxl_model(
    browser: Any, url: str, loaded: dict[str, StableDiffusion]
) -> None:
    from test_webui import Traffic, decode, expect

    traffic = Traffic()
    page = browser.new_page()
    page.route("**/*", traffic.route)
    page.on("console", traffic.console)
    page.on("pageerror", lambda error: traffic.errors.append(str(error)))
    page.set_default_timeout(30_000)
    try:
        page.goto(url)
        expect(page.locator("#model option")).not_to_have_count(0)
        page.select_option("#model", label="xl")
        for field, value in (("#width", 64), ("#height", 72), ("#steps", 3), ("#seed", 99)):
            page.fill(field, str(value))
        page.fill("#prompt", "a green pear")
        page.get_by_role("button", name="Generate").click()
        card = page.locator("#gallery .card")
        expect(card).to_have_count(1)
        expect(card.locator("pre")).to_contain_text("Model: xl")
        image = decode(card.locator("img").get_attribute("src"))
    finally:
        page.close()
    assert traffic.offsite == [] and traffic.errors == []
    body = traffic.last_post("/sdapi/v1/txt2img")
    assert body["override_settings"]["sd_model_checkpoint"].startswith(XL)
    assert image.size == (64, 72)
    req = GenerationRequest(
        body["prompt"],
        body["negative_prompt"],
        width=64,
        height=72,
        steps=3,
        cfg_scale=body["cfg_scale"],
        sampler=body["sampler_name"],
        scheduler=body["scheduler"],
        seed=99,
    )
    assert np.array_equal(pixels(image), pixels(generate(loaded[XL], req).images[0]))
