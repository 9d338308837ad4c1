"""Request bodies are bounded before any route reads them: their size, and the nesting depth of JSON.

Python's JSON parser recurses once per nesting level, and so do pydantic, `copy.deepcopy` and `json.dumps`
after it: a body of 100,000 `[` would end as a RecursionError (HTTP 500) somewhere. `BodyLimits` reads
every body but forms, refuses one over `MAX_BODY_BYTES` (HTTP 413) or, when it may be JSON (a JSON or
text content type, or none, as FastAPI parses those), nested deeper than `MAX_JSON_DEPTH` (HTTP 400),
naming the limit, and hands the bytes on to the route. Forms (uploads) are streamed on to the route, held
to their own size limit by the Content-Length header and a counter on the stream (Starlette would spool a
whole upload before the route sees it), and other types (raw user files) are not depth-checked: a route
parsing JSON whatever the content type says reads it with `loads`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 128 << 20  # a 64 MiB image base64-encoded in an A1111 request, with room to spare
MAX_JSON_DEPTH = 64  # ComfyUI workflows with their UI graph nest ~10 levels, A1111 requests fewer
FORM_OVERHEAD = 1 << 20  # a multipart upload's form fields and boundaries, beyond the file's own bytes
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


def loads(raw: bytes | str, limit: int = MAX_JSON_DEPTH) -> Any:
    """json.loads of client text with its nesting checked first: a ValueError naming the depth, never a
    RecursionError."""
    data = raw.encode() if isinstance(raw, str) else raw
    if (problem := depth_problem(data, limit)) is not None:
        raise ValueError(problem)
    return json.loads(data)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's HTTP 422 with the inputs it echoes made JSON: a NaN or Infinity the client sent shows as
    text (FastAPI's own handler cannot encode it and answers 500)."""
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)


def _finite(value: Any) -> Any:
    """`value` with non-finite floats as strings ('nan', 'inf'); bodies nest at most MAX_JSON_DEPTH."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class BodyLimits:
    """ASGI middleware holding request bodies to a size, forms (uploads) to `max_form_bytes` and JSON
    bodies to a nesting depth."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = MAX_BODY_BYTES,
        max_depth: int = MAX_JSON_DEPTH,
        max_form_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth
        self.max_form_bytes = max_form_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        too_large = self._form_too_large if media_type in _FORMS else self._too_large
        limit = self.max_form_bytes if media_type in _FORMS else self.max_bytes
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await self._refuse(scope, receive, send, 413, too_large(int(length)))
            return
        if media_type in _FORMS:
            await self.app(scope, _counted(receive, limit, too_large), send)
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

    def _form_too_large(self, size: int) -> str:
        limit = f"{self.max_form_bytes:,} (the file limit, --max-image-bytes, and 1 MiB of form fields)"
        return f"the upload has {size:,} bytes or more; the limit is {limit}"

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


def _counted(receive: Receive, limit: int, too_large: Callable[[int], str]) -> Receive:
    """A receive channel that ends a streamed body past `limit` bytes with an HTTP 413 (raised to the
    app's exception handling, as the route is already reading it)."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise HTTPException(413, too_large(seen))
        return message

    return counted


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel giving the buffered body once, then whatever the client sends next."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
