"""The FastAPI application: both APIs over one queue, the job routes, the web UI and the guard.

The guard refuses cross-site requests (an `Origin` that is not the `Host`, so a web page elsewhere
cannot drive a local server) and, when an API key is set, every request without it: HTTP bearer
(`Authorization: Bearer KEY`) or basic auth with the key as password (any user name).

Without an API key it also refuses (HTTP 403, or a refused WebSocket handshake) any `Host` that is not
a loopback name (`localhost`, 127.0.0.0/8, `[::1]`, any port) or one of `Settings.allowed_hosts`: a
page on another domain that resolves to 127.0.0.1 (DNS rebinding) sends its own name as `Host` and as
`Origin`, which the Origin check alone lets through. A request without `Host` (only HTTP/1.0 may omit
it; browsers, httpx and curl always send it) is refused too. With an API key the key authenticates
and the Host check is not applied, as a server on a public address is reached under any name.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from sdlab.server import a1111, comfy, comfy_frontend, controlnet_api, vae_routes
from sdlab.server.bodies import FORM_OVERHEAD, BodyLimits, invalid_request
from sdlab.server.cli import host_name, is_loopback
from sdlab.server.jobs import PENDING
from sdlab.server.state import Server, Settings

STATIC = Path(__file__).parent / "static"
RUNNERS = {
    "a1111": a1111.run,
    "comfy": comfy.run,
    vae_routes.KIND: vae_routes.run,
    comfy_frontend.FREE_KIND: comfy_frontend.run_free,
}
# the web UI loads nothing from elsewhere (no CDN) and talks only to this server
UI_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


def create_app(settings: Settings) -> FastAPI:
    """An application serving `settings`; its worker runs while the application does.

    ComfyUI's frontend (the installed `comfyui-frontend-package`, or `settings.front_end_root`) is served
    at `/comfy/`, and at `/` with `settings.ui == "comfy"`; sdlab's own web UI is at `/sdlab/` and
    otherwise at `/`."""
    web_root = settings.front_end_root or comfy_frontend.installed_frontend()
    if settings.ui == "comfy" and web_root is None:
        raise ValueError("ui 'comfy' needs ComfyUI's frontend: pip install comfyui-frontend-package")
    server = Server.open(settings, RUNNERS)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start()
        yield
        server.stop()

    app = FastAPI(title="sdlab", lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(RequestValidationError, invalid_request)
    # inside the guard: refused clients send no body to read; uploads are user images
    app.add_middleware(BodyLimits, max_form_bytes=settings.image_limits.max_bytes + FORM_OVERHEAD)
    app.add_middleware(Guard, api_key=settings.api_key, allowed_hosts=settings.allowed_hosts)
    app.include_router(a1111.routes(server))
    app.include_router(controlnet_api.routes(server))
    comfy_routes = comfy.routes(server)
    frontend_routes = comfy_frontend.routes(server, web_root)
    for router in (comfy_routes, frontend_routes):
        app.include_router(router)
        app.include_router(router, prefix="/api")
    app.include_router(vae_routes.routes(server))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/sdlab/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": UI_POLICY})

    if settings.ui != "comfy":
        app.get("/", include_in_schema=False)(index)

    @app.get("/sdlab/v1/jobs/{job_id}")
    def job_status(job_id: str) -> dict[str, Any]:
        """A job of either API: its state, result, error, and live progress while it runs."""
        return _job_status(server, job_id)

    @app.post("/sdlab/v1/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel a pending job, or interrupt it if it is running."""
        if comfy_frontend.cancel(server, job_id):
            return _job_status(server, job_id)
        if server.store.get(job_id) is None:
            raise HTTPException(404, f"no job {job_id}")
        raise HTTPException(409, f"job {job_id} has already finished")

    if web_root is not None:  # last: its static files take the paths left under its prefix
        routers = (comfy_routes, frontend_routes)
        comfy_frontend.mount(app, "/comfy", web_root, routers)
        if settings.ui == "comfy":
            comfy_frontend.mount(app, "", web_root, routers)
    return app


def _job_status(server: Server, job_id: str) -> dict[str, Any]:
    job = server.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    live = server.worker.live_of(job_id)
    progress = None
    if live is not None:
        progress = {"step": live.step, "total": live.total, "batch": live.job_no, "batches": live.job_count}
        progress["node"] = live.node
    ahead = (
        sum(1 for j in server.store.jobs((PENDING,)) if j.number < job.number) if job.state == PENDING else 0
    )
    fields = ("id", "kind", "state", "number", "error", "result", "created", "started", "finished")
    return {**{f: getattr(job, f) for f in fields}, "queue_position": ahead, "progress": progress}


class Guard:
    """ASGI middleware refusing cross-site requests, unauthenticated ones with an API key, and without
    one, requests for a `Host` that is neither loopback nor allowed (DNS rebinding)."""

    def __init__(self, app: ASGIApp, api_key: str | None, allowed_hosts: Iterable[str] = ()) -> None:
        self.app, self.api_key = app, api_key or None
        self.allowed_hosts = frozenset(host_name(h) for h in allowed_hosts if h.strip())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope["headers"])
            host = headers.get(b"host")
            if self.api_key is None and not self._host_allowed(host):
                shown = "(none)" if host is None else host.decode("latin-1")
                name = "NAME" if host is None else host_name(host.decode("latin-1")) or "NAME"
                detail = (
                    f"host {shown!r} is not allowed: without an API key only loopback names (localhost, "
                    f"127.0.0.1, [::1]) are served; to allow it, run `sdlab serve --allowed-hosts {name}` "
                    "(or set an API key)"
                )
                await _refuse(scope, receive, send, 403, detail)
                return
            status = 403 if _cross_site(headers) else None
            if status is None and self.api_key is not None and not _authorized(headers, self.api_key):
                status = 401
            if status is not None:
                await _refuse(scope, receive, send, status)
                return
        await self.app(scope, receive, send)

    def _host_allowed(self, host: bytes | None) -> bool:
        if host is None:
            return False
        name = host_name(host.decode("latin-1"))
        return is_loopback(name) or name in self.allowed_hosts


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str | None = None) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    if detail is None:
        detail = "cross-site request refused" if status == 403 else "an API key is required"
    headers = {"WWW-Authenticate": 'Basic realm="sdlab"'} if status == 401 else None
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


def _cross_site(headers: dict[bytes, bytes]) -> bool:
    origin, host = headers.get(b"origin"), headers.get(b"host")
    if origin is None or host is None:
        return False
    return urlsplit(origin.decode("latin-1")).netloc.lower() != host.decode("latin-1").lower()


def _authorized(headers: dict[bytes, bytes], api_key: str) -> bool:
    scheme, _, credential = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "basic":
        try:
            credential = base64.b64decode(credential.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credential.strip().encode(), api_key.encode())
