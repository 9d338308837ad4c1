"""AUTOMATIC1111's web API (`/sdapi/v1/...`): its field names and defaults, one `GenerationRequest` per batch.

txt2img/img2img enqueue a job and wait for it (synchronous for the client, like A1111); the job
stores the request with seed resolved and its images as files in the input folder, so it can run
after a restart. Results are written as PNGs with the A1111 `parameters` chunk: into
`outputs/txt2img-images` / `outputs/img2img-images` with `save_images`, else into the temp folder.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, model_validator

from sdlab.checkpoints.load import StableDiffusion
from sdlab.diffusion.samplers import SAMPLERS, display_name, resolve_sampler
from sdlab.diffusion.schedule import SCHEDULE_DISPLAY, schedule_display_name
from sdlab.images import next_output_path, save_png
from sdlab.infotext import parse_infotext, request_infotext
from sdlab.pipeline import GenerationRequest, generate, resolve_seed
from sdlab.server.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    Interrupted,
    Job,
    Live,
    Outcome,
    QueueFull,
    Skipped,
    new_job_id,
)
from sdlab.server.library import UnknownName, stem
from sdlab.server.paths import confined, split_name
from sdlab.server.preview import latent_preview, png_base64
from sdlab.server.state import Server

A1111_RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill", 3: "resize"}  # 3 (latent upscale) resizes pixels
JOB_IMAGES = ".jobs"  # input subfolder holding the images of queued A1111 jobs
SETTABLE_OPTIONS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
MAX_CLIP_SKIP = 12


class _Request(BaseModel):
    """Fields both A1111 generation routes take; others are ignored, null means the default."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    override_settings: dict[str, Any] = {}
    send_images: bool = True
    save_images: bool = False
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_nulls(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class Txt2ImgRequest(_Request):
    """A1111's txt2img body (StableDiffusionTxt2ImgProcessingAPI), the fields sdlab uses."""

    denoising_strength: float | None = None  # hires fix only; not supported


class Img2ImgRequest(_Request):
    """A1111's img2img body: txt2img's fields plus the init image, mask and strength."""

    init_images: list[str] = []
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int = 4
    inpainting_mask_invert: int = 0
    resize_mode: int = 0
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    """A base64 PNG whose generation parameters to read."""

    image: str


def routes(server: Server) -> APIRouter:
    """The `/sdapi/v1` routes of one server."""
    api = APIRouter(prefix="/sdapi/v1")

    @api.post("/txt2img")
    async def txt2img(body: Txt2ImgRequest) -> dict[str, Any]:
        return await _generate(server, "txt2img", body)

    @api.post("/img2img")
    async def img2img(body: Img2ImgRequest) -> dict[str, Any]:
        return await _generate(server, "img2img", body)

    @api.get("/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return _progress(server.worker.live, skip_current_image)

    @api.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        server.worker.interrupt()
        return {}

    @api.post("/skip")
    def skip() -> dict[str, Any]:
        live = server.worker.live
        if live is not None and live.job.kind == "a1111":
            live.skipped = True
        return {}

    @api.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [_model_item(server, name, path) for name, path in server.library.checkpoints().items()]

    @api.get("/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        return [{"model_name": stem(name), "filename": name} for name in server.library.vaes()]

    @api.get("/loras")
    def loras() -> list[dict[str, Any]]:
        return [
            {"name": stem(name), "alias": stem(name), "path": name, "metadata": {}}
            for name in server.library.loras()
        ]

    @api.get("/embeddings")
    def embeddings() -> dict[str, Any]:
        skipped = {  # listed, not applied: prompts do not expand textual-inversion embeddings yet
            stem(name): {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": 0,
                "vectors": 0,
            }
            for name in server.library.embeddings()
        }
        return {"loaded": {}, "skipped": skipped}

    @api.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": display_name(name), "aliases": [name], "options": {}} for name in SAMPLERS]

    @api.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        names = {"automatic": "Automatic", **SCHEDULE_DISPLAY}
        return [
            {"name": name, "label": label, "aliases": None, "default_rho": None, "need_inner_model": None}
            for name, label in names.items()
        ]

    @api.get("/options")
    def get_options() -> dict[str, Any]:
        return _options(server)

    @api.post("/options")
    def set_options(body: dict[str, Any]) -> bool:
        _set_options(server, body)
        return True

    @api.post("/png-info")
    def png_info(body: PngInfoRequest) -> dict[str, Any]:
        image = decode_image(body.image)
        info = image.info.get("parameters", "")
        items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, str)}
        return {"info": info, "items": items, "parameters": parse_infotext(info) if info else {}}

    return api


# ---------------------------------------------------------------------------------------------
# generation requests


async def _generate(server: Server, mode: str, body: _Request) -> dict[str, Any]:
    """Queue the request as a job, wait for it and answer as A1111 does."""
    job_id = new_job_id()
    request = _job_request(server, mode, body, job_id)
    try:
        job = server.worker.submit("a1111", request, job_id)
    except QueueFull as e:
        _remove_job_images(server, request)
        raise HTTPException(429, str(e)) from e
    job = await asyncio.wrap_future(server.worker.wait(job.id))
    if job.state == FAILED:
        raise HTTPException((job.result or {}).get("http_status", 500), job.error)
    if job.state == CANCELLED and not job.result:
        raise HTTPException(409, f"job {job.id} was cancelled before it ran")
    result = job.result or {}
    images = [_read_base64(server, ref) for ref in result.get("images", [])] if body.send_images else []
    return {"images": images, "parameters": request["parameters"], "info": json.dumps(result.get("info", {}))}


def _job_request(server: Server, mode: str, body: _Request, job_id: str) -> dict[str, Any]:
    """The job's stored request: the generation fields (seed resolved), model names, image files."""
    overrides = body.override_settings
    generation = _generation(server, body)
    refiner = _refiner(server, body)
    if refiner is not None:
        generation |= {"refiner": refiner, "refiner_switch_at": body.refiner_switch_at}
    images: dict[str, Image.Image | None] = {"init_image": None, "mask": None}
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest):
        images = _img2img(body, generation)
        if not body.include_init_images:
            parameters |= {"init_images": None, "mask": None}
    try:
        GenerationRequest(**generation, **images).validate(1)  # sizes are checked against the model later
    except ValueError as e:
        raise HTTPException(422, str(e)) from e
    if not 1 <= body.n_iter <= 100:
        raise HTTPException(422, f"n_iter must be between 1 and 100, got {body.n_iter}")
    return {
        "mode": mode,
        "checkpoint": _checkpoint(
            server, overrides.get("sd_model_checkpoint") or server.options["sd_model_checkpoint"]
        ),
        "vae": _vae(server, overrides.get("sd_vae")),
        "generation": generation,
        "n_iter": body.n_iter,
        "save_images": body.save_images,
        "parameters": parameters,
        **{key: _store_image(server, job_id, key, image) for key, image in images.items()},
    }


def _generation(server: Server, body: _Request) -> dict[str, Any]:
    """The GenerationRequest fields of a body, with the seed, sampler and schedule resolved."""
    try:
        sampler, schedule = resolve_sampler(
            body.sampler_name or body.sampler_index, body.scheduler or "Automatic"
        )
    except ValueError as e:
        raise HTTPException(422, str(e)) from e
    clip_skip = body.override_settings.get(
        "CLIP_stop_at_last_layers", server.options["CLIP_stop_at_last_layers"]
    )
    return {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "width": body.width,
        "height": body.height,
        "steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "sampler": sampler,
        "scheduler": schedule or "normal",
        "seed": resolve_seed(body.seed),
        "batch_size": body.batch_size,
        "clip_skip": _clip_skip(clip_skip),
    }


def _img2img(body: Img2ImgRequest, generation: dict[str, Any]) -> dict[str, Image.Image | None]:
    """Add img2img's fields to `generation`; the decoded init image and mask."""
    if not body.init_images:
        raise HTTPException(404, "Init image not found")
    if body.resize_mode not in A1111_RESIZE_MODES:
        raise HTTPException(422, f"resize_mode must be one of {list(A1111_RESIZE_MODES)}")
    generation |= {
        "strength": body.denoising_strength,
        "resize_mode": A1111_RESIZE_MODES[body.resize_mode],
        "mask_blur": body.mask_blur,
        "inpainting_mask_invert": bool(body.inpainting_mask_invert),
    }
    return {"init_image": decode_image(body.init_images[0]), "mask": body.mask and decode_image(body.mask)}


def decode_image(data: str) -> Image.Image:
    """A base64 image (optionally a data: URL), loaded; HTTP 422 when it is not one."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise HTTPException(422, f"Invalid encoded image: {e}") from e
    return image


def _checkpoint(server: Server, name: str | None) -> str:
    if not name:
        raise HTTPException(404, "Model not found: no checkpoint is installed")
    try:
        return server.library.checkpoint(name)[0]
    except UnknownName as e:
        raise HTTPException(404, f"Model not found: {e}") from e


def _refiner(server: Server, body: _Request) -> str | None:
    """The refiner checkpoint's name; A1111 runs no refiner for "None" or without a switch point."""
    name = body.refiner_checkpoint
    if name in (None, "", "None") or body.refiner_switch_at is None:
        return None
    if not 0 < body.refiner_switch_at <= 1:
        raise HTTPException(422, f"refiner_switch_at must be in (0, 1], got {body.refiner_switch_at}")
    return _checkpoint(server, name)


def _vae(server: Server, name: str | None) -> str | None:
    if name in (None, "", "Automatic", "None"):
        return None
    try:
        server.library.find(server.library.vaes(), name, "VAE")
    except UnknownName as e:
        raise HTTPException(404, str(e)) from e
    return name


def _clip_skip(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CLIP_SKIP:
        raise HTTPException(422, f"CLIP_stop_at_last_layers must be an integer from 1 to {MAX_CLIP_SKIP}")
    return value


def _store_image(server: Server, job_id: str, key: str, image: Image.Image | None) -> str | None:
    """Save a request image into the input folder; its name relative to that folder."""
    if image is None:
        return None
    name = f"{JOB_IMAGES}/{job_id}-{key}.png"
    path = confined(server.folders.inputs, *split_name(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return name


def _remove_job_images(server: Server, request: dict[str, Any]) -> None:
    for key in ("init_image", "mask"):
        if request.get(key):
            confined(server.folders.inputs, *split_name(request[key])).unlink(missing_ok=True)


def _read_base64(server: Server, ref: dict[str, str]) -> str:
    path = confined(server.folders.by_type(ref["type"]), ref["subfolder"], ref["filename"])
    return base64.b64encode(path.read_bytes()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# the job


def run(server: Server, job: Job, live: Live) -> Outcome:
    """Make the n_iter batches of an A1111 job (skip drops a batch; interrupt keeps what is done)."""
    req = job.request
    model = server.models.model(req["checkpoint"], req["vae"])
    images = {key: _open_input(server, req[key]) for key in ("init_image", "mask")}
    base = GenerationRequest(**req["generation"], **images)
    refiner = server.models.model(base.refiner) if base.refiner else None
    live.latent_format = model.family.latent
    folder, kind = _output_folder(server, req)
    live.job_count = req["n_iter"]
    saved: list[dict[str, str]] = []
    infotexts: list[str] = []
    try:
        for n in range(req["n_iter"]):
            live.job_no = n
            request = replace(base, seed=base.seed + n * base.batch_size)
            try:
                result = generate(model, request, callback=live.step_done, refiner=refiner)
            except Skipped:
                continue
            for image, seed in zip(result.images, result.seeds, strict=True):
                infotexts.append(request_infotext(result.request, seed, model, refiner))
                path = save_png(image, next_output_path(folder, seed), infotexts[-1])
                saved.append({"filename": path.name, "subfolder": folder.name, "type": kind})
    except Interrupted:
        pass
    except ValueError as e:  # a request the model cannot make, e.g. a size not a multiple of its VAE's
        return Outcome(FAILED, {"http_status": 422}, str(e))
    info = _info(server, job, base, model, infotexts)
    return Outcome(DONE, {"images": saved, "info": info})


def _open_input(server: Server, name: str | None) -> Image.Image | None:
    if name is None:
        return None
    with Image.open(confined(server.folders.inputs, *split_name(name))) as im:
        im.load()
        return im


def _output_folder(server: Server, req: dict[str, Any]) -> tuple[Path, str]:
    sub = f"{req['mode']}-images"
    return (
        (server.folders.outputs / sub, "output")
        if req["save_images"]
        else (server.folders.temp / sub, "temp")
    )


def _info(
    server: Server, job: Job, req: GenerationRequest, model: StableDiffusion, infotexts: list[str]
) -> dict[str, Any]:
    """A1111's `info` object (Processed.js()) of a finished job."""
    n = job.request["n_iter"] * req.batch_size
    seeds = [req.seed + i for i in range(n)]
    return {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * n,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n,
        "seed": req.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": req.width,
        "height": req.height,
        "sampler_name": display_name(req.sampler),
        "scheduler": schedule_display_name(req.scheduler),
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "n_iter": job.request["n_iter"],
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model.name,
        "sd_model_hash": server.models.hashes.get(model.source),
        "sd_vae_name": job.request["vae"],
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": req.strength if req.init_image is not None else None,
        "extra_generation_params": {"Schedule type": schedule_display_name(req.scheduler)},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": model.family.inpaint,
        "version": f"sdlab {version('sdlab')}",
    }


# ---------------------------------------------------------------------------------------------
# progress and settings


def _progress(live: Live | None, skip_image: bool) -> dict[str, Any]:
    """A1111's progress of the running job (of either API), with a cheap preview of its latents."""
    if live is None:
        state = {"job": "", "job_count": 0, "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        flags = {"skipped": False, "interrupted": False, "stopping_generation": False, "job_timestamp": "0"}
        return {
            "progress": 0,
            "eta_relative": 0,
            "state": state | flags,
            "current_image": None,
            "textinfo": None,
        }
    progress = 0.01 + live.job_no / live.job_count
    if live.total:
        progress += live.step / live.total / live.job_count
    elapsed = time.time() - live.started
    preview = None if skip_image else latent_preview(live.latent, live.latent_format)
    state = {
        "skipped": live.skipped,
        "interrupted": live.interrupted,
        "stopping_generation": False,
        "job": live.job.id,
        "job_count": live.job_count,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(live.started)),
        "job_no": live.job_no,
        "sampling_step": live.step,
        "sampling_steps": live.total,
    }
    return {
        "progress": min(progress, 1.0),
        "eta_relative": elapsed / progress - elapsed,
        "state": state,
        "current_image": None if preview is None else png_base64(preview),
        "textinfo": None,
    }


def _model_item(server: Server, name: str, path: Path | None) -> dict[str, Any]:
    digest = server.models.hashes.get(path)
    return {
        "title": f"{name} [{digest}]" if digest else name,
        "model_name": stem(name),
        "hash": digest,
        "sha256": None,
        "filename": name,
        "config": None,
    }


def _options(server: Server) -> dict[str, Any]:
    checkpoint = server.options["sd_model_checkpoint"]
    title = None
    if checkpoint is not None:
        title = _model_item(server, checkpoint, server.library.checkpoints().get(checkpoint))["title"]
    return {
        "sd_model_checkpoint": title,
        "CLIP_stop_at_last_layers": server.options["CLIP_stop_at_last_layers"],
        "sd_vae": "Automatic",
        "samples_format": "png",
    }


def _set_options(server: Server, body: dict[str, Any]) -> None:
    """Set the options the API may change (nothing that names a path); others are refused."""
    refused = sorted(set(body) - set(SETTABLE_OPTIONS))
    if refused:
        raise HTTPException(
            422, f"options {refused} cannot be set over the API (only {list(SETTABLE_OPTIONS)})"
        )
    changes = {}
    if "sd_model_checkpoint" in body:
        changes["sd_model_checkpoint"] = _checkpoint(server, str(body["sd_model_checkpoint"]))
    if "CLIP_stop_at_last_layers" in body:
        changes["CLIP_stop_at_last_layers"] = _clip_skip(body["CLIP_stop_at_last_layers"])
    server.options.update(changes)
