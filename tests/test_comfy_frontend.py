"""ComfyUI's own frontend on `sdlab serve`: the routes it calls, in ComfyUI's shapes (TestClient), and the
unmodified `comfyui-frontend-package` build driven in headless Chromium against a live server.

The expected shapes are ComfyUI's (server.py, app/user_manager.py, app/app_settings.py,
comfy_execution/jobs.py, comfy_api/feature_flags.py); values are checked against what the server was
given (stored files, the workflow submitted, the machine's memory, the file's own metadata).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from test_server_api import free_port, serving

from sdlab.checkpoints.io import read_metadata
from sdlab.checkpoints.load import default_model_path
from sdlab.images import DEFAULT_LIMITS
from sdlab.server.app import create_app
from sdlab.server.comfy_frontend import TEMPLATES, installed_frontend
from sdlab.server.paths import Folders
from sdlab.server.preview import png_bytes
from sdlab.server.state import Settings

MODEL = "sdlab-mini.safetensors"
TEMPLATE = "sdlab_sd1_txt2img"
# ComfyUI's feature flags; max_upload_size is the upload limit sdlab holds uploads to (50 MiB by default)
FEATURES = {"supports_preview_metadata": True, "max_upload_size": DEFAULT_LIMITS.max_bytes}
needs_frontend = pytest.mark.skipif(
    installed_frontend() is None, reason="comfyui-frontend-package not installed"
)


def settings(root: Path, **kw: Any) -> Settings:
    """A server with only the shipped model."""
    return Settings(Folders(None, root / "outputs", root / "input", root / "state"), **kw)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    torch.set_num_threads(1)
    with TestClient(create_app(settings(tmp_path)), base_url="http://127.0.0.1") as c:
        yield c


def template_prompt(steps: int = 2, seed: int = 0) -> dict[str, Any]:
    """The API form of sdlab's template (what the frontend submits for it)."""
    nodes = {str(n["id"]): n for n in json.loads((TEMPLATES / f"{TEMPLATE}.json").read_text())["nodes"]}
    assert nodes["4"]["widgets_values"] == [MODEL]
    text = nodes["6"]["widgets_values"][0]
    width, height, _ = nodes["5"]["widgets_values"]
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MODEL}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": width, "height": height, "batch_size": 1},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 3.0,
                "sampler_name": "euler_ancestral",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def wait_job(client: TestClient, job_id: str, states: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job.get("status") in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}: {job}")


# ---------------------------------------------------------------------------------------------
# routes


def test_user_data_round_trip_and_path_checks(client: TestClient, tmp_path: Path) -> None:
    user = tmp_path / "state" / "users" / "default"
    body = b'{"nodes": []}'
    assert client.post("/api/userdata/workflows%2Fa.json", content=body).json() == "workflows/a.json"
    assert client.post("/api/userdata/workflows%2Fa.json?overwrite=false", content=b"x").status_code == 409
    assert (user / "workflows" / "a.json").read_bytes() == body
    got = client.get("/api/userdata/workflows%2Fa.json")
    assert got.content == body and got.headers["content-disposition"] == "attachment"
    listed = client.get("/api/userdata", params={"dir": "workflows", "recurse": "true"}).json()
    assert listed == ["a.json"]
    split = client.get("/api/userdata", params={"dir": "workflows", "split": "true"}).json()
    assert split == [["a.json", "a.json"]]
    info = client.get("/api/userdata", params={"dir": "workflows", "full_info": "true"}).json()
    stat = (user / "workflows" / "a.json").stat()
    assert info == [
        {
            "path": "a.json",
            "size": len(body),
            "modified": int(stat.st_mtime * 1000),
            "created": int(stat.st_ctime * 1000),
        }
    ]
    v2 = client.get("/api/v2/userdata", params={"path": "workflows"}).json()
    assert [(e["name"], e["path"], e["type"], e["size"]) for e in v2] == [
        (".index.json", "workflows/.index.json", "file", 17),  # no bookmarks yet (hidden from the v1 list)
        ("a.json", "workflows/a.json", "file", 13),
    ]
    moved = client.post(
        "/api/userdata/workflows%2Fa.json/move/workflows%2Fsub%2Fb.json?full_info=true"
    ).json()
    assert moved["path"] == "workflows/sub/b.json" and not (user / "workflows" / "a.json").exists()
    assert client.get("/api/userdata", params={"dir": "nope"}).status_code == 404
    assert client.delete("/api/userdata/workflows%2Fsub%2Fb.json").status_code == 204
    assert client.get("/api/userdata/workflows%2Fsub%2Fb.json").status_code == 404
    # names that would leave the user's folder
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (user / "workflows" / "link.json").symlink_to(outside)
    for name in ("..%2F..%2Fjobs.sqlite3", "%2Fetc%2Fpasswd", "workflows%2Flink.json"):
        assert client.get(f"/api/userdata/{name}").status_code == 400, name
        assert client.post(f"/api/userdata/{name}", content=b"x").status_code == 400, name
    assert client.get("/api/userdata", params={"dir": "workflows"}).json() == []  # the link is not listed
    assert outside.read_text() == "secret"


def test_settings_are_stored_per_user(client: TestClient, tmp_path: Path) -> None:
    assert client.get("/api/settings").json() == {}
    assert client.post("/api/settings", json={"Comfy.ColorPalette": "light", "a": 1}).status_code == 200
    assert client.post("/api/settings/Comfy.Locale", json="en").status_code == 200
    expected = {"Comfy.ColorPalette": "light", "a": 1, "Comfy.Locale": "en"}
    assert client.get("/api/settings").json() == expected
    assert client.get("/settings/Comfy.Locale").json() == "en"
    assert client.get("/api/settings/unset").json() is None
    stored = tmp_path / "state" / "users" / "default" / "comfy.settings.json"
    assert json.loads(stored.read_text()) == expected
    assert client.get("/api/users").json() == {"storage": "server", "migrated": True}
    assert client.post("/api/users", json={"username": "x"}).status_code == 400


@needs_frontend
def test_start_up_routes(client: TestClient) -> None:
    web_root = installed_frontend()
    expected = sorted(
        "/" + p.relative_to(web_root).as_posix() for p in (web_root / "extensions").rglob("*.js")
    )
    assert client.get("/api/extensions").json() == expected and expected
    stats = client.get("/api/system_stats").json()
    page = os.sysconf("SC_PAGE_SIZE")
    assert stats["system"]["ram_total"] == os.sysconf("SC_PHYS_PAGES") * page
    assert 0 < stats["system"]["ram_free"] <= stats["system"]["ram_total"]
    assert stats["system"]["pytorch_version"] == torch.__version__
    assert [d["type"] for d in stats["devices"]] == ["cpu"]
    assert client.get("/api/features").json() == FEATURES
    assert client.get("/api/i18n").json() == {} and client.get("/api/workflow_templates").json() == {}
    assert client.get("/api/global_subgraphs").json() == {}
    assert client.get("/api/models").json() == [
        "checkpoints",
        "configs",
        "loras",
        "vae",
        "text_encoders",
        "diffusion_models",
        "clip_vision",
        "embeddings",
        "controlnet",
        "upscale_models",
        "ipadapter",
    ]
    assert client.get("/api/models/checkpoints").json() == [MODEL]
    assert client.get("/api/models/configs").json() == []
    assert client.get("/api/models/unet").status_code == 404
    assert [m["name"] for m in client.get("/api/experiment/models/checkpoints").json()] == [MODEL]
    meta = client.get("/api/view_metadata/checkpoints", params={"filename": MODEL}).json()
    assert meta == read_metadata(default_model_path())
    assert client.get("/internal/files/output").json() == []
    assert client.get("/internal/files/elsewhere").status_code == 400
    # the frontend's start-up page and the template it offers
    assert client.get("/comfy/").text == (web_root / "index.html").read_text()
    index = client.get("/comfy/templates/index.json").json()
    assert [t["name"] for t in index[0]["templates"]] == [TEMPLATE]
    assert client.get(f"/comfy/templates/{TEMPLATE}.json").json()["nodes"][0]["widgets_values"] == [MODEL]
    assert client.get("/comfy/templates/..%2Fcomfy.py").status_code in (400, 404)
    assert client.get("/sdlab/").status_code == 200 and "sdlab" in client.get("/").text


def test_jobs_api_png_chunks_history_and_cancel(client: TestClient, tmp_path: Path) -> None:
    workflow = {"id": "wf-1", "nodes": [], "links": [], "version": 0.4}
    extra = {"extra_pnginfo": {"workflow": workflow}, "create_time": 1234}
    prompt = template_prompt()
    job_id = client.post("/api/prompt", json={"prompt": prompt, "extra_data": extra}).json()["prompt_id"]
    job = wait_job(client, job_id, ("completed", "failed"))
    assert job["status"] == "completed", job
    assert job["create_time"] == 1234 and job["workflow_id"] == "wf-1"
    image = {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}
    assert job["outputs"] == {"9": {"images": [image]}}
    assert job["preview_output"] == {**image, "nodeId": "9", "mediaType": "images"}
    assert job["outputs_count"] == job["previewable_outputs_count"] == 1
    assert job["workflow"] == {"prompt": prompt, "extra_data": extra}
    assert job["execution_end_time"] >= job["execution_start_time"]
    with Image.open(tmp_path / "outputs" / image["filename"]) as png:
        assert json.loads(png.text["prompt"]) == prompt and json.loads(png.text["workflow"]) == workflow
        pixels = png.convert("RGB")
    # the mask editor's upload: the output image with the painted alpha, its chunks kept, into input/
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    form = {"original_ref": json.dumps(image), "type": "input"}
    stored = client.post("/upload/mask", data=form, files={"image": ("clipspace-mask.png", png_bytes(mask))})
    assert stored.json() == {"name": "clipspace-mask.png", "subfolder": "", "type": "input"}
    with Image.open(tmp_path / "input" / "clipspace-mask.png") as masked:
        assert masked.getchannel("A").tobytes() == mask.getchannel("A").tobytes()
        assert masked.convert("RGB").tobytes() == pixels.tobytes() and masked.text["workflow"] == json.dumps(
            workflow
        )
    # a long run waits behind another; cancel the waiting one, then interrupt the running one
    long_id = client.post("/prompt", json={"prompt": template_prompt(steps=10000)}).json()["prompt_id"]
    waiting = client.post("/prompt", json={"prompt": template_prompt(seed=1)}).json()["prompt_id"]
    wait_job(client, long_id, ("in_progress",))
    assert client.post(f"/api/jobs/{waiting}/cancel").json() == {"cancelled": [waiting]}
    assert client.get(f"/api/jobs/{waiting}").status_code == 404  # gone from the queue, as in ComfyUI
    assert client.post("/api/jobs/cancel", json={"job_ids": [long_id]}).json() == {"cancelled": [long_id]}
    assert wait_job(client, long_id, ("cancelled", "failed"))["status"] == "cancelled"
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 409
    listing = client.get("/api/jobs", params={"status": "completed,cancelled", "limit": 1}).json()
    assert [j["id"] for j in listing["jobs"]] == [long_id]  # newest first
    assert listing["pagination"] == {"offset": 0, "limit": 1, "total": 2, "has_more": True}
    oldest = client.get("/api/jobs", params={"sort_order": "asc"}).json()["jobs"]
    assert [j["id"] for j in oldest] == [job_id, long_id]
    assert client.get("/api/jobs", params={"status": "done"}).status_code == 400
    assert client.post("/api/history", json={"delete": [job_id]}).status_code == 200
    assert job_id not in client.get("/history").json() and long_id in client.get("/history").json()
    client.post("/history", json={"clear": True})
    assert client.get("/history").json() == {} and client.get("/api/jobs").json()["jobs"] == []
    assert client.post("/api/free", json={"unload_models": True, "free_memory": True}).status_code == 200


def _previews(c: TestClient, client_id: str, flags: dict[str, Any] | None) -> list[bytes]:
    """The binary /ws frames one 3-step run sends a client (which announces flags, if given)."""
    with c.websocket_connect(f"ws://127.0.0.1/ws?clientId={client_id}") as ws:
        assert ws.receive_json()["type"] == "status"
        if flags is not None:
            ws.send_json({"type": "feature_flags", "data": flags})
            while (reply := ws.receive_json())["type"] == "status":  # queue updates may come first
                pass
            assert reply == {"type": "feature_flags", "data": FEATURES}
        body = {"prompt": template_prompt(steps=3), "client_id": client_id}
        prompt_id = c.post("/prompt", json=body).json()["prompt_id"]
        frames = []
        done = {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}
        while (message := ws.receive()).get("bytes") is not None or json.loads(message["text"]) != done:
            if message.get("bytes") is not None:
                frames.append(message["bytes"])
        return frames


def test_previews_follow_the_preview_method_and_the_client_flags(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    flags = {"supports_preview_metadata": True}
    with TestClient(create_app(settings(tmp_path / "none")), base_url="http://127.0.0.1") as c:
        assert _previews(c, "tagged", flags) == []  # ComfyUI's default: no previews
    with TestClient(create_app(settings(tmp_path, preview_method="auto")), base_url="http://127.0.0.1") as c:
        plain, tagged = _previews(c, "plain", None), _previews(c, "tagged", flags)
    assert len(plain) == 3 and all(struct.unpack(">II", f[:8]) == (1, 2) for f in plain)
    assert len(tagged) == 3
    kind, size = struct.unpack(">II", tagged[0][:8])
    metadata = json.loads(tagged[0][8 : 8 + size])
    assert kind == 4 and metadata["node_id"] == "3" and metadata["image_type"] == "image/png"
    assert tagged[0][8 + size :] == plain[0][8:]  # the same PNG (same seed, same step)


# ---------------------------------------------------------------------------------------------
# the frontend in Chromium

RELEASE_CHECK = "https://api.comfy.org/releases"  # the frontend's update check; the browser reaches nothing


class Page:
    """A page on the frontend that records console errors and requests beyond 127.0.0.1."""

    def __init__(self, browser: Any, url: str, shots: Path) -> None:
        self.errors: list[str] = []
        self.offsite: list[str] = []
        self.shots = shots
        self.page = browser.new_page()
        self.page.set_default_timeout(60_000)
        self.page.route("**/*", self._route)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url + "/comfy/")
        self.page.wait_for_function("window.app?.graph !== undefined")

    def _route(self, route: Any, request: Any) -> None:
        if urlsplit(request.url).hostname not in ("127.0.0.1", None) and not request.url.startswith("blob:"):
            self.offsite.append(request.url)
            route.abort()
        else:
            route.continue_()

    def _console(self, message: Any) -> None:
        if message.type == "error" and not message.location.get("url", "").startswith(RELEASE_CHECK):
            self.errors.append(f"{message.text} ({message.location.get('url')})")

    def js(self, expression: str) -> Any:
        return self.page.evaluate(expression)

    def wait(self, expression: str) -> None:
        self.page.wait_for_function(expression)

    def shoot(self, name: str) -> None:
        path = self.shots / f"comfy-frontend-{name}.png"
        self.page.screenshot(path=path)
        if os.environ.get("SDLAB_ARTEFACTS"):
            Path(os.environ["SDLAB_ARTEFACTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, os.environ["SDLAB_ARTEFACTS"])

    def close(self) -> None:
        self.page.close()
        assert [u for u in self.offsite if not u.startswith(RELEASE_CHECK)] == []
        assert self.errors == []


STEPS = "window.app.graph.getNodeById(3)?.widgets?.find(w => w.name === 'steps')"
SET_STEPS = "window.app.graph.getNodeById(3).widgets.find(w => w.name === 'steps').value"
DROP_OUTPUT = """async () => {
    const blob = await (await fetch('api/view?filename=ComfyUI_00001_.png&type=output')).blob();
    const files = new DataTransfer();
    files.items.add(new File([blob], 'ComfyUI_00001_.png', {type: 'image/png'}));
    document.querySelector('#graph-canvas').dispatchEvent(
        new DragEvent('drop', {dataTransfer: files, bubbles: true, cancelable: true}));
}"""


@needs_frontend
def test_the_frontend_runs_the_template_saves_reopens_and_restores(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    torch.set_num_threads(1)
    config = settings(tmp_path, preview_method="latent2rgb")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    port = free_port()
    with serving(config, port) as url:
        ui = Page(browser, url, shots)
        ui.page.get_by_text("sdlab-mini text to image").click()  # first start offers the template
        ui.wait("window.app.graph.getNodeById(9)?.type === 'SaveImage'")
        ui.shoot("template")
        ui.js(f"{SET_STEPS} = 4")  # the template's 20 steps are more than the test needs
        ui.page.get_by_role("button", name="Run").first.click()
        ui.wait("window.app.nodeOutputs?.['9']?.images?.[0]?.filename === 'ComfyUI_00001_.png'")
        ui.shoot("ran")
        ui.page.get_by_role("button", name="0 active").click()  # the job queue panel
        expect(ui.page.get_by_text("ComfyUI_00001_.png")).to_be_visible()
        ui.shoot("queue")
        ui.page.keyboard.press("Escape")
        ui.page.get_by_role("button", name="Assets (a)").click()
        expect(ui.page.locator("img[src*='ComfyUI_00001_.png']").first).to_be_visible()
        ui.shoot("assets")
        ui.page.get_by_role("button", name="Assets (a)").click()
        # a long run, cancelled from the page
        ui.js(f"{SET_STEPS} = 10000")
        ui.page.get_by_role("button", name="Run").first.click()
        ui.wait("fetch('api/jobs?status=in_progress').then(r => r.json()).then(j => j.jobs.length === 1)")
        ui.page.get_by_role("button", name="Cancel current run").click()
        ui.wait("fetch('api/jobs?status=cancelled').then(r => r.json()).then(j => j.jobs.length === 1)")
        ui.shoot("cancelled")
        # saved on the server (steps 10000 now)
        ui.page.keyboard.press("Control+s")
        ui.page.get_by_role("textbox").last.fill("sdlab-test")
        ui.page.keyboard.press("Enter")
        saved = tmp_path / "state" / "users" / "default" / "workflows" / "sdlab-test.json"
        tab = ui.page.get_by_test_id("workflow-tab").filter(has_text="sdlab-test")
        expect(tab).to_be_visible()
        tab.hover()
        tab.get_by_role("button", name="Close").click()  # so that it opens from the server below
        expect(tab).to_have_count(0)
        ui.close()
    assert [n["widgets_values"][2] for n in json.loads(saved.read_text())["nodes"] if n["id"] == 3] == [10000]
    # the server restarts at the same address (the browser keeps its tabs, as a user's would: the frontend's
    # default graph, for models sdlab does not have, would ask huggingface.co for their sizes)
    with serving(config, port) as url:
        ui = Page(browser, url, shots)
        ui.page.get_by_role("button", name="Workflows (w)").click()
        ui.page.get_by_text("sdlab-test").first.click()
        ui.wait(f"{STEPS}?.value === 10000")
        ui.shoot("reopened")
        ui.js(DROP_OUTPUT)  # the first run's PNG brings back its graph (4 steps)
        ui.wait(f"{STEPS}?.value === 4")
        ui.shoot("dropped")
        ui.close()


# ---------------------------------------------------------------------------------------------
# Python clients


def test_comfy_api_simplified_gets_the_saved_image(tmp_path: Path) -> None:
    """Its `queue_and_wait_images` returns the preview frames if any come, else the saved images: with
    ComfyUI's default preview method (none) it gets the saved PNG."""
    wrapper = pytest.importorskip("comfy_api_simplified")
    torch.set_num_threads(1)
    prompt = template_prompt(steps=3)
    for node in prompt.values():
        node["_meta"] = {"title": "Save Image" if node["class_type"] == "SaveImage" else node["class_type"]}
    with serving(settings(tmp_path)) as url, ThreadPoolExecutor(1) as thread:
        # its own thread: it calls asyncio.run, which refuses to run where playwright's loop runs
        images = thread.submit(
            wrapper.ComfyApiWrapper(url).queue_and_wait_images, prompt, "Save Image"
        ).result()
    assert images == {"ComfyUI_00001_.png": (tmp_path / "outputs" / "ComfyUI_00001_.png").read_bytes()}


def test_sd_backend_client_finds_comfyui_and_gets_the_saved_image(tmp_path: Path) -> None:
    """Its detection probes /system_stats, its ComfyUI client submits after reading /models/configs."""
    client = pytest.importorskip("sd_backend_client")
    torch.set_num_threads(1)
    with serving(settings(tmp_path)) as url:
        backend = client.connect_to_backend(url)
        assert isinstance(backend, client.ComfyUiWebservice)
        params = client.DiffusionParams(
            sd_model_name=MODEL, prompt="a red apple", width=64, height=64, steps=3, cfg_scale=3.0, seed=5
        )
        result = backend.submit_txt2img(params).wait(timeout=60)
    (saved,) = sorted((tmp_path / "outputs").rglob("*.png"))
    with Image.open(saved) as png:
        assert [im.tobytes() for im in result.images] == [png.convert(result.images[0].mode).tobytes()]
    assert result.seed == 5


def test_ui_comfy_and_front_end_root(tmp_path: Path) -> None:
    """`--front-end-root DIR` serves another build; `--ui comfy` puts it at / and sdlab's page at /sdlab/."""
    from sdlab.server.cli import frontend_problem

    build = tmp_path / "build"
    (build / "extensions" / "mine").mkdir(parents=True)
    (build / "extensions" / "mine" / "a.js").write_text("export {}")
    assert frontend_problem("sdlab", build) == f"{build}: not a ComfyUI frontend build (no index.html)"
    (build / "index.html").write_text("<title>my build</title>")
    assert frontend_problem("comfy", build) is None
    config = settings(tmp_path, ui="comfy", front_end_root=build)
    with TestClient(create_app(config), base_url="http://127.0.0.1") as c:
        assert c.get("/").text == c.get("/comfy/").text == "<title>my build</title>"
        assert c.get("/extensions/mine/a.js").text == "export {}"
        assert c.get("/api/extensions").json() == ["/extensions/mine/a.js"]
        assert "sdlab" in c.get("/sdlab/").text and c.get("/api/system_stats").status_code == 200
