"""The server follows its placement (`sdlab serve --device/--dtype/--offload/--attention`) everywhere: A1111's
/cmd-flags and /options, ComfyUI's /system_stats and the standalone VAEs it loads. No GPU here: a CUDA
machine is stood in for by a patched `torch.cuda` (2 devices), a half-precision one by the meta device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from test_devices import copies  # noqa: F401  (a fixture)
from tiny import TINY, tiny_checkpoint, write_tiny

from sdlab import offload
from sdlab.checkpoints.io import write_safetensors
from sdlab.devices import Placement
from sdlab.models.ops import compute_dtype
from sdlab.server.app import create_app
from sdlab.server.library import Library, ModelCache
from sdlab.server.paths import Folders
from sdlab.server.state import Settings
from sdlab.vae_tools import decode_pixels, load_vae

CUDA_MEMORY = {"free": 60 << 30, "total": 140 << 30, "reserved": 6 << 30, "active": 4 << 30}


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CUDA devices as torch reports them (names, memory), without bfloat16."""
    m = CUDA_MEMORY
    for name, value in {
        "is_available": lambda: True,
        "device_count": lambda: 2,
        "current_device": lambda: 0,
        "is_bf16_supported": lambda: False,
        "get_device_name": lambda device=None: "NVIDIA H200",
        "get_allocator_backend": lambda: "native",
        "mem_get_info": lambda device=None: (m["free"], m["total"]),
        "memory_stats": lambda device=None: {
            "reserved_bytes.all.current": m["reserved"],
            "active_bytes.all.current": m["active"],
            "reserved_bytes.all.peak": m["reserved"] + 1,
            "active_bytes.all.peak": m["active"] + 2,
            "allocated_bytes.all.current": m["active"] - 3,
            "allocated_bytes.all.peak": m["active"] + 4,
            "inactive_split_bytes.all.current": 5,
            "inactive_split_bytes.all.peak": 6,
            "num_alloc_retries": 7,
            "num_ooms": 8,
        },
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """serve(placement) -> a client of a server placed so, models in tmp_path/models (closed at the end)."""
    folders = Folders(tmp_path / "models", tmp_path / "outputs", tmp_path / "input", tmp_path / "state")
    with ExitStack() as stack:

        def start(placement: Placement) -> TestClient:
            app = create_app(Settings(folders, placement=placement))
            return stack.enter_context(TestClient(app, base_url="http://127.0.0.1"))

        yield start


NOT_ATTENTION = {
    "opt_sdp_attention": False,
    "opt_split_attention": False,
    "disable_opt_split_attention": False,
}


@pytest.mark.parametrize(
    ("placement", "flags"),
    [
        (  # what `auto` chooses on a machine without a GPU
            Placement("cpu", "auto"),
            {"no_half": True, "no_half_vae": False, "precision": "full", "lowvram": False, "medvram": False}
            | {"use_cpu": ["all"], "device_id": None, **NOT_ATTENTION, "opt_sdp_attention": True},
        ),
        (
            Placement("cuda:1", "fp16", offload="sequential", attention="sliced"),
            {
                "no_half": False,
                "no_half_vae": False,
                "precision": "autocast",
                "lowvram": True,
                "medvram": False,
            }
            | {"use_cpu": [], "device_id": "1", **NOT_ATTENTION, "opt_split_attention": True},
        ),
        (
            Placement("cuda", "auto", offload="model", attention="math"),
            {"no_half": False, "no_half_vae": False, "lowvram": False, "medvram": True, "medvram_sdxl": False}
            | {"use_cpu": [], "device_id": None, **NOT_ATTENTION, "disable_opt_split_attention": True},
        ),
    ],
)
def test_a1111_flags_follow_the_placement(serve, fake_cuda, placement: Placement, flags: dict) -> None:
    got = serve(placement).get("/sdapi/v1/cmd-flags").json()
    assert {k: got[k] for k in flags} == flags
    assert got["api"] is True and "ckpt_dir" in got


def test_a1111_no_half_vae_follows_the_loaded_family(serve, tmp_path: Path) -> None:
    """`--dtype auto` on a half-precision device keeps SDXL's VAE in float32 (A1111's --no-half-vae) once an
    SDXL model is loaded, not for SD1 (the meta device stands in for a GPU: auto is float16 there)."""
    write_tiny("sdxl", tmp_path / "models" / "xl.safetensors")
    client = serve(Placement("meta", "auto", offload="sequential"))  # weights held on the CPU
    assert client.get("/sdapi/v1/cmd-flags").json()["no_half_vae"] is False  # SD1's rule before a model
    server = client.app.state.server  # type: ignore[attr-defined]
    model = server.models.model("xl.safetensors")
    assert compute_dtype(model.unet) == torch.float16 and compute_dtype(model.vae) == torch.float32
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert (flags["no_half"], flags["no_half_vae"], flags["use_cpu"]) == (False, True, [])


def test_a1111_options_show_the_placement_and_refuse_other_values(serve) -> None:
    client = serve(Placement("cpu", "fp32", attention="sliced"))
    options = client.get("/sdapi/v1/options").json()
    shown = {k: options[k] for k in ("cross_attention_optimization", "randn_source", "auto_vae_precision")}
    assert shown == {
        "cross_attention_optimization": "Doggettx",
        "randn_source": "CPU",
        "auto_vae_precision": True,
    }
    assert client.post("/sdapi/v1/options", json=shown).status_code == 200  # the values it runs with: fine
    refused = client.post(
        "/sdapi/v1/options", json={"cross_attention_optimization": "sdp", "samples_save": 1}
    )
    assert refused.status_code == 422
    assert "cross_attention_optimization = 'sdp' (sdlab runs with 'Doggettx')" in refused.json()["detail"]
    assert "samples_save" not in client.get("/sdapi/v1/options").json()  # nothing of it was stored
    assert client.post("/sdapi/v1/options", json={"randn_source": "GPU"}).status_code == 422


def test_comfy_system_stats_report_the_placement_device(serve, fake_cuda) -> None:
    """ComfyUI's /system_stats: the CPU as ComfyUI lists it (its RAM as VRAM), a CUDA device named and
    measured as model_management does (free = the driver's free + torch's reserved but inactive)."""
    cpu = serve(Placement("cpu")).get("/system_stats").json()
    ram = cpu["system"]["ram_total"], cpu["system"]["ram_free"]
    (device,) = cpu["devices"]
    assert {k: device[k] for k in ("name", "type", "index")} == {"name": "cpu", "type": "cpu", "index": None}
    assert (device["vram_total"], device["torch_vram_total"]) == (ram[0], ram[0])
    assert 0 < device["vram_free"] == device["torch_vram_free"] <= ram[0]
    m = CUDA_MEMORY
    for placement, index in ((Placement("cuda:1", "fp16"), 1), (Placement("auto"), 0)):
        (device,) = serve(placement).get("/api/system_stats").json()["devices"]
        assert device == {
            "name": f"cuda:{index} NVIDIA H200 : native",
            "type": "cuda",
            "index": index,
            "vram_total": m["total"],
            "vram_free": m["free"] + m["reserved"] - m["active"],
            "torch_vram_total": m["reserved"],
            "torch_vram_free": m["reserved"] - m["active"],
        }


def test_a1111_memory_reports_the_placement_cuda_device(serve, fake_cuda) -> None:
    """A1111's /sdapi/v1/memory: the CUDA device's memory in A1111's shape (the driver's free/used/total,
    the allocator's current and peak counters, retries and OOMs); on the CPU `cuda` is unavailable."""
    assert serve(Placement("cpu")).get("/sdapi/v1/memory").json()["cuda"] == {"error": "unavailable"}
    m = CUDA_MEMORY
    cuda = serve(Placement("cuda:1", "fp16")).get("/sdapi/v1/memory").json()["cuda"]
    assert cuda == {
        "system": {"free": m["free"], "used": m["total"] - m["free"], "total": m["total"]},
        "active": {"current": m["active"], "peak": m["active"] + 2},
        "allocated": {"current": m["active"] - 3, "peak": m["active"] + 4},
        "reserved": {"current": m["reserved"], "peak": m["reserved"] + 1},
        "inactive": {"current": 5, "peak": 6},
        "events": {"retries": 7, "oom": 8},
    }


@pytest.fixture
def vae_library(tmp_path: Path) -> Library:
    """A models folder holding one standalone VAE, stored in float16."""
    sd = tiny_checkpoint(TINY["sd1"]).vae
    write_safetensors({k: v.half() for k, v in sd.items()}, tmp_path / "VAE" / "tiny-vae.safetensors")
    return Library(tmp_path)


LATENTS = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))


def _decoded(placement: Placement, library: Library) -> tuple[torch.nn.Module, torch.Tensor]:
    vae = ModelCache(library, placement=placement).vae("tiny-vae")
    return vae, decode_pixels(vae, LATENTS)


def test_standalone_vae_follows_the_placement(vae_library: Library) -> None:
    """ComfyUI's VAELoader / A1111's sd_vae load standalone VAEs as the server's models: `--dtype auto` on
    the CPU keeps the file's float16 weights and computes in float32 (the same bits as float32 weights),
    bf16 computes in bfloat16 (the weights still the file's; within bfloat16's error of float32),
    --attention reaches the VAE's layers."""
    exact = decode_pixels(load_vae(vae=vae_library.vaes()["tiny-vae.safetensors"]), LATENTS)
    vae, out = _decoded(Placement("cpu", "auto"), vae_library)
    assert {p.dtype for p in vae.parameters()} == {torch.float16} and compute_dtype(vae) == torch.float32
    assert torch.equal(out, exact)
    vae, out = _decoded(Placement("cpu", "bf16", attention="math"), vae_library)
    assert {p.dtype for p in vae.parameters()} == {torch.float16} and compute_dtype(vae) == torch.bfloat16
    assert {m.attention_impl for m in vae.modules() if hasattr(m, "attention_impl")} == {"math"}
    mse = float(((out - exact) ** 2).mean())
    assert 0 < mse and 30 <= 10 * torch.log10(torch.tensor(4 / mse)) < 100  # pixels in [-1, 1]


def test_standalone_vae_is_offloaded(vae_library: Library, copies: set[int]) -> None:  # noqa: F811
    """`--offload model`: the VAE's weights stay on the CPU and come to the device while it decodes."""
    exact = decode_pixels(load_vae(vae=vae_library.vaes()["tiny-vae.safetensors"]), LATENTS)
    ran: list[bool] = []
    vae = ModelCache(vae_library, placement=Placement("cpu", "fp32", offload="model")).vae("tiny-vae")
    assert not any(p.data_ptr() in copies for p in vae.parameters())
    vae.decoder.conv_in.register_forward_hook(
        lambda *_: ran.append(vae.decoder.conv_in.weight.data_ptr() in copies)
    )
    assert torch.equal(decode_pixels(vae, LATENTS), exact)
    assert ran == [True] and offload.on_device(torch.device("cpu")) is vae
