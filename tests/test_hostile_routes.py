"""Hostile input on the routes added after the first hostile-input pass (issue 15): ComfyUI's user data and
settings, /api/jobs, /controlnet/detect, A1111's extras; upload size bounded while the body streams in and
advertised as ComfyUI's max_upload_size; batches growing through graph links bounded when the node runs;
a LoKr file whose Kronecker product would be huge refused before it is computed. Each is a 4xx (or a node
error) naming the input, never a 500, and nothing is written outside its folder."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient
from test_hostile_images import png_bomb
from test_server_api import MODEL, folders, write_models

from sdlab.checkpoints.load import load_model
from sdlab.images import ImageLimits
from sdlab.lora import LoRAError, apply_lora, layer_map
from sdlab.server.app import create_app
from sdlab.server.bodies import FORM_OVERHEAD
from sdlab.server.nodes import NODE_TYPES, Latent, NodeError
from sdlab.server.state import Settings

LIMITS = ImageLimits(max_pixels=4096 * 4096, max_bytes=1 << 20)  # a small file limit: uploads past it
DEEP = b"[" * 100_000 + b"]" * 100_000


def png(w: int = 16, h: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("routes")
    write_models(root)
    return root


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[TestClient]:
    app = create_app(Settings(folders(root, root / "models"), image_limits=LIMITS))
    with TestClient(app, base_url="http://localhost") as client:
        yield client


def post_text(client: TestClient, url: str, body: str) -> Any:
    """POST a JSON text as given (NaN and Infinity too, which a JSON encoder would refuse to write)."""
    return client.post(url, content=body.encode(), headers={"content-type": "application/json"})


def refused(response: Any, status: int, *words: str) -> str:
    """The response is the status named, its message naming each word."""
    text = response.text
    assert response.status_code == status, (response.status_code, text)
    assert all(word in text for word in words), text
    return text


# ---------------------------------------------------------------------------------------------
# ComfyUI frontend: settings and user data


def test_settings_take_only_bounded_json(client: TestClient) -> None:
    """A deep body under a binary content type was a RecursionError (500) in /settings/{id}."""
    headers = {"content-type": "application/octet-stream"}
    refused(client.post("/api/settings/Comfy.X", content=DEEP, headers=headers), 400, "MAX_JSON_DEPTH")
    refused(client.post("/api/settings", content=DEEP, headers=headers), 400, "MAX_JSON_DEPTH")
    refused(client.post("/api/settings/Comfy.X", content=b"{nope"), 400, "invalid JSON")
    assert client.post("/api/settings/Comfy.X", content=b'{"a": [1]}', headers=headers).status_code == 200
    assert client.get("/api/settings/Comfy.X").json() == {"a": [1]}


@pytest.mark.parametrize(
    "name",
    # percent-encoded: a client (httpx too) removes plain `..` segments from a URL before sending it
    [
        "..%2Fescape.json",
        "%2e%2e/escape.json",
        "%2e%2e%2fescape.json",
        "workflows%2F..%2F..%2Fescape.json",
        "%2Fetc%2Fescape.json",
        "a%00b.json",
        "%2e%2e",
    ],
)
def test_user_data_stays_in_the_user_folder(client: TestClient, root: Path, name: str) -> None:
    before = {p for p in root.rglob("*")}
    client.post("/api/userdata/workflows%2Fa.json", content=b"{}")
    for response in (
        client.post(f"/api/userdata/{name}", content=b"{}"),
        client.get(f"/api/userdata/{name}"),
        client.delete(f"/api/userdata/{name}"),
        client.post(f"/api/userdata/workflows%2Fa.json/move/{name}"),
        client.get("/api/userdata", params={"dir": name.replace("%2F", "/").replace("%2e", ".")}),
    ):
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
    assert {p for p in root.rglob("*")} - before <= {p for p in (root / "state").rglob("*")}
    assert not (root / "escape.json").exists() and not Path("/etc/escape.json").exists()


def test_user_data_symlink_out_is_refused(client: TestClient, root: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    assert client.post("/api/userdata/mine.json", content=b"{}").status_code == 200  # the user's folder
    users = next(p for p in (root / "state").rglob("*") if p.is_dir() and p.name == "default")
    (users / "link").symlink_to(tmp_path)
    refused(client.get("/api/userdata/link%2Fsecret.json"), 400)
    refused(client.post("/api/userdata/link%2Fnew.json", content=b"{}"), 400)
    assert not (tmp_path / "new.json").exists()


# ---------------------------------------------------------------------------------------------
# uploads: bounded while streaming, and the bound advertised


def test_upload_size_is_bounded_before_the_route_and_advertised(client: TestClient, root: Path) -> None:
    features = client.get("/api/features").json()
    assert features["max_upload_size"] == LIMITS.max_bytes
    with client.websocket_connect("ws://127.0.0.1/ws?clientId=flags") as ws:
        ws.receive_json()
        ws.send_json({"type": "feature_flags", "data": {}})
        while (reply := ws.receive_json())["type"] == "status":
            pass
        assert reply["data"]["max_upload_size"] == LIMITS.max_bytes
    with client.websocket_connect("ws://127.0.0.1/ws?clientId=deep") as ws:
        ws.receive_json()
        ws.send_text("[" * 200_000)  # not a feature exchange (json.loads: a RecursionError in the handler)
        assert client.get("/api/features").status_code == 200
    big = b"\0" * (LIMITS.max_bytes + FORM_OVERHEAD + 1)
    inputs = set((root / "input").rglob("*")) if (root / "input").exists() else set()
    text = refused(client.post("/upload/image", files={"image": ("big.png", big)}), 413, "--max-image-bytes")
    assert f"{LIMITS.max_bytes + FORM_OVERHEAD:,}" in text

    def chunks() -> Iterator[bytes]:  # no Content-Length: only the counter on the stream can stop it
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
        for _ in range(LIMITS.max_bytes // 65536 + 32):
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=b"}
    refused(client.post("/upload/image", content=chunks(), headers=headers), 413, "the upload has")
    mask = {"image": ("m.png", png()), "original_ref": (None, "[" * 500_000)}
    refused(client.post("/upload/mask", files=mask), 400, "original_ref")
    assert (set((root / "input").rglob("*")) if (root / "input").exists() else set()) == inputs


# ---------------------------------------------------------------------------------------------
# /api/jobs, /controlnet/detect, A1111 extras


def test_jobs_route_bounds_its_parameters(client: TestClient) -> None:
    for params in ({"limit": "-1"}, {"limit": "nan"}, {"offset": "-5"}, {"limit": str(10**30)}):
        response = client.get("/api/jobs", params=params)
        assert 400 <= response.status_code < 500 or response.status_code == 200, response.text
    refused(client.get("/api/jobs/..%2F..%2Fx"), 404)
    refused(client.post("/api/jobs/cancel", content=DEEP), 400, "MAX_JSON_DEPTH")
    refused(client.post("/api/jobs/cancel", json={"job_ids": "x" * 10}), 400)


def test_detect_and_extras_refuse_bombs_counts_and_non_finite_numbers(client: TestClient) -> None:
    bomb = b64(png_bomb(20_000, 20_000))
    start = time.perf_counter()
    refused(
        client.post(
            "/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [bomb]}
        ),
        413,
        "controlnet_input_images[0]",
    )
    refused(client.post("/sdapi/v1/extra-single-image", json={"image": bomb}), 413, "image")
    refused(
        client.post(
            "/sdapi/v1/extra-batch-images",
            json={"imageList": [{"data": b64(png()), "name": "a"}, {"data": bomb, "name": "b"}]},
        ),
        413,
        "imageList[1].data",
    )
    assert time.perf_counter() - start < 2
    for field, value in (("controlnet_threshold_a", "NaN"), ("controlnet_threshold_b", "Infinity")):
        body = f'{{"controlnet_module": "invert", "controlnet_input_images": ["{b64(png())}"], '
        refused(post_text(client, "/controlnet/detect", body + f'"{field}": {value}}}'), 422, field)
    for value in ("NaN", "Infinity", "1e999"):
        body = f'{{"image": "{b64(png())}", "upscaling_resize": {value}}}'
        refused(post_text(client, "/sdapi/v1/extra-single-image", body), 422, "upscaling_resize")
    many = [b64(png(8, 8))] * 1000
    refused(
        client.post(
            "/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": many}
        ),
        422,
        "controlnet_input_images",
    )
    items = [{"data": b64(png(8, 8)), "name": str(i)} for i in range(1000)]
    refused(client.post("/sdapi/v1/extra-batch-images", json={"imageList": items}), 422, "imageList")
    refused(
        client.post(
            "/sdapi/v1/extra-single-image",
            json={
                "image": b64(png()),
                "upscaler_1": "Lanczos",
                "resize_mode": 1,
                "upscaling_resize_w": 10**6,
                "upscaling_resize_h": 10**6,
            },
        ),
        413,
        "upscaling_resize",
    )


# ---------------------------------------------------------------------------------------------
# batches growing through links; LoKr products; FastAPI's 422 with a NaN


def wide(batch: int, side: int) -> torch.Tensor:
    """An image batch of that shape that takes no memory (the bound is checked before any work)."""
    return torch.zeros(1, 3, 1, 1).expand(batch, 3, side, side)


@pytest.mark.parametrize(
    ("node", "inputs", "field"),
    [
        ("RepeatLatentBatch", {"samples": Latent(1024, 1024, 16), "amount": 64}, "amount"),
        ("EmptyLatentImage", {"width": 4096, "height": 4096, "batch_size": 2}, "batch_size"),
        (
            "LatentUpscale",
            {
                "samples": Latent(64, 64, 64),
                "upscale_method": "nearest-exact",
                "width": 1024,
                "height": 1024,
                "crop": "disabled",
            },
            "samples",
        ),
        (
            "LatentUpscaleBy",
            {"samples": Latent(2048, 2048, 4), "upscale_method": "nearest-exact", "scale_by": 8.0},
            "scale_by",
        ),
        ("ImageBatch", {"image1": wide(1, 4096), "image2": wide(1, 64)}, "image2"),
        (
            "ImageScale",
            {
                "image": wide(32, 64),
                "upscale_method": "nearest-exact",
                "width": 1024,
                "height": 1024,
                "crop": "disabled",
            },
            "image",
        ),
        (
            "ImagePadForOutpaint",
            {"image": wide(4, 2048), "left": 2048, "top": 0, "right": 0, "bottom": 0, "feathering": 0},
            "image",
        ),
    ],
)
def test_batches_through_links_are_bounded_when_the_node_runs(
    node: str, inputs: dict[str, Any], field: str
) -> None:
    with pytest.raises(
        NodeError, match=f"^{field}: width x height x batch_size = .* exceeds the limit of 16,777,216"
    ):
        NODE_TYPES[node].run(None, **inputs)


def test_lokr_product_is_refused_before_it_is_computed(root: Path) -> None:
    """kron of two 300² factors would be 90000² (32 GB) for a 128x32 layer: refused from the shapes."""
    model = load_model(root / "models" / MODEL)
    name, layer = next(
        (n, m)
        for n, m in layer_map(model.unet, model.text_encoders, model.family).items()
        if m.weight.ndim == 2
    )
    start = time.perf_counter()
    factors = {f"{name}.lokr_w1": torch.ones(300, 300), f"{name}.lokr_w2": torch.ones(300, 300)}
    with pytest.raises(LoRAError, match=r"update of shape \(90000, 90000\) does not fit a weight"):
        apply_lora(model, factors, 1.0)
    assert time.perf_counter() - start < 1
    before = layer.weight.clone()
    fits = {f"{name}.lokr_w1": torch.ones(2, 2), f"{name}.lokr_w2": torch.full((64, 16), 0.5)}
    apply_lora(model, fits, 1.0)
    assert torch.equal(layer.weight, before + torch.kron(torch.ones(2, 2), torch.full((64, 16), 0.5)))


def test_validation_errors_with_nan_are_422_not_500(client: TestClient) -> None:
    body = '{"prompt": "a", "steps": NaN, "width": Infinity}'
    text = refused(post_text(client, "/sdapi/v1/txt2img", body), 422, "steps", "width")
    assert '"nan"' in text and '"inf"' in text
