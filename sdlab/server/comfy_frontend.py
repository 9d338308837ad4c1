"""ComfyUI's own web frontend (the `comfyui-frontend-package` build, unmodified) and the routes it calls
beyond comfy.py's workflow API: start-up (extensions, system stats, users, features, i18n), settings and
user data per user (saved workflows), the jobs API over sdlab's job store, templates, model listings,
internal file listings, mask uploads, history clearing and `/free`.

The frontend computes its API base from the page's path, so when it is served at `/comfy/` it calls
`/comfy/api/...` and `/comfy/ws`: `mount` serves the routes there too. User data lives under the state
folder (`users/default/`, ComfyUI's single-user layout); every name from a request goes through
sdlab.server.paths (no `..`, no absolute paths, no symlink out).
"""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Form, HTTPException, Request, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import PngImagePlugin

from sdlab.checkpoints.io import CheckpointError, read_metadata
from sdlab.images import open_image
from sdlab.server.bodies import loads
from sdlab.server.comfy import MAX_UPLOAD_BYTES, history_entry, json_object, receive_upload, server_features
from sdlab.server.jobs import CANCELLED, DONE, FAILED, PENDING, RUNNING, Job, Live, Outcome
from sdlab.server.library import ModelCache
from sdlab.server.paths import PathError, confined, split_name
from sdlab.server.state import Server

FRONTEND_PACKAGE = "comfyui_frontend_package"
TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_USER = "default"
SETTINGS_FILE = "comfy.settings.json"
USER_FOLDERS = ("workflows", "subgraphs")
USER_FILES = {"comfy.templates.json": b"[]", "workflows/.index.json": b'{"favorites": []}'}
FREE_KIND = "free"  # the queue job that drops loaded models (POST /free), run between jobs as ComfyUI does

# sdlab job state -> the jobs API's status (a job cancelled before it ran is gone, as in ComfyUI's queue)
JOB_STATUS = {
    PENDING: "pending",
    RUNNING: "in_progress",
    DONE: "completed",
    FAILED: "failed",
    CANCELLED: "cancelled",
}
STATE_OF = {status: state for state, status in JOB_STATUS.items()}
PREVIEWABLE = ("images", "video", "audio")


def installed_frontend() -> Path | None:
    """The static folder of the installed `comfyui-frontend-package` (the `serve` extra), or None."""
    spec = importlib.util.find_spec(FRONTEND_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent / "static"
    return root if (root / "index.html").is_file() else None


def frontend_problem(root: Path) -> str | None:
    """Why `root` cannot be served as ComfyUI's frontend (`--front-end-root`), or None."""
    if not (root / "index.html").is_file():
        return f"{root}: not a ComfyUI frontend build (no index.html)"
    return None


# ---------------------------------------------------------------------------------------------
# serving the frontend


def mount(app: FastAPI, prefix: str, web_root: Path, routers: Iterable[APIRouter]) -> None:
    """Serve the frontend at `prefix` (`""` for `/`, or `/comfy`) with the API routes where it calls them.

    Call after every other route: the static files take whatever path is left under the prefix.
    """
    for router in routers:
        if prefix:  # `/` already has them, plainly and under /api
            app.include_router(router, prefix=prefix)
            app.include_router(router, prefix=prefix + "/api")

    @app.get(prefix + "/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(web_root / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get(prefix + "/templates/{name}", include_in_schema=False)
    def template(name: str) -> FileResponse:
        """sdlab's workflow templates (the frontend's "default" module)."""
        try:
            path = confined(TEMPLATES, "", name)
        except PathError as e:
            raise HTTPException(400, str(e)) from e
        if not path.is_file():
            raise HTTPException(404, f"no template file {name}")
        return FileResponse(path)

    @app.get(prefix + "/user.css", include_in_schema=False)
    def user_css() -> Response:
        """The page's first stylesheet; the user's own is /api/userdata/user.css."""
        return Response("", media_type="text/css")

    if prefix and (web_root / "assets").is_dir():  # the manifest's icons and the favicons ask for /assets/
        app.mount("/assets", StaticFiles(directory=web_root / "assets"), name="comfy-frontend-assets")
    app.mount(prefix or "/", StaticFiles(directory=web_root), name=f"comfy-frontend{prefix}")


def routes(server: Server, web_root: Path | None) -> APIRouter:
    """The frontend's routes beyond the workflow API (include plainly and under /api)."""
    api = APIRouter()
    users = UserData(server.folders.state / "users")
    users.create(DEFAULT_USER)

    @api.get("/extensions")
    def extensions() -> list[str]:
        if web_root is None:
            return []
        found = sorted((web_root / "extensions").rglob("*.js"))
        return ["/" + p.relative_to(web_root).as_posix() for p in found]

    @api.get("/system_stats")
    def system_stats() -> dict[str, Any]:
        return _system_stats(server)

    @api.get("/features")
    def features() -> dict[str, Any]:
        return server_features(server)

    @api.get("/i18n")
    def i18n() -> dict[str, Any]:
        return {}  # no custom nodes, so no translations beyond the frontend's own

    @api.get("/workflow_templates")
    def workflow_templates() -> dict[str, list[str]]:
        return {}  # custom-node templates; sdlab's own are the core index under /templates

    @api.get("/global_subgraphs")
    def global_subgraphs() -> dict[str, Any]:
        return {}

    @api.get("/global_subgraphs/{subgraph_id}")
    def global_subgraph(subgraph_id: str) -> None:
        raise HTTPException(404, f"no subgraph {subgraph_id}")

    # users, settings and user data ----------------------------------------------------------

    @api.get("/users")
    def get_users() -> dict[str, Any]:
        return {"storage": "server", "migrated": users.root(DEFAULT_USER).is_dir()}

    @api.post("/users")
    def post_users() -> JSONResponse:
        error = "sdlab serves one user ('default'); ComfyUI's --multi-user profiles are not supported"
        return JSONResponse({"error": error}, status_code=400)

    @api.get("/settings")
    def get_settings() -> dict[str, Any]:
        return users.settings(DEFAULT_USER)

    @api.post("/settings")
    async def post_settings(request: Request) -> dict[str, Any]:
        users.update_settings(DEFAULT_USER, await json_object(request))
        return {}

    @api.get("/settings/{setting_id}")
    def get_setting(setting_id: str) -> Any:
        return users.settings(DEFAULT_USER).get(setting_id)

    @api.post("/settings/{setting_id}")
    async def post_setting(setting_id: str, request: Request) -> dict[str, Any]:
        try:
            value = loads(await request.body())
        except ValueError as e:
            raise HTTPException(400, f"invalid JSON: {e}") from e
        users.update_settings(DEFAULT_USER, {setting_id: value})
        return {}

    @api.get("/userdata")
    def list_userdata(
        dir: str = "",  # noqa: A002 (ComfyUI's names)
        recurse: str = "",
        full_info: str = "",
        split: str = "",
    ) -> Any:
        if not dir:
            raise HTTPException(400, "Directory not provided")
        folder = users.path(DEFAULT_USER, dir)
        if not folder.is_dir():
            raise HTTPException(404, "Directory not found")
        files = users.files(DEFAULT_USER, folder, recurse.lower() == "true")
        if full_info.lower() == "true":
            return [file_info(p, folder) for p in files]
        names = [p.relative_to(folder).as_posix() for p in files]
        return [[n, *n.split("/")] for n in names] if split.lower() == "true" else names

    @api.get("/v2/userdata")
    def list_userdata_v2(path: str = "") -> list[dict[str, Any]]:
        return users.listing(DEFAULT_USER, path)

    @api.post("/userdata/{file:path}/move/{dest:path}")
    def move_userdata(file: str, dest: str, overwrite: str = "true", full_info: str = "false") -> Any:
        source, target = users.path(DEFAULT_USER, file), users.path(DEFAULT_USER, dest)
        if not source.is_file():
            raise HTTPException(404, f"{file}: no such file")
        if overwrite == "false" and target.exists():
            raise HTTPException(409, "File already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return users.written(DEFAULT_USER, target, full_info.lower() == "true")

    @api.get("/userdata/{file:path}")
    def get_userdata(file: str) -> Response:
        path = users.path(DEFAULT_USER, file)
        if path == users.path(DEFAULT_USER, "user.css"):
            css = path.read_bytes() if path.is_file() else b""  # absent: an empty sheet, not a 404
            return Response(css, media_type="text/css", headers={"X-Content-Type-Options": "nosniff"})
        if not path.is_file():
            raise HTTPException(404, f"{file}: no such file")
        # user data is arbitrary content: never rendered inline in this origin (ComfyUI's guard)
        headers = {"X-Content-Type-Options": "nosniff", "Content-Disposition": "attachment"}
        return FileResponse(path, media_type="application/octet-stream", headers=headers)

    @api.post("/userdata/{file:path}")
    async def post_userdata(
        file: str, request: Request, overwrite: str = "true", full_info: str = "false"
    ) -> Any:
        path = users.path(DEFAULT_USER, file)
        if overwrite == "false" and path.exists():
            raise HTTPException(409, "File already exists")
        body = await request.body()
        if len(body) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"user data larger than {MAX_UPLOAD_BYTES >> 20} MiB")
        write_atomic(path, body)
        return users.written(DEFAULT_USER, path, full_info.lower() == "true")

    @api.delete("/userdata/{file:path}")
    def delete_userdata(file: str) -> Response:
        path = users.path(DEFAULT_USER, file)
        if not path.is_file():
            raise HTTPException(404, f"{file}: no such file")
        path.unlink()
        return Response(status_code=204)

    # jobs, history and memory ----------------------------------------------------------------

    @api.get("/jobs")
    def get_jobs(
        status: str | None = None,
        workflow_id: str | None = None,
        sort_by: str = "created_at",
        sort_order: str = "desc",
        limit: int | None = None,
        offset: int = 0,
    ) -> dict[str, Any]:
        statuses = _statuses(status)
        if sort_by not in ("created_at", "execution_duration") or sort_order not in ("asc", "desc"):
            raise HTTPException(400, "sort_by is created_at or execution_duration; sort_order asc or desc")
        if offset < 0 or (limit is not None and limit <= 0):
            raise HTTPException(400, "offset must be >= 0 and limit > 0")
        jobs = [job_summary(j) for j in listed_jobs(server, statuses)]
        if workflow_id:
            jobs = [j for j in jobs if j.get("workflow_id") == workflow_id]
        jobs.sort(key=_sort_key(sort_by), reverse=sort_order == "desc")
        page = jobs[offset:] if limit is None else jobs[offset : offset + limit]
        more = offset + len(page) < len(jobs)
        pagination = {"offset": offset, "limit": limit, "total": len(jobs), "has_more": more}
        return {"jobs": page, "pagination": pagination}

    @api.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        job = server.store.get(job_id)
        if job is None or not _listed(job):
            raise HTTPException(404, f"no job {job_id}")
        return job_detail(job)

    @api.post("/jobs/cancel")
    async def cancel_jobs(request: Request) -> dict[str, Any]:
        ids = (await json_object(request)).get("job_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise HTTPException(400, "job_ids must be a list of job ids")
        return {"cancelled": [i for i in ids if cancel(server, i)]}

    @api.post("/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict[str, Any]:
        if not cancel(server, job_id):
            job = server.store.get(job_id)
            raise HTTPException(404 if job is None else 409, f"job {job_id} is not pending or running")
        return {"cancelled": [job_id]}

    @api.post("/history")
    async def post_history(request: Request) -> dict[str, Any]:
        body = await json_object(request)
        if body.get("clear"):
            server.store.forget(kind="comfy")
        if isinstance(body.get("delete"), list):
            server.store.forget([str(i) for i in body["delete"]], kind="comfy")
        return {}

    @api.post("/free")
    async def post_free(request: Request) -> dict[str, Any]:
        body = await json_object(request, required=False)
        if body.get("unload_models") or body.get("free_memory"):
            server.worker.submit(FREE_KIND, {})
        return {}

    # models and files ---------------------------------------------------------------------------

    @api.get("/models")
    def model_folders() -> list[str]:
        return list(_model_folders(server))

    @api.get("/models/{folder}")
    def models_in(folder: str) -> list[str]:
        return sorted(_folder(server, folder))  # folder_paths.get_filename_list sorts

    @api.get("/experiment/models")
    def experiment_folders() -> list[dict[str, Any]]:
        return [{"name": name, "folders": [name]} for name in _model_folders(server)]

    @api.get("/experiment/models/{folder}")
    def experiment_models(folder: str) -> list[dict[str, Any]]:
        files = _folder(server, folder)
        return [{"name": name, "pathIndex": 0, **_times(path)} for name, path in files.items()]

    @api.get("/view_metadata/{folder}")
    def view_metadata(folder: str, filename: str) -> dict[str, str]:
        path = _folder(server, folder).get(filename)
        if path is None or not filename.endswith(".safetensors") or not path.is_file():
            raise HTTPException(404, f"{folder}/{filename}: no such safetensors file")
        try:
            metadata = read_metadata(path)
        except CheckpointError as e:
            raise HTTPException(400, str(e)) from e
        if not metadata:
            raise HTTPException(404, f"{filename} has no metadata")
        return metadata

    @api.get("/internal/folder_paths")
    def folder_paths() -> dict[str, list[str]]:
        return {name: [name] for name in _model_folders(server)}

    @api.get("/internal/files/{directory_type}")
    def internal_files(directory_type: str) -> list[str]:
        try:
            folder = server.folders.by_type(directory_type)
        except PathError as e:
            raise HTTPException(400, str(e)) from e
        entries = [e for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
        return [e.name for e in sorted(entries, key=lambda e: -e.stat().st_mtime)]

    @api.post("/upload/mask")
    async def upload_mask(
        image: UploadFile,
        original_ref: str = Form(...),
        subfolder: str = Form(""),
        overwrite: str = Form(""),
        type: str = Form("input"),  # noqa: A002
    ) -> dict[str, str]:
        return await receive_upload(
            server, image, subfolder, overwrite, type, lambda data: _apply_mask(server, original_ref, data)
        )

    return api


# ---------------------------------------------------------------------------------------------
# user data


class UserData:
    """Each user's files (settings, saved workflows) under one folder, names confined to it."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._lock = threading.Lock()

    def root(self, user: str) -> Path:
        """The user's folder."""
        return self._root / user

    def create(self, user: str) -> None:
        """The user's folder with what the frontend looks for at start-up: the workflow and subgraph
        folders, no saved templates, no bookmarked workflows (absent, each is a 404 in the page's console)."""
        for folder in USER_FOLDERS:
            (self.root(user) / folder).mkdir(parents=True, exist_ok=True)
        for name, empty in USER_FILES.items():
            if not (self.root(user) / name).exists():
                write_atomic(self.root(user) / name, empty)

    def path(self, user: str, name: str) -> Path:
        """A file or folder of the user's, from a request's relative name (HTTP 400 when it leaves)."""
        try:
            return confined(self.root(user), *split_name(name))
        except PathError as e:
            raise HTTPException(400, str(e)) from e

    def files(self, user: str, folder: Path, recurse: bool) -> list[Path]:
        """The files in folder (and below it with recurse), as ComfyUI's glob finds them (no hidden names),
        links out of the user's folder skipped."""
        found = folder.rglob("*") if recurse else folder.glob("*")
        inside = self.root(user).resolve()
        return sorted(
            p
            for p in found
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            and p.resolve().is_relative_to(inside)
        )

    def listing(self, user: str, name: str) -> list[dict[str, Any]]:
        """ComfyUI's /v2/userdata: the entries below a folder, folders first, then by name."""
        base = self.root(user)
        folder = self.path(user, name) if name else base
        if not folder.exists():
            if folder == base:
                return []
            raise HTTPException(404, "Requested path not found")
        if not folder.is_dir():
            raise HTTPException(400, "Requested path is not a directory")
        entries = []
        for path in folder.rglob("*"):
            if not path.resolve().is_relative_to(base.resolve()):
                continue
            entry = {"name": path.name, "path": path.relative_to(base).as_posix()}
            if path.is_dir():
                entries.append({**entry, "type": "directory"})
            else:
                stat = path.stat()
                entries.append({**entry, "type": "file", "size": stat.st_size, "modified": stat.st_mtime})
        return sorted(entries, key=lambda e: (e["type"] != "directory", e["name"].lower()))

    def written(self, user: str, path: Path, full: bool) -> Any:
        """What a write or move answers: the relative path, or its file info."""
        return file_info(path, self.root(user)) if full else path.relative_to(self.root(user)).as_posix()

    def settings(self, user: str) -> dict[str, Any]:
        """The user's settings (an empty map before the first is stored)."""
        path = self.root(user) / SETTINGS_FILE
        with self._lock:
            return json.loads(path.read_text()) if path.is_file() else {}

    def update_settings(self, user: str, values: dict[str, Any]) -> None:
        """Store settings, keeping the others."""
        path = self.root(user) / SETTINGS_FILE
        with self._lock:
            current = json.loads(path.read_text()) if path.is_file() else {}
            write_atomic(path, json.dumps({**current, **values}, indent=4).encode())


def file_info(path: Path, relative_to: Path) -> dict[str, Any]:
    """ComfyUI's file info: path relative to a folder, size, and times in milliseconds."""
    return {"path": path.relative_to(relative_to).as_posix(), "size": path.stat().st_size, **_times(path)}


def _times(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"modified": int(stat.st_mtime * 1000), "created": int(stat.st_ctime * 1000)}


def write_atomic(path: Path, data: bytes) -> None:
    """Replace path's contents all at once (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".write-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# jobs


def _statuses(value: str | None) -> tuple[str, ...]:
    if value is None:
        return tuple(STATE_OF)
    statuses = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in statuses if s not in STATE_OF]
    if unknown:
        raise HTTPException(400, f"unknown status {', '.join(unknown)}; expected {', '.join(STATE_OF)}")
    return statuses


def _listed(job: Job) -> bool:
    """Whether the jobs API shows a job: every queued or running one, and workflows that ran."""
    if job.state in (PENDING, RUNNING):
        return True
    return job.kind == "comfy" and job.started is not None


def listed_jobs(server: Server, statuses: tuple[str, ...]) -> list[Job]:
    """The jobs in the given API statuses."""
    jobs = server.store.jobs(tuple(STATE_OF[s] for s in statuses))
    return [j for j in jobs if _listed(j) and j.kind != FREE_KIND]


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def job_summary(job: Job) -> dict[str, Any]:
    """A job as ComfyUI's /api/jobs lists it."""
    extra = (job.request.get("extra_data") or {}) if job.kind == "comfy" else {}
    workflow = (extra.get("extra_pnginfo") or {}).get("workflow")
    outputs = (job.result or {}).get("outputs", {})
    count, previewable, preview = _outputs_summary(outputs)
    error = next((m[1] for m in (job.result or {}).get("messages", []) if m[0] == "execution_error"), None)
    create_time = extra.get("create_time")
    summary = {
        "id": job.id,
        "status": JOB_STATUS[job.state],
        "priority": job.number,
        "create_time": create_time if isinstance(create_time, int) else _ms(job.created),
        "execution_start_time": _ms(job.started),
        "execution_end_time": _ms(job.finished),
        "execution_error": error,
        "outputs_count": count,
        "previewable_outputs_count": previewable,
        "preview_output": preview,
        "workflow_id": workflow.get("id") if isinstance(workflow, dict) else None,
    }
    return {k: v for k, v in summary.items() if v is not None or k in ("outputs_count", "preview_output")}


def job_detail(job: Job) -> dict[str, Any]:
    """One job with its outputs, execution status and workflow (ComfyUI's /api/jobs/{id})."""
    detail = job_summary(job)
    if job.kind != "comfy":
        return detail
    entry = history_entry(job) if job.started is not None and job.state not in (PENDING, RUNNING) else None
    detail["workflow"] = {"prompt": job.request["prompt"], "extra_data": job.request.get("extra_data", {})}
    if entry is not None:
        detail["outputs"] = entry["outputs"]
        detail["execution_status"] = entry["status"]
    return detail


def _outputs_summary(outputs: dict[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
    """How many outputs, how many previewable, and the one to preview (saved images first)."""
    count = previewable = 0
    preview = fallback = None
    for node_id, node_outputs in outputs.items():
        for media, items in node_outputs.items():
            if media == "animated" or not isinstance(items, list):
                continue
            for item in items:
                count += 1
                if media not in PREVIEWABLE:
                    continue
                previewable += 1
                enriched = {**item, "nodeId": node_id, "mediaType": media}
                if preview is None and item.get("type") == "output":
                    preview = enriched
                elif fallback is None:
                    fallback = enriched
    return count, previewable, preview or fallback


def _sort_key(sort_by: str) -> Any:
    if sort_by == "execution_duration":
        return lambda j: (j.get("execution_end_time") or 0) - (j.get("execution_start_time") or 0)
    return lambda j: (j["create_time"], j["priority"])


def cancel(server: Server, job_id: str) -> bool:
    """Cancel a pending job or interrupt a running one; False when it is neither."""
    return bool(server.worker.cancel([job_id])) or server.worker.interrupt(job_id)


def run_free(server: Server, job: Job, live: Live) -> Outcome:
    """POST /free: drop the loaded models (between jobs, on the worker thread that uses them)."""
    server.models = ModelCache(server.library, placement=server.models.placement)
    gc.collect()
    return Outcome(DONE, {})


# ---------------------------------------------------------------------------------------------
# models, memory, masks


def _model_folders(server: Server) -> dict[str, dict[str, Path]]:
    """ComfyUI's model folder names sdlab reads, in folder_paths' order (then ComfyUI_IPAdapter_plus's
    `ipadapter`) -> listed name -> path (configs: none, sdlab detects models)."""
    library = server.library
    return {
        "checkpoints": library.checkpoints(),
        "configs": {},
        "loras": library.loras(),
        "vae": library.vaes(),
        "text_encoders": library.listing("text_encoders"),
        "diffusion_models": library.listing("diffusion_models"),
        "clip_vision": library.clip_visions(),
        "embeddings": library.embeddings(),
        "controlnet": library.controlnets(),
        "upscale_models": library.upscale_models(),
        "ipadapter": library.ipadapters(),
    }


def _folder(server: Server, folder: str) -> dict[str, Path]:
    folders = _model_folders(server)
    if folder not in folders:
        raise HTTPException(404, f"no model folder {folder!r}; known: {', '.join(folders)}")
    return folders[folder]


def _system_stats(server: Server) -> dict[str, Any]:
    """ComfyUI's /system_stats: this machine's RAM and the device the server's models run on."""
    page = os.sysconf("SC_PAGE_SIZE")
    ram_total, ram_free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    system = {
        "os": os.name,
        "ram_total": ram_total,
        "ram_free": ram_free,
        "comfyui_version": f"sdlab {_version()}",
        "python_version": sys.version,
        "pytorch_version": torch.__version__,
        "embedded_python": False,
        "argv": ["sdlab", "serve"],
        "platform": platform.platform(),
    }
    return {"system": system, "devices": [_device_stats(server.models.device(), ram_total, ram_free)]}


def _device_stats(device: torch.device, ram_total: int, ram_free: int) -> dict[str, Any]:
    """A device as ComfyUI's model_management reports it (get_torch_device_name, get_total_memory,
    get_free_memory): a GPU's memory from the driver (mem_get_info) and torch's allocator (reserved, and
    reserved but inactive, counted free), the CPU's or MPS' the machine's RAM."""
    if device.type != "cuda":
        return {
            "name": device.type,
            "type": device.type,
            "index": device.index,
            "vram_total": ram_total,
            "vram_free": ram_free,
            "torch_vram_total": ram_total,
            "torch_vram_free": ram_free,
        }
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    stats = torch.cuda.memory_stats(device)
    reserved = stats.get("reserved_bytes.all.current", 0)
    unused = reserved - stats.get("active_bytes.all.current", 0)
    free, total = torch.cuda.mem_get_info(device)
    try:
        backend = torch.cuda.get_allocator_backend()
    except RuntimeError:
        backend = ""
    return {
        "name": f"{device} {torch.cuda.get_device_name(device)} : {backend}",
        "type": "cuda",
        "index": device.index,
        "vram_total": total,
        "vram_free": free + unused,
        "torch_vram_total": reserved,
        "torch_vram_free": unused,
    }


def _version() -> str:
    try:
        return importlib.metadata.version("sdlab")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _apply_mask(server: Server, original_ref: str, mask_png: bytes) -> bytes:
    """ComfyUI's mask upload: the referenced image with the uploaded image's alpha, its text chunks kept."""
    try:
        ref = loads(original_ref)
        folder = server.folders.by_type(ref.get("type", "output") if isinstance(ref, dict) else "")
        path = confined(folder, ref.get("subfolder", ""), ref["filename"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PathError(f"original_ref: expected {{filename, subfolder, type}} ({e})") from e
    if not path.is_file():
        raise PathError(f"original_ref: {ref['filename']}: no such file")
    limits = server.settings.image_limits  # both images read as LoadImage does: bounded, EXIF applied
    masked = open_image(path, f"original_ref: {ref['filename']}", limits, mode="RGBA")
    mask = open_image(mask_png, "mask", limits, mode="RGBA")
    info = PngImagePlugin.PngInfo()
    for key, value in masked.info.items():
        info.add_text(key, value)
    masked.putalpha(mask.getchannel("A").resize(masked.size))
    buffer = io.BytesIO()
    masked.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()
