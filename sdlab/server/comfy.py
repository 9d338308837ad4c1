"""ComfyUI's server API: POST /prompt (asynchronous), history, queue, files, node info and /ws messages.

Every route is served both at its ComfyUI path and under `/api`, as ComfyUI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Form, HTTPException, Request, UploadFile, WebSocket
from fastapi.responses import FileResponse, JSONResponse

from sdlab.images import DEFAULT_LIMITS, ImageError, ImageLimits, ImageTooLarge, open_image
from sdlab.server.bodies import depth_problem, loads
from sdlab.server.graph import NodeFailure, Validation, execute, validate
from sdlab.server.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    FINISHED,
    PENDING,
    RUNNING,
    Interrupted,
    Job,
    Live,
    Outcome,
    QueueFull,
)
from sdlab.server.library import stem
from sdlab.server.nodes import NODE_TYPES, object_info
from sdlab.server.paths import PathError, confined
from sdlab.server.preview import latent_preview, preview_frame
from sdlab.server.state import Server

MAX_UPLOAD_BYTES = 64 << 20


def routes(server: Server) -> APIRouter:
    """ComfyUI's routes of one server (include once plainly and once under /api)."""
    api = APIRouter()

    @api.post("/prompt")
    async def post_prompt(request: Request) -> JSONResponse:
        body = await json_object(request)
        if "prompt" not in body:
            return JSONResponse({"error": "no prompt", "node_errors": []}, status_code=400)
        checked = validate(body["prompt"], server.env())
        if not checked.ok:
            return JSONResponse({"error": checked.error, "node_errors": checked.node_errors}, status_code=400)
        try:
            queued = _job_request(body, checked) | {"preview_method": server.settings.preview_method}
            job = server.worker.submit("comfy", queued)
        except QueueFull as e:
            error = {"type": "queue_full", "message": str(e), "details": "", "extra_info": {}}
            return JSONResponse({"error": error, "node_errors": {}}, status_code=429)
        return JSONResponse({"prompt_id": job.id, "number": job.number, "node_errors": checked.node_errors})

    @api.get("/prompt")
    def get_prompt() -> dict[str, Any]:
        return server.status()["status"]

    @api.get("/queue")
    def get_queue() -> dict[str, Any]:
        running = server.store.jobs((RUNNING,))
        pending = server.store.jobs((PENDING,))
        return {
            "queue_running": [_queue_item(j) for j in running],
            "queue_pending": [_queue_item(j) for j in pending],
        }

    @api.post("/queue")
    async def post_queue(request: Request) -> dict[str, Any]:
        body = await json_object(request)
        if body.get("clear"):
            server.worker.cancel()
        if isinstance(body.get("delete"), list):
            server.worker.cancel([str(i) for i in body["delete"]])
        return {}

    @api.post("/interrupt")
    async def post_interrupt(request: Request) -> dict[str, Any]:
        body = await json_object(request, required=False)
        server.worker.interrupt(body.get("prompt_id"))
        return {}

    @api.get("/history")
    def get_history(max_items: int | None = None) -> dict[str, Any]:
        jobs = server.store.jobs(FINISHED, kind="comfy", limit=-1 if max_items is None else max_items)
        return {job.id: history_entry(job) for job in jobs if job.started is not None}

    @api.get("/history/{prompt_id}")
    def get_history_item(prompt_id: str) -> dict[str, Any]:
        job = server.store.get(prompt_id)
        ran = job is not None and job.kind == "comfy" and job.state in FINISHED and job.started is not None
        return {job.id: history_entry(job)} if ran else {}

    @api.get("/view")
    def view(filename: str, subfolder: str = "", type: str = "output") -> FileResponse:  # noqa: A002 (ComfyUI's name)
        try:
            path = server.file(type, subfolder, filename)
        except PathError as e:
            raise HTTPException(400, str(e)) from e
        if not path.is_file():
            raise HTTPException(404, f"{filename}: no such file")
        return FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"'})

    @api.post("/upload/image")
    async def upload_image(
        image: UploadFile,
        subfolder: str = Form(""),
        overwrite: str = Form(""),
        type: str = Form("input"),  # noqa: A002
    ) -> dict[str, str]:
        return await receive_upload(server, image, subfolder, overwrite, type)

    @api.get("/object_info")
    def get_object_info() -> dict[str, Any]:
        env = server.env()
        return {name: object_info(env, name) for name in NODE_TYPES}

    @api.get("/object_info/{node_class}")
    def get_object_info_node(node_class: str) -> dict[str, Any]:
        return {node_class: object_info(server.env(), node_class)} if node_class in NODE_TYPES else {}

    @api.get("/embeddings")
    def embeddings() -> list[str]:
        return [stem(name) for name in server.library.embeddings()]

    @api.websocket("/ws")
    async def websocket(socket: WebSocket, clientId: str = "") -> None:  # noqa: N803 (ComfyUI's name)
        await serve_socket(server, socket, clientId or uuid.uuid4().hex)

    return api


async def json_object(request: Request, required: bool = True) -> dict[str, Any]:
    """The request's JSON object body (an empty one where optional and absent)."""
    raw = await request.body()
    if not raw and not required:
        return {}
    if (problem := depth_problem(raw)) is not None:  # whatever the content type (BodyLimits checks some)
        raise HTTPException(400, problem)
    try:
        body = await request.json()
    except ValueError as e:
        raise HTTPException(400, f"invalid JSON: {e}") from e
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


def server_features(server: Server) -> dict[str, Any]:
    """What the server tells a client in the /ws feature_flags exchange (and GET /features), as ComfyUI
    does; `max_upload_size` is the limit uploads are held to (the image file limit, --max-image-bytes)."""
    return {"supports_preview_metadata": True, "max_upload_size": server.settings.image_limits.max_bytes}


def _job_request(body: dict[str, Any], checked: Validation) -> dict[str, Any]:
    extra = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
    client_id = body.get("client_id")
    if client_id is not None:
        extra = {**extra, "client_id": client_id}
    return {"prompt": checked.prompt, "outputs": checked.outputs, "extra_data": extra, "client_id": client_id}


def _queue_item(job: Job) -> list[Any]:
    """ComfyUI's queue entry [number, prompt_id, prompt, extra_data, outputs]; A1111 jobs show no graph."""
    req = job.request
    if job.kind != "comfy":
        return [job.number, job.id, {}, {"sdlab_job": job.kind}, []]
    return [job.number, job.id, req["prompt"], req["extra_data"], req["outputs"]]


def history_entry(job: Job) -> dict[str, Any]:
    """ComfyUI's history record of a finished workflow job."""
    result = job.result or {}
    messages = list(result.get("messages", []))
    if job.state != DONE and not any(m[0] in ("execution_error", "execution_interrupted") for m in messages):
        messages.append(["execution_error", _error_message(job.id, None, None, [], job.error or "", "")])
    outputs = result.get("outputs", {})
    return {
        "prompt": _queue_item(job),
        "outputs": outputs,
        "status": {
            "status_str": "success" if job.state == DONE else "error",
            "completed": job.state == DONE,
            "messages": messages,
        },
        "meta": {
            n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in outputs
        },
    }


def _error_message(
    prompt_id: str, node_id: str | None, node_type: str | None, executed: list[str], message: str, kind: str
) -> dict[str, Any]:
    return {
        "prompt_id": prompt_id,
        "node_id": node_id,
        "node_type": node_type,
        "executed": executed,
        "exception_message": message,
        "exception_type": kind,
        "traceback": [],
        "current_inputs": {},
        "current_outputs": {},
        "timestamp": _now_ms(),
    }


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# the job


def run(server: Server, job: Job, live: Live) -> Outcome:
    """Execute a validated workflow, telling its client over /ws as ComfyUI does."""
    req, prompt_id = job.request, job.id
    client = req.get("client_id")
    messages: list[list[Any]] = []

    def send(event: str, data: dict[str, Any], record: bool = False) -> None:
        if record:
            messages.append([event, data])
        if client is not None:
            server.events.publish({"type": event, "data": data}, client)

    def on_step(current: Live) -> None:
        if client is None or not server.events.connected(client):
            return
        progress = {"value": current.step, "max": current.total, "prompt_id": prompt_id, "node": current.node}
        send("progress", progress)
        if req.get("preview_method", server.settings.preview_method) == "none":  # the front end's
            return
        preview = latent_preview(current.latent, current.latent_format)
        if preview is None:
            return
        if server.events.feature(client, "supports_preview_metadata"):
            node = current.node
            ids = {"node_id": node, "display_node_id": node, "parent_node_id": None, "real_node_id": node}
            server.events.publish(preview_frame(preview, {**ids, "prompt_id": prompt_id}), client)
        else:
            server.events.publish(preview_frame(preview), client)

    def on_node(node_id: str) -> None:
        send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})

    def on_output(node_id: str, ui: dict[str, Any]) -> None:
        send("executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id})

    live.on_step = on_step
    send("execution_start", {"prompt_id": prompt_id, "timestamp": _now_ms()}, record=True)
    send("execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": _now_ms()}, record=True)
    checked = Validation(req["prompt"], req["outputs"])
    try:
        outputs = execute(checked, server.env(live), on_node, on_output)
        send("execution_success", {"prompt_id": prompt_id, "timestamp": _now_ms()}, record=True)
        outcome = Outcome(DONE, {"outputs": outputs, "messages": messages})
    except Interrupted:
        node = live.node
        interrupted = {
            "prompt_id": prompt_id,
            "node_id": node,
            "node_type": _class_type(req, node),
            "executed": [],
        }
        send("execution_interrupted", {**interrupted, "timestamp": _now_ms()}, record=True)
        outcome = Outcome(CANCELLED, {"outputs": {}, "messages": messages}, "interrupted")
    except NodeFailure as f:
        kind = type(f.error).__name__
        error = _error_message(prompt_id, f.node_id, f.class_type, f.executed, str(f.error), kind)
        send("execution_error", error, record=True)
        outcome = Outcome(FAILED, {"outputs": {}, "messages": messages}, str(f))
    send("executing", {"node": None, "prompt_id": prompt_id})
    return outcome


def _class_type(req: dict[str, Any], node_id: str | None) -> str | None:
    return None if node_id is None else req["prompt"][node_id]["class_type"]


# ---------------------------------------------------------------------------------------------
# files and sockets


async def receive_upload(
    server: Server,
    image: UploadFile,
    subfolder: str,
    overwrite: str,
    kind: str,
    transform: Callable[[bytes], bytes] | None = None,
) -> dict[str, str]:
    """ComfyUI's /upload/image and /upload/mask: the file read within the image limits, transformed (the
    mask applied), stored in the input folder and shared with the queue's other processes."""
    if kind != "input":
        raise HTTPException(400, "uploads go to the input folder (type=input)")
    limits = server.settings.image_limits
    data = await image.read(limits.max_bytes + 1)  # one byte more than allowed: refused unread
    try:
        data = data if transform is None else transform(data)
        name = store_upload(
            server.folders.inputs, subfolder, image.filename or "", data, overwrite in ("true", "1"), limits
        )
    except ImageTooLarge as e:
        raise HTTPException(413, str(e)) from e
    except (PathError, ImageError) as e:
        raise HTTPException(400, str(e)) from e
    server.share_input(subfolder, name)
    return {"name": name, "subfolder": subfolder, "type": "input"}


def store_upload(
    root: Path,
    subfolder: str,
    filename: str,
    data: bytes,
    overwrite: bool,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> str:
    """Save an uploaded image under root/subfolder once it decodes within limits (ImageError if not); a
    taken name gets " (1)", ... unless the bytes match."""
    target = confined(root, subfolder, filename)
    open_image(data, filename, limits)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        if overwrite:
            os.replace(tmp, target)
            return target.name
        digest = hashlib.sha256(data).digest()
        for n in range(10000):
            candidate = target if n == 0 else target.with_name(f"{target.stem} ({n}){target.suffix}")
            if candidate.is_file() and hashlib.sha256(candidate.read_bytes()).digest() == digest:
                return candidate.name
            with contextlib.suppress(FileExistsError):
                os.link(tmp, candidate)
                return candidate.name
        raise PathError(f"{filename}: no free file name")
    finally:
        Path(tmp).unlink(missing_ok=True)


async def serve_socket(server: Server, socket: WebSocket, client_id: str) -> None:
    """ComfyUI's /ws: the queue status first, then this client's execution messages and previews."""
    await socket.accept()
    queue = server.events.subscribe(client_id)
    sender = None
    try:
        await socket.send_json({"type": "status", "data": {**server.status(), "sid": client_id}})
        sender = asyncio.create_task(_forward(socket, queue))
        first = True
        while (message := await socket.receive())["type"] != "websocket.disconnect":
            flags = _feature_flags(message) if first else None
            if flags is not None:  # the client's capabilities; the server answers with its own
                server.events.set_features(client_id, flags)
                queue.put_nowait({"type": "feature_flags", "data": server_features(server)})
            first = False
    finally:
        if sender is not None:
            sender.cancel()
        server.events.unsubscribe(queue)


def _feature_flags(message: dict[str, Any]) -> dict[str, Any] | None:
    """The client's flags from a `{"type": "feature_flags", "data": {...}}` text message, else None."""
    try:
        body = loads(message.get("text") or "")
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("type") == "feature_flags" and isinstance(body.get("data"), dict):
        return body["data"]
    return None


async def _forward(socket: WebSocket, queue: asyncio.Queue) -> None:
    while True:
        message = await queue.get()
        if isinstance(message, bytes):
            await socket.send_bytes(message)
        else:
            await socket.send_json(message)
