"""AUTOMATIC1111's "Extras" upscaling over its API: `/sdapi/v1/upscalers`, `/sdapi/v1/extra-single-image`
and `/sdapi/v1/extra-batch-images`, as A1111's `scripts/postprocessing_upscale.py` runs them.

Upscaler 1 "None" leaves the image untouched; otherwise it is upscaled by `upscaling_resize`
(resize_mode 0) or to cover `upscaling_resize_w` x `upscaling_resize_h` (resize_mode 1, centred on a
black canvas of that size with `upscaling_crop`), and upscaler 2 at `extras_upscaler_2_visibility` is
blended over it. Face restoration (GFPGAN, CodeFormer) is not implemented: a non-zero visibility is
refused naming the field.
"""

from __future__ import annotations

import base64
import html
import io
import threading
from typing import Any

from fastapi import APIRouter, HTTPException
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from sdlab.checkpoints.io import CheckpointError
from sdlab.server.state import MAX_JOB_IMAGES, Server
from sdlab.upscale import BUILTIN_UPSCALERS, upscale_image, upscaler_files, upscaler_names

A1111_UPSCALER_SCALE = 4  # A1111's UpscalerData.scale, reported for every upscaler whatever its model


class ExtrasRequest(BaseModel):
    """A1111's ExtrasBaseRequest fields with its defaults and bounds."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    resize_mode: int = Field(0, ge=0, le=1)  # 0: scale by upscaling_resize, 1: to upscaling_resize_w x _h
    show_extras_results: bool = True  # A1111 only reads it for folder batches
    gfpgan_visibility: float = Field(0.0, ge=0, le=1)
    codeformer_visibility: float = Field(0.0, ge=0, le=1)
    codeformer_weight: float = Field(0.0, ge=0, le=1)
    upscaling_resize: float = Field(2.0, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0, le=1)
    upscale_first: bool = False  # the order against face restoration, which sdlab refuses anyway


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = ""


class FileData(BaseModel):
    data: str
    name: str


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData] = Field(max_length=MAX_JOB_IMAGES)  # noqa: N815 (A1111's field name)


def extras_routes(api: APIRouter, server: Server) -> None:
    """Add the upscaler listing and the two extras routes to the `/sdapi/v1` router."""
    from sdlab.server.a1111 import decode_image  # a1111 includes these routes: import when called

    one_at_a_time = threading.Lock()  # as A1111's queue lock: concurrent requests wait, memory stays bounded

    @api.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        return upscaler_listing(server)

    @api.post("/extra-single-image")
    def extra_single_image(body: ExtrasSingleImageRequest) -> dict[str, Any]:
        _check(server, body)
        image = decode_image(body.image, "image", server.settings.image_limits)
        with one_at_a_time:
            encoded, info = _postprocess(server, body, image)
        return {"html_info": info, "image": encoded}

    @api.post("/extra-batch-images")
    def extra_batch_images(body: ExtrasBatchImagesRequest) -> dict[str, Any]:
        _check(server, body)
        results, info = [], ""
        for i, item in enumerate(body.imageList):
            image = decode_image(item.data, f"imageList[{i}].data", server.settings.image_limits)
            with one_at_a_time:
                encoded, info = _postprocess(server, body, image)
            results.append(encoded)
        return {"html_info": info, "images": results}


def upscaler_listing(server: Server) -> list[dict[str, Any]]:
    """A1111's upscaler list: the built-ins, then one entry per model file (named by its stem, the path
    given relative to the models folder)."""
    dirs = server.library.upscaler_dirs()
    files = upscaler_files(dirs)
    root = server.library.root
    return [
        {
            "name": name,
            "model_name": None if name in BUILTIN_UPSCALERS else name,
            "model_path": None if name in BUILTIN_UPSCALERS else files[name].relative_to(root).as_posix(),
            "model_url": None,
            "scale": A1111_UPSCALER_SCALE,
        }
        for name in upscaler_names(dirs)
    ]


def _check(server: Server, body: ExtrasRequest) -> None:
    """Refuse what sdlab cannot do and names it does not know (A1111 asserts both upscalers, used or not),
    naming the field."""
    for field in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, field) > 0:
            raise HTTPException(422, f"{field}: face restoration is not implemented in sdlab; send 0")
    names = upscaler_names(server.library.upscaler_dirs())
    for field in ("upscaler_1", "upscaler_2"):
        if getattr(body, field) not in names:
            name = getattr(body, field)
            raise HTTPException(404, f"{field}: upscaler {name!r} not found; available: {', '.join(names)}")


def _postprocess(server: Server, body: ExtrasRequest, image: Image.Image) -> tuple[str, str]:
    """The image after A1111's upscale step as base64 PNG (keeping the input's text chunks, adding the
    `postprocessing` text as A1111 does), and that text as A1111's html_info."""
    info: dict[str, Any] = {}
    out = image.convert("RGB")
    if body.upscaler_1 != "None":
        out = _upscale(server, body, out, body.upscaler_1, "upscaler_1", info)
        info["Postprocess upscaler"] = body.upscaler_1
        if body.upscaler_2 != "None" and body.extras_upscaler_2_visibility > 0:
            second = _upscale(server, body, image.convert("RGB"), body.upscaler_2, "upscaler_2", info)
            out = Image.blend(out, second, body.extras_upscaler_2_visibility)
            info["Postprocess upscaler 2"] = body.upscaler_2
    text = ", ".join(f"{k}: {v}" for k, v in info.items())
    chunks = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    if text:
        chunks["postprocessing"] = text
    return _png_base64(out, chunks), f"<p>{html.escape(text)}</p>" if text else ""


def _upscale(
    server: Server, body: ExtrasRequest, image: Image.Image, name: str, field: str, info: dict[str, Any]
) -> Image.Image:
    """One upscaler's result (A1111's ScriptPostprocessingUpscale.upscale)."""
    w, h = body.upscaling_resize_w, body.upscaling_resize_h
    if body.resize_mode == 1:
        scale = max(w / image.width, h / image.height)
        info["Postprocess upscale to"] = f"{w}x{h}"
    else:
        scale = body.upscaling_resize
        info["Postprocess upscale by"] = scale
    limit = server.settings.image_limits.max_pixels
    if image.width * scale * image.height * scale > limit:
        raise HTTPException(413, f"upscaling_resize: the result would have more than {limit:,} pixels")
    try:
        out = upscale_image(image, name, scale, server.library.upscaler_dirs(), convention="a1111")
    except (CheckpointError, ValueError) as e:
        raise HTTPException(422, f"{field}: {e}") from e
    if body.resize_mode == 1 and body.upscaling_crop:
        canvas = Image.new("RGB", (w, h))
        canvas.paste(out, (w // 2 - out.width // 2, h // 2 - out.height // 2))
        info["Postprocess crop to"] = f"{w}x{h}"
        out = canvas
    return out


def _png_base64(image: Image.Image, text: dict[str, str]) -> str:
    """Base64 PNG with text chunks (A1111's encode_pil_to_base64 with PNG info enabled)."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
