"""`POST /sdlab/v1/vae/roundtrip`: what the VAE's 48x lossy compression keeps and loses (the UI's VAE page).

Like the generation routes, a round trip is a queued job (kind "vae") that the one worker runs, never
beside another job: its image is stored in the input folder, its results (the reconstruction and each
latent channel as a grayscale PNG) are written to the temp folder and answered as base64. Requests
name models only by their listed names, never by path.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi import APIRouter, HTTPException
from PIL import Image
from pydantic import BaseModel
from torch import Tensor

from sdlab.images import save_png
from sdlab.server.a1111 import _checkpoint, _read_base64, _store_image, decode_image
from sdlab.server.jobs import DONE, FAILED, Job, Live, Outcome, QueueFull, new_job_id
from sdlab.server.paths import confined, split_name
from sdlab.server.state import Server
from sdlab.vae_tools import crop_note, encode_image, roundtrip

KIND = "vae"
RESULTS = "vae-roundtrip"  # temp subfolder of the results
NUMBERS = ("latent_shape", "compression_ratio", "psnr_db", "size", "note", "channel_ranges")


class RoundTripRequest(BaseModel):
    """An image (base64 or a data: URL) and the listed checkpoint whose VAE to use (default: the current)."""

    image: str
    model: str | None = None


def routes(server: Server) -> APIRouter:
    """The `/sdlab/v1/vae` routes of one server."""
    api = APIRouter(prefix="/sdlab/v1/vae")

    @api.post("/roundtrip")
    async def vae_roundtrip(body: RoundTripRequest) -> dict[str, Any]:
        """Encode an image to its latent (posterior mean) and decode it back: reconstruction, the latent's
        channels (each stretched to its own min..max), latent shape, compression ratio and PSNR."""
        job_id = new_job_id()
        image = decode_image(body.image, "image", server.settings.image_limits)
        checkpoint = _checkpoint(server, body.model or server.options["sd_model_checkpoint"])
        request = {"checkpoint": checkpoint, "image": _store_image(server, job_id, "image", image)}
        try:
            server.worker.submit(KIND, request, job_id)
        except QueueFull as e:
            confined(server.folders.inputs, *split_name(request["image"])).unlink(missing_ok=True)
            raise HTTPException(429, str(e)) from e
        job = await asyncio.wrap_future(server.worker.wait(job_id))
        if job.state != DONE:
            raise HTTPException((job.result or {}).get("http_status", 500), job.error or job.state)
        return _answer(server, job.result or {})

    return api


def run(server: Server, job: Job, live: Live) -> Outcome:
    """Round-trip the job's image through its checkpoint's VAE; write the reconstruction and channels."""
    model = server.models.model(job.request["checkpoint"])
    with Image.open(server.file("input", *split_name(job.request["image"]))) as im:
        image = im.convert("RGB")
    try:
        report = roundtrip(model, image)
    except ValueError as e:  # an image smaller than the VAE's downscale
        return Outcome(FAILED, {"http_status": 422}, str(e))
    latent = encode_image(model, image)[0]  # the posterior mean again: roundtrip keeps only its shape
    size = report.reconstruction.size
    result = {
        "reconstruction": _save(server, job, "reconstruction", report.reconstruction),
        "channels": [_save(server, job, f"channel{i}", c) for i, c in enumerate(channel_images(latent))],
        "latent_shape": list(report.latent_shape),
        "compression_ratio": report.compression_ratio,
        "psnr_db": None if math.isinf(report.psnr_db) else report.psnr_db,  # None: a lossless round trip
        "size": list(size),
        "note": crop_note(report.original_size, size, size[0] // report.latent_shape[-1]),
        "channel_ranges": [[c.min().item(), c.max().item()] for c in latent],
    }
    return Outcome(DONE, result)


def channel_images(latent: Tensor) -> list[Image.Image]:
    """Each channel of a (C, h, w) latent as an h x w grayscale image, stretched to its own min..max."""
    images = []
    for channel in latent.float():
        low, high = channel.min(), channel.max()
        scaled = (channel - low) / (high - low).clamp_min(1e-12)
        images.append(Image.fromarray(scaled.mul(255).round().byte().numpy()))
    return images


def _save(server: Server, job: Job, name: str, image: Image.Image) -> dict[str, str]:
    """Write a result image into the temp folder; its file reference (as in A1111 job results)."""
    path = save_png(image, server.folders.temp / RESULTS / f"{job.id}-{name}.png")
    return {"filename": path.name, "subfolder": RESULTS, "type": "temp"}


def _answer(server: Server, result: dict[str, Any]) -> dict[str, Any]:
    images = {
        "reconstruction": _read_base64(server, result["reconstruction"]),
        "channels": [_read_base64(server, ref) for ref in result["channels"]],
    }
    return images | {key: result[key] for key in NUMBERS}
