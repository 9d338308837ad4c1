"""Request bodies are bounded before any route reads them: their size, and the nesting depth of JSON.

Python's JSON parser recurses once per nesting level, and so do pydantic, `copy.deepcopy` and `json.dumps`
after it: a body of 100,000 `[` would end as a RecursionError (HTTP 500) somewhere. `BodyLimits` reads
every body but forms, refuses one over `MAX_BODY_BYTES` (HTTP 413) or, when it may be JSON (a JSON or
text content type, or none, as FastAPI parses those), nested deeper than `MAX_JSON_DEPTH` (HTTP 400),
naming the limit, and hands the bytes on to the route. Forms (uploads) are only held to the size limit
and other types (raw user files) are not depth-checked: a route parsing JSON whatever the content type
says checks its body with `depth_problem` itself.
"""

from __future__ import annotations

import re

import numpy as np
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 128 << 20  # a 64 MiB image base64-encoded in an A1111 request, with room to spare
MAX_JSON_DEPTH = 64  # ComfyUI workflows with their UI graph nest ~10 levels, A1111 requests fewer
_FORMS = (b"multipart/form-data", b"application/x-www-form-urlencoded")
_MAYBE_JSON = re.compile(rb"(|application/json|application/[\w.+-]+\+json|text/[\w.+-]+)")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_PIECE = 1 << 22  # bytes scanned at once (bounds the scan's memory)


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets in strings do not count),
    counted vectorised so that a hostile body of millions of brackets costs milliseconds, not a parse."""
    text = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
    depth = deepest = 0
    for start in range(0, len(text), _PIECE):
        piece = text[start : start + _PIECE]
        steps = ((piece == ord("[")) | (piece == ord("{"))).astype(np.int32)
        steps -= (piece == ord("]")) | (piece == ord("}"))
        running = np.cumsum(steps) + depth
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


def depth_problem(raw: bytes, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why a JSON body is refused for its nesting (None when it is not)."""
    depth = json_depth(raw)
    if depth <= limit:
        return None
    return (
        f"the JSON body nests arrays and objects {depth} levels deep; the limit is {limit} (MAX_JSON_DEPTH)"
    )


class BodyLimits:
    """ASGI middleware holding request bodies to a size and JSON bodies to a nesting depth."""

    def __init__(
        self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH
    ) -> None:
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, 413, self._too_large(int(length)))
            return
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if media_type in _FORMS:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send, 413, self._too_large(len(body)))
                return
            if not message.get("more_body", False):
                break
        problem = depth_problem(bytes(body), self.max_depth) if _MAYBE_JSON.fullmatch(media_type) else None
        if problem is not None:
            await self._refuse(scope, receive, send, 400, problem)
            return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _too_large(self, size: int) -> str:
        limit = f"{self.max_bytes:,} (MAX_BODY_BYTES)"
        return f"the request body has {size:,} bytes or more; the limit is {limit}"

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel giving the buffered body once, then whatever the client sends next."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
