"""Hostile requests and faults: JSON bodies bounded in size and depth on every route, ComfyUI graphs
bounded in size and never recursed on, cycles refused, A1111 steps / batch / iterations bounded (each a
4xx naming the limit); NaN and Inf caught at load, after a LoRA merge and after each generation stage,
named with their likely cause (never a black image); an exception or out-of-memory inside one job fails
that job with its reason (A1111 response, ComfyUI history) and the next job runs."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import hypothesis.strategies as st
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from starlette.testclient import TestClient
from test_server_api import MODEL, folders, serving, txt2img_workflow, wait_history, write_models

from sdlab.checkpoints.io import CheckpointError
from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.finite import NonFiniteError, overflow_cause
from sdlab.lora import LoRAError, apply_lora, layer_map, save_lora
from sdlab.networks import lora_tags
from sdlab.pipeline import GenerationRequest, generate
from sdlab.server import graph
from sdlab.server.bodies import MAX_JSON_DEPTH, BodyLimits, json_depth
from sdlab.server.jobs import DONE, FAILED, JobStore, Outcome, Worker
from sdlab.server.library import Library, ModelCache
from sdlab.server.nodes import Env
from sdlab.server.state import Settings
from sdlab.text.schedule import PromptError

OVERFLOW = "overflow.safetensors"  # a checkpoint whose VAE decoder overflows float32 (finite weights)


def altered(
    source: Path, path: Path, key: str, value: float = 3e38, index: slice | int = slice(None)
) -> Path:
    """A copy of a checkpoint with tensor `key` (at `index`) set to `value` (default: huge but finite)."""
    tensors = load_file(source)
    tensors[key] = tensors[key].clone()
    tensors[key][index] = value
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    models = write_models(root)
    altered(models / MODEL, models / OVERFLOW, "first_stage_model.decoder.conv_out.weight")
    return root


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[httpx.Client]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with (
        serving(Settings(folders(root, root / "models"))) as base,
        httpx.Client(base_url=base, timeout=120) as c,
    ):
        c.post("/sdapi/v1/options", json={"sd_model_checkpoint": MODEL})
        yield c
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# bodies and graphs

JSON_ROUTES = (
    "/prompt",
    "/api/prompt",
    "/queue",
    "/interrupt",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    "/sdapi/v1/options",
    "/sdapi/v1/png-info",
)


def test_deeply_nested_json_is_refused_on_every_route(client: httpx.Client) -> None:
    for path in JSON_ROUTES:
        for content_type in ("application/json", "text/plain", ""):
            r = client.post(path, content="[" * 100_000, headers={"Content-Type": content_type})
            assert r.status_code == 400, (path, r.text)
            assert "100000 levels deep" in r.json()["detail"] and "MAX_JSON_DEPTH" in r.json()["detail"]
    for path in ("/prompt", "/queue"):  # ComfyUI's routes read JSON whatever the content type says
        r = client.post(path, content="[" * 100_000, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 400 and "MAX_JSON_DEPTH" in r.json()["detail"]
    deep_ok = {"note": json.loads("[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1))}
    assert client.post("/sdapi/v1/options", json=deep_ok).status_code == 200  # at the limit: served
    assert client.get("/queue").status_code == 200


def _depth(value: Any) -> int:
    if isinstance(value, list | dict):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max((_depth(c) for c in children), default=0)
    return 0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab,:'),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\a'), inner, max_size=3)
    ),
    max_leaves=12,
)


@hypothesis.settings(max_examples=80, deadline=None, database=None)
@hypothesis.given(value=JSON, indent=st.sampled_from([None, 1]))
def test_json_depth_counts_brackets_outside_strings(value: Any, indent: int | None) -> None:
    assert json_depth(json.dumps(value, indent=indent).encode()) == _depth(value)


def test_body_limits_count_bytes_and_hand_the_body_on() -> None:
    async def echo(scope: Any, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    client = TestClient(BodyLimits(echo, max_bytes=1000))
    body = json.dumps({"a": ["[" * 900]}).encode()  # brackets in a string: depth 2
    assert client.post("/", content=body).content == body
    for sent in (b"x" * 1001, iter([b"x" * 600, b"x" * 600])):  # with Content-Length, and chunked
        r = client.post("/", content=sent)
        assert r.status_code == 413 and "the limit is 1,000 (MAX_BODY_BYTES)" in r.json()["detail"]
    raw = b"[" * 500  # forms (uploads) and raw files are not JSON: only their size is checked
    for content_type in ("multipart/form-data; boundary=x", "application/octet-stream", "image/png"):
        assert client.post("/", content=raw, headers={"Content-Type": content_type}).content == raw
    for content_type in ("application/json", "application/vnd.x+json; charset=utf-8", "text/plain", ""):
        r = client.post("/", content=raw, headers={"Content-Type": content_type})
        assert r.status_code == 400 and "500 levels deep; the limit is 64" in r.json()["detail"]


def chain(length: int) -> dict[str, Any]:
    """EmptyLatentImage -> `length` SetLatentNoiseMask nodes in a row -> VAEDecode -> PreviewImage."""
    nodes: dict[str, Any] = {
        "0": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "m": {"class_type": "LoadImage", "inputs": {"image": "mask.png"}},
        "v": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-vae.safetensors"}},
    }
    for i in range(1, length + 1):
        nodes[str(i)] = {
            "class_type": "SetLatentNoiseMask",
            "inputs": {"samples": [str(i - 1), 0], "mask": ["m", 1]},
        }
    nodes["d"] = {"class_type": "VAEDecode", "inputs": {"samples": [str(length), 0], "vae": ["v", 0]}}
    nodes["p"] = {"class_type": "PreviewImage", "inputs": {"images": ["d", 0]}}
    return nodes


def test_graphs_are_bounded_and_never_recursed_on(client: httpx.Client, root: Path) -> None:
    r = client.post("/prompt", json={"prompt": chain(10_000)})
    assert r.status_code == 400 and "10005 nodes" in r.json()["error"]["message"]
    assert "MAX_NODES" in r.json()["error"]["message"]
    Image.new("RGB", (32, 32)).save(root / "input" / "mask.png")
    library = Library(root / "models")
    env = Env(library, ModelCache(library), folders(root, root / "models"))
    longest = chain(graph.MAX_NODES - 5)  # a chain far deeper than Python's recursion limit
    checked = graph.validate(longest, env)
    assert checked.ok and checked.outputs == ["p"]
    assert graph.execution_order(checked.prompt, checked.outputs) == [
        "0",
        "m",
        *map(str, range(1, 1996)),
        "v",
        "d",
        "p",
    ]


def test_graph_cycles_are_refused(client: httpx.Client) -> None:
    cyclic = chain(3)
    cyclic["1"]["inputs"]["samples"] = ["3", 0]  # 1 -> 3 -> 2 -> 1
    r = client.post("/prompt", json={"prompt": cyclic})
    assert r.status_code == 400 and r.json()["error"]["type"] == "prompt_outputs_failed_validation"
    errors = [e for node in r.json()["node_errors"].values() for e in node["errors"]]
    assert [e["details"] for e in errors if e["type"] == "dependency_cycle"] == ["p -> d -> 3 -> 2 -> 1 -> 3"]


def test_graph_sizes_are_bounded_like_requests(client: httpx.Client) -> None:
    workflow = txt2img_workflow()
    workflow["5"]["inputs"] |= {"width": 4096, "height": 4096, "batch_size": 2}
    r = client.post("/prompt", json={"prompt": workflow})
    assert r.status_code == 400
    (error,) = r.json()["node_errors"]["5"]["errors"]
    assert error["type"] == "custom_validation_failed"
    assert (
        error["details"]
        == "width - width x height x batch_size = 4096x4096x2 exceeds the limit of 16,777,216 pixels"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": 0}, "steps must be between 1 and 1000, got 0"),
        ({"steps": 100_000}, "steps must be between 1 and 1000"),
        ({"batch_size": 65}, "batch_size must be between 1 and 64"),
        ({"n_iter": 101}, "n_iter must be between 1 and 100"),
        ({"batch_size": 9, "n_iter": 100}, "batch_size x n_iter = 9x100 exceeds the limit of 800"),
        ({"prompt": "(" * 200}, "nests brackets more than 100 deep"),
        ({"prompt": "<lora:style:nan>"}, "<lora:style:nan>: the weight must be a finite number"),
    ],
)
def test_a1111_bounds_name_the_field(client: httpx.Client, fields: dict, message: str) -> None:
    r = client.post("/sdapi/v1/txt2img", json={"width": 32, "height": 32, "steps": 2, **fields})
    assert r.status_code == 422 and message in r.json()["detail"], r.text


# ---------------------------------------------------------------------------------------------
# NaN and Inf


def test_load_names_non_finite_tensors(root: Path, tmp_path: Path) -> None:
    model = root / "models" / MODEL
    altered(model, tmp_path / "nan.safetensors", "model.diffusion_model.out.2.bias", float("nan"), 1)
    with pytest.raises(
        CheckpointError, match=r"nan.safetensors \(U-Net\): tensor 'out.2.bias' holds NaN or Inf"
    ):
        load_model(tmp_path / "nan.safetensors")
    big = altered(model, tmp_path / "big.safetensors", "first_stage_model.decoder.conv_out.bias", 1e5)
    load_model(big)  # finite in float32
    with pytest.raises(
        CheckpointError, match="'decoder.conv_out.bias' holds NaN or Inf values after conversion to float16"
    ):
        load_model(big, dtype=torch.float16)


@pytest.fixture(scope="module")
def tiny(root: Path) -> StableDiffusion:
    return load_model(root / "models" / MODEL)


def test_lora_merges_name_non_finite_results(tiny: StableDiffusion, tmp_path: Path) -> None:
    name, layer = next(
        (n, m) for n, m in layer_map(tiny.unet, tiny.text_encoders, tiny.family).items() if m.weight.ndim == 2
    )
    original = layer.weight
    up = torch.zeros(layer.out_features, 1)
    up[0, 0] = float("inf")
    path = save_lora(
        {f"{name}.lora_down.weight": torch.ones(1, layer.in_features), f"{name}.lora_up.weight": up},
        tmp_path / "inf.safetensors",
    )
    with pytest.raises(
        NonFiniteError, match=f"inf.safetensors: {name} merged at 0.5 holds NaN or Inf values: the LoRA's"
    ):
        apply_lora(tiny, path, 0.5)
    assert layer.weight is original  # nothing stays merged
    with pytest.raises(PromptError, match="finite"):
        lora_tags("a <lora:x:inf> cat")
    with pytest.raises(
        LoRAError, match=r"lora_up.weight\): down has shape \(3,\); LoRA factors have 2 or more"
    ):
        apply_lora(tiny, {f"{name}.lora_down.weight": torch.ones(3), f"{name}.lora_up.weight": torch.ones(3)})


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (
            "text_encoders.0.text_model.final_layer_norm.bias",
            "the text encoder's output holds NaN or Inf values: the text encoder gave them in float32",
        ),
        ("unet.out.2.weight", "the sampled latents holds NaN or Inf values: the U-Net gave them in float32"),
        (
            "vae.decoder.conv_out.weight",
            "the VAE-decoded image holds NaN or Inf values: the VAE decoder gave them",
        ),
        (
            "vae.encoder.conv_out.weight",
            "the VAE-encoded image holds NaN or Inf values: the VAE encoder gave them",
        ),
    ],
)
def test_each_stage_names_non_finite_values(tiny: StableDiffusion, tensor: str, message: str) -> None:
    module, attribute = tensor.rsplit(".", 1)
    owner = tiny
    for part in module.split("."):
        owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
    saved = getattr(owner, attribute).clone()
    request = GenerationRequest(
        "a cat", width=32, height=32, steps=2, seed=1, init_image=Image.new("RGB", (32, 32))
    )
    try:
        with torch.no_grad():
            getattr(owner, attribute).fill_(float("nan") if "norm" in tensor else 3e38)
        with pytest.raises(NonFiniteError, match=message):
            generate(tiny, request)
    finally:
        with torch.no_grad():
            getattr(owner, attribute).copy_(saved)
    generate(tiny, request)  # restored: a finite image again
    assert (
        "overflowed float16; run the model in float32 or bfloat16 (or a VAE made for float16"
        in overflow_cause("VAE decoder", torch.float16, " (or a VAE made for float16: sdxl-vae-fp16-fix)")
    )


def test_non_finite_images_fail_their_job_with_the_reason(client: httpx.Client) -> None:
    body = {"width": 32, "height": 32, "steps": 2, "override_settings": {"sd_model_checkpoint": OVERFLOW}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 500 and r.json()["detail"].startswith(
        "NonFiniteError: the VAE-decoded image holds NaN"
    )
    workflow = txt2img_workflow(steps=2)
    workflow["4"]["inputs"]["ckpt_name"] = OVERFLOW
    entry = wait_history(client, client.post("/prompt", json={"prompt": workflow}).json()["prompt_id"])
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert (error["node_type"], error["exception_type"]) == ("VAEDecode", "NonFiniteError")
    assert "the VAE-decoded image holds NaN or Inf values" in error["exception_message"]


# ---------------------------------------------------------------------------------------------
# job faults

OOM = "CUDA out of memory. Tried to allocate 20.00 GiB"


def test_worker_fails_a_faulty_job_and_runs_the_next(tmp_path: Path) -> None:
    faults = {"oom": torch.OutOfMemoryError(OOM), "ram": MemoryError(), "bug": KeyError("x")}

    def run(job: Any, live: Any) -> Outcome:
        if job.request["fault"] in faults:
            raise faults[job.request["fault"]]
        return Outcome(DONE, {"ran": job.request["fault"]})

    store = JobStore(tmp_path / "jobs.sqlite3", max_pending=10)
    worker = Worker(store, {"test": run}, lambda: None)
    jobs = [worker.submit("test", {"fault": fault}) for fault in ("oom", "ram", "bug", "none")]
    worker.start()
    try:
        done = [worker.wait(job.id).result(timeout=30) for job in jobs]
    finally:
        worker.stop()
        store.close()
    assert [(j.state, j.error) for j in done] == [
        (FAILED, f"OutOfMemoryError: {OOM}"),
        (FAILED, "MemoryError: "),
        (FAILED, "KeyError: 'x'"),
        (DONE, None),
    ]
    assert done[-1].result == {"ran": "none"}


def test_out_of_memory_fails_one_job_in_both_apis(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdlab.server import a1111, nodes

    calls = threading.Semaphore(0)

    def oom(*args: Any, **kwargs: Any) -> Any:
        calls.release()
        raise torch.OutOfMemoryError(OOM)

    body = {"width": 32, "height": 32, "steps": 2, "seed": 5}
    with monkeypatch.context() as patch:
        patch.setattr(a1111, "generate", oom)
        r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 500 and r.json()["detail"] == f"OutOfMemoryError: {OOM}"
    r = client.post("/sdapi/v1/txt2img", json=body)  # the next job runs
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    with monkeypatch.context() as patch:
        patch.setattr(nodes, "sample", oom)
        failed = client.post("/prompt", json={"prompt": txt2img_workflow(steps=2)}).json()["prompt_id"]
        entry = wait_history(client, failed)
    assert calls.acquire(timeout=0) and entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert (error["node_type"], error["exception_type"], error["exception_message"]) == (
        "KSampler",
        "OutOfMemoryError",
        OOM,
    )
    entry = wait_history(
        client, client.post("/prompt", json={"prompt": txt2img_workflow(steps=2)}).json()["prompt_id"]
    )
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["9"]["images"]
    assert Image.open(
        io.BytesIO(client.get("/view", params=entry["outputs"]["9"]["images"][0]).content)
    ).size == (32, 32)
