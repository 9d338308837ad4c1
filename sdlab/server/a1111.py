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
import inspect
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, HTTPException
from PIL import Image
from pydantic import BaseModel, ConfigDict, model_validator

from sdlab.checkpoints.load import StableDiffusion
from sdlab.control import ControlSpec
from sdlab.diffusion.samplers import SAMPLERS, display_name, get_sampler, resolve_sampler
from sdlab.diffusion.schedule import SCHEDULE_DISPLAY, schedule_display_name
from sdlab.hires import LATENT_UPSCALE_MODES
from sdlab.images import (
    MASKED_CONTENT,
    ImageError,
    ImageLimits,
    ImageTooLarge,
    next_output_path,
    open_image,
    save_png,
)
from sdlab.infotext import parse_infotext, request_infotext
from sdlab.ip_adapter import IPAdapterSpec
from sdlab.networks import TAG
from sdlab.pipeline import GenerationRequest, generate, resolve_seed
from sdlab.server import controlnet_api
from sdlab.server.extras import extras_routes
from sdlab.server.ip_adapter_api import ip_record
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
from sdlab.server.state import MAX_JOB_IMAGES, Server

A1111_RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill", 3: "resize"}  # 3: see the `resize_mode` row below
JOB_IMAGES = ".jobs"  # input subfolder holding the images of queued A1111 jobs
CONTROL_IMAGES = ("image", "mask")  # a ControlNet unit's images, stored with the job
SETTABLE_OPTIONS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae", "eta_noise_seed_delta")
PATH_OPTION = re.compile(r"dir|path|filename")  # options naming paths (outdir_samples, ...) are never set
# override_settings keys that change nothing in the image (others than SETTABLE_OPTIONS get a 422)
HARMLESS_OVERRIDES = frozenset(
    {"samples_save", "grid_save", "enable_pnginfo", "save_txt", "return_grid", "live_previews_enable"}
    | {"show_progressbar", "sd_checkpoint_hash", "save_images_before_face_restoration"}
)
MAX_CLIP_SKIP = 12
# sdlab's --attention as A1111 names it: its `cross_attention_optimization` option and command-line flag
A1111_ATTENTION = {
    "sdpa": ("sdp", "opt_sdp_attention"),
    "sliced": ("Doggettx", "opt_split_attention"),  # query slices (A1111's --opt-split-attention)
    "math": ("None", "disable_opt_split_attention"),  # plain matrix products
}


class _Request(BaseModel):
    """The fields both A1111 generation routes take, with A1111's defaults (StableDiffusionProcessing plus
    the API's own); fields A1111 does not know are ignored, as A1111's models do; null means the default.
    What sdlab does with each field: `TXT2IMG_FIELDS` / `IMG2IMG_FIELDS`."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = []
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = {}
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_nulls(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class Txt2ImgRequest(_Request):
    """A1111's txt2img body (StableDiffusionTxt2ImgProcessingAPI)."""

    enable_hr: bool = False
    denoising_strength: float | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Request):
    """A1111's img2img body (StableDiffusionImg2ImgProcessingAPI): txt2img's common fields plus the init
    image, mask and strength."""

    init_images: list[str] = []
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


# ---------------------------------------------------------------------------------------------
# what sdlab does with each field of A1111's request models

HONOURED, HARMLESS, REFUSED = "honoured", "harmless", "refused"
Accepts = Callable[[Any, _Request], bool]


@dataclass(frozen=True)
class FieldSupport:
    """How sdlab treats one A1111 request field: HONOURED (sdlab does it), HARMLESS (changes nothing in
    the image) or REFUSED (HTTP 422 unless `accepts(value, body)`: a value that gives A1111's image)."""

    kind: str
    note: str = ""
    accepts: Accepts | None = None


def _unset(value: Any, body: _Request) -> bool:
    """The default: None, False, 0, "", [] or {}."""
    return not value


def _one_of(*values: Any) -> Accepts:
    return lambda value, body: value is None or value in values


def _sampler_of(body: _Request) -> str | None:
    try:
        return resolve_sampler(body.sampler_name or body.sampler_index)[0]
    except ValueError:
        return None  # the request is refused for its sampler anyway


def _sampler_takes(body: _Request, parameter: str) -> bool:
    sampler = _sampler_of(body)
    return sampler is not None and parameter in inspect.signature(get_sampler(sampler)).parameters


def _eta_accepted(value: Any, body: _Request) -> bool:
    """sdlab's samplers with an eta run at 1 (A1111's eta_ancestral), DDIM at 0 (eta_ddim); others have
    none."""
    if value is None:
        return True
    if _sampler_of(body) == "ddim":
        return value == 0
    return value == 1 or not _sampler_takes(body, "eta")


def _s_noise_accepted(value: Any, body: _Request) -> bool:
    return value is None or value == 1 or not _sampler_takes(body, "s_noise")


def _seed_resize_accepted(value: Any, body: _Request) -> bool:
    """A1111 draws the noise at another size only when both are positive (the same size: same noise)."""
    h, w = body.seed_resize_from_h, body.seed_resize_from_w
    return h <= 0 or w <= 0 or (h, w) == (body.height, body.width)


_HIRES = "read only with enable_hr"
COMMON_FIELDS: dict[str, FieldSupport] = {
    "prompt": FieldSupport(HONOURED),
    "negative_prompt": FieldSupport(HONOURED),
    "styles": FieldSupport(REFUSED, "prompt styles", _unset),
    "seed": FieldSupport(HONOURED),
    "subseed": FieldSupport(HARMLESS, "read only with subseed_strength > 0"),
    "subseed_strength": FieldSupport(REFUSED, "variation seeds", _unset),
    "seed_resize_from_h": FieldSupport(
        REFUSED, "noise drawn at another size (with 'seed_resize_from_w')", _seed_resize_accepted
    ),
    "seed_resize_from_w": FieldSupport(
        REFUSED, "noise drawn at another size (with 'seed_resize_from_h')", _seed_resize_accepted
    ),
    "sampler_name": FieldSupport(HONOURED),
    "sampler_index": FieldSupport(HONOURED, "used when sampler_name is not given"),
    "scheduler": FieldSupport(HONOURED),
    "batch_size": FieldSupport(HONOURED),
    "n_iter": FieldSupport(HONOURED),
    "steps": FieldSupport(HONOURED),
    "cfg_scale": FieldSupport(HONOURED),
    "width": FieldSupport(HONOURED),
    "height": FieldSupport(HONOURED),
    "restore_faces": FieldSupport(REFUSED, "face restoration", _unset),
    "tiling": FieldSupport(REFUSED, "tiling", _unset),
    "do_not_save_samples": FieldSupport(HARMLESS, "the API sets it from save_images"),
    "do_not_save_grid": FieldSupport(HARMLESS, "sdlab saves no grids"),
    "eta": FieldSupport(REFUSED, "another eta than its samplers' (1; DDIM 0)", _eta_accepted),
    "s_min_uncond": FieldSupport(REFUSED, "s_min_uncond", _unset),
    "s_churn": FieldSupport(REFUSED, "s_churn", _unset),
    "s_tmax": FieldSupport(HARMLESS, "read only with s_churn > 0"),
    "s_tmin": FieldSupport(HARMLESS, "read only with s_churn > 0"),
    "s_noise": FieldSupport(REFUSED, "s_noise other than 1", _s_noise_accepted),
    "override_settings": FieldSupport(HONOURED, "keys: see SETTABLE_OPTIONS and HARMLESS_OVERRIDES"),
    "override_settings_restore_afterwards": FieldSupport(HARMLESS, "overrides never outlive the request"),
    "refiner_checkpoint": FieldSupport(HONOURED),
    "refiner_switch_at": FieldSupport(HONOURED),
    "disable_extra_networks": FieldSupport(
        REFUSED,
        "disable_extra_networks with <lora:> tags in the prompt",
        lambda v, b: not v or not TAG.search(b.prompt),
    ),
    "firstpass_image": FieldSupport(REFUSED, "a given first pass", _unset),
    "comments": FieldSupport(HARMLESS, "A1111 resets it"),
    "script_name": FieldSupport(REFUSED, "scripts", _unset),
    "script_args": FieldSupport(HARMLESS, "read only with script_name"),
    "send_images": FieldSupport(HONOURED),
    "save_images": FieldSupport(HONOURED),
    "alwayson_scripts": FieldSupport(
        REFUSED,
        "always-on scripts other than controlnet (units: sdlab.server.controlnet_api)",
        lambda v, b: all(key.lower() == "controlnet" for key in v),
    ),
    "force_task_id": FieldSupport(HARMLESS, "a progress-tracking id"),
    "infotext": FieldSupport(REFUSED, "parameters from an infotext", _unset),
}
TXT2IMG_FIELDS: dict[str, FieldSupport] = COMMON_FIELDS | {
    "enable_hr": FieldSupport(HONOURED),
    "denoising_strength": FieldSupport(HONOURED, _HIRES),
    "firstphase_width": FieldSupport(REFUSED, "a first-phase size", _unset),
    "firstphase_height": FieldSupport(REFUSED, "a first-phase size", _unset),
    "hr_checkpoint_name": FieldSupport(
        REFUSED,
        "another checkpoint for the hires pass",
        lambda v, b: not b.enable_hr or v in (None, "", "Use same checkpoint"),
    ),
    **{
        name: FieldSupport(HONOURED, _HIRES)
        for name in (
            "hr_scale",
            "hr_upscaler",
            "hr_second_pass_steps",
            "hr_resize_x",
            "hr_resize_y",
            "hr_sampler_name",
            "hr_scheduler",
            "hr_prompt",
            "hr_negative_prompt",
        )
    },
}
IMG2IMG_FIELDS: dict[str, FieldSupport] = COMMON_FIELDS | {
    "init_images": FieldSupport(REFUSED, "more than one init image", lambda v, b: len(v) <= 1),
    "resize_mode": FieldSupport(HONOURED, "3 (latent upscale) resizes pixels before encoding"),
    "denoising_strength": FieldSupport(HONOURED),
    "image_cfg_scale": FieldSupport(
        HARMLESS, "read only by instruct-pix2pix models, which sdlab cannot load"
    ),
    "mask": FieldSupport(HONOURED),
    "mask_blur_x": FieldSupport(HONOURED, "used when mask_blur is not given"),
    "mask_blur_y": FieldSupport(HONOURED, "used when mask_blur is not given"),
    "mask_blur": FieldSupport(HONOURED),
    "mask_round": FieldSupport(HONOURED),
    "inpainting_fill": FieldSupport(HONOURED, "0 fill, 1 original, 2 latent noise, 3 latent nothing"),
    "inpaint_full_res": FieldSupport(HONOURED, "true: only masked"),
    "inpaint_full_res_padding": FieldSupport(HONOURED),
    "inpainting_mask_invert": FieldSupport(HONOURED),
    "initial_noise_multiplier": FieldSupport(REFUSED, "a noise multiplier other than 1", _one_of(1)),
    "latent_mask": FieldSupport(REFUSED, "a separate latent mask", _unset),
    "include_init_images": FieldSupport(HARMLESS, "echoes the init images in `parameters`"),
}


def check_fields(body: _Request, fields: dict[str, FieldSupport]) -> None:
    """HTTP 422 naming the first field whose value sdlab cannot honour."""
    for name, support in fields.items():
        value = getattr(body, name)
        if support.kind == REFUSED and support.accepts is not None and not support.accepts(value, body):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise HTTPException(422, f"field {name!r} = {shown}: sdlab does not support {support.note} yet")


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
            server.worker.skip(live.job.id)
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
        """Embeddings of the models folder that fit the current checkpoint ("loaded"), and the others."""
        from sdlab.embeddings import a1111_listing, checkpoint_slots

        name = server.options["sd_model_checkpoint"]
        path = server.library.checkpoints().get(name) if name else None
        slots = checkpoint_slots(path) if path is not None else None
        files: dict[str, Path] = {}
        for path in server.library.embeddings().values():
            files.setdefault(path.stem, path)  # A1111 names an embedding by its file stem
        return a1111_listing(files, slots)

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
        image = decode_image(body.image, "image", server.settings.image_limits)
        info = image.info.get("parameters", "")
        items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, str)}
        return {"info": info, "items": items, "parameters": parse_infotext(info) if info else {}}

    startup_routes(api, server)
    extras_routes(api, server)
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
    check_fields(body, IMG2IMG_FIELDS if isinstance(body, Img2ImgRequest) else TXT2IMG_FIELDS)
    overrides = _overrides(body)
    generation = _generation(server, body)
    _check_noise_seed_delta(server, body)
    refiner = _refiner(server, body)
    if refiner is not None:
        generation |= {"refiner": refiner, "refiner_switch_at": body.refiner_switch_at}
    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        generation["hires"] = _hires(server, body)
    images: dict[str, Image.Image | None] = {"init_image": None, "mask": None}
    limits = server.settings.image_limits
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest):
        images = _img2img(body, generation, limits)
        if not body.include_init_images:
            parameters |= {"init_images": None, "mask": None}
    units = controlnet_api.parse_units(
        server.library, body.alwayson_scripts, (body.width, body.height), images["init_image"], limits
    )
    controls = tuple(unit.spec for unit in units if isinstance(unit.spec, ControlSpec))
    ip_units = [unit for unit in units if isinstance(unit.spec, IPAdapterSpec)]
    ip_adapters = tuple(unit.spec for unit in ip_units)
    try:  # sizes are checked against the model later
        GenerationRequest(**generation, **images, controls=controls, ip_adapters=ip_adapters).validate(1)
    except ValueError as e:
        raise HTTPException(422, str(e)) from e
    if not 1 <= body.n_iter <= 100:
        raise HTTPException(422, f"n_iter must be between 1 and 100, got {body.n_iter}")
    if body.batch_size * body.n_iter > MAX_JOB_IMAGES:
        images = f"{body.batch_size}x{body.n_iter}"
        raise HTTPException(422, f"batch_size x n_iter = {images} exceeds the limit of {MAX_JOB_IMAGES}")
    return {
        "mode": mode,
        "checkpoint": _checkpoint(
            server, overrides.get("sd_model_checkpoint") or server.options["sd_model_checkpoint"]
        ),
        "vae": _vae(server, overrides.get("sd_vae", server.options.get("sd_vae"))),
        "generation": generation,
        "n_iter": body.n_iter,
        "save_images": body.save_images,
        "parameters": parameters,
        **{key: _store_image(server, job_id, key, image) for key, image in images.items()},
        "controls": [
            controlnet_api.spec_record(unit.spec)
            | {
                key: _store_image(server, job_id, f"control{i}-{key}", getattr(unit.spec, key))
                for key in CONTROL_IMAGES
            }
            for i, unit in enumerate(units)
            if isinstance(unit.spec, ControlSpec)
        ],
        "ip_adapters": [
            ip_record(unit.spec) | {"image": _store_image(server, job_id, f"ip{i}-image", unit.spec.image)}
            for i, unit in enumerate(ip_units)
        ],
        "controlnet_infotext": {f"ControlNet {unit.index}": unit.infotext for unit in units},
    }


def _overrides(body: _Request) -> dict[str, Any]:
    """The request's override_settings; HTTP 422 naming a key sdlab would not honour."""
    for key in body.override_settings:
        if key not in SETTABLE_OPTIONS and key not in HARMLESS_OVERRIDES:
            raise HTTPException(422, f"override_settings {key!r}: sdlab does not support this option yet")
    return body.override_settings


def _check_noise_seed_delta(server: Server, body: _Request) -> None:
    """A1111 seeds the sampler noise with seed + eta_noise_seed_delta; sdlab's draw it from the seed."""
    delta = body.override_settings.get("eta_noise_seed_delta", server.options.get("eta_noise_seed_delta", 0))
    if delta and _sampler_takes(body, "noise_sampler"):
        raise HTTPException(
            422, f"eta_noise_seed_delta = {delta!r}: sdlab does not support a noise seed delta yet"
        )


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
        "lora_dirs": [str(p) for p in (server.library.lora_folder(),) if p is not None],
        "embedding_dirs": [str(p) for p in (server.library.embedding_folder(),) if p is not None],
    }


def _hires(server: Server, body: Txt2ImgRequest) -> dict[str, Any]:
    """The hires fix of a txt2img body (HiresFix's fields): A1111's defaults for nulls (denoising 0.75,
    the `Latent` upscaler); the UI's "Use same ..." mean the first pass's sampler and schedule; upscaler
    models from the models folder."""
    return {
        "scale": body.hr_scale,
        "resize": (body.hr_resize_x, body.hr_resize_y),
        "steps": body.hr_second_pass_steps,
        "denoise": 0.75 if body.denoising_strength is None else body.denoising_strength,
        "upscaler": body.hr_upscaler or "Latent",
        "prompt": body.hr_prompt,
        "negative_prompt": body.hr_negative_prompt,
        "sampler": "" if body.hr_sampler_name in (None, "Use same sampler") else body.hr_sampler_name,
        "scheduler": "" if body.hr_scheduler in (None, "Use same scheduler") else body.hr_scheduler,
        "upscaler_dirs": [str(folder) for folder in server.library.upscaler_dirs()],
    }


def _img2img(
    body: Img2ImgRequest, generation: dict[str, Any], limits: ImageLimits
) -> dict[str, Image.Image | None]:
    """Add img2img's fields to `generation`; the decoded init image and mask."""
    if not body.init_images:
        raise HTTPException(404, "Init image not found")
    if body.resize_mode not in A1111_RESIZE_MODES:
        raise HTTPException(422, f"resize_mode must be one of {list(A1111_RESIZE_MODES)}")
    generation |= {
        "strength": body.denoising_strength,
        "resize_mode": A1111_RESIZE_MODES[body.resize_mode],
        "inpainting_mask_invert": bool(body.inpainting_mask_invert),
        **_inpainting(body),
    }
    mask_mode = "L" if body.mask_round else "RGBA"  # mask_round false: the alpha's grey levels are read
    return {
        "init_image": decode_image(body.init_images[0], "init_images[0]", limits),
        "mask": body.mask and decode_image(body.mask, "mask", limits, mask_mode),
    }


def _inpainting(body: Img2ImgRequest) -> dict[str, Any]:
    """A1111's inpainting fields as GenerationRequest's: mask_blur, when given, sets both blurs."""
    if body.inpainting_fill not in range(len(MASKED_CONTENT)):
        raise HTTPException(422, f"inpainting_fill must be 0-3 ({', '.join(MASKED_CONTENT)})")
    blur_x, blur_y = (body.mask_blur_x, body.mask_blur_y) if body.mask_blur is None else (body.mask_blur,) * 2
    return {
        "mask_blur": blur_x,
        "mask_blur_x": blur_x,
        "mask_blur_y": blur_y,
        "mask_round": body.mask_round,
        "inpainting_fill": MASKED_CONTENT[body.inpainting_fill],
        "inpaint_full_res": body.inpaint_full_res,
        "inpaint_full_res_padding": body.inpaint_full_res_padding,
    }


def decode_image(data: str, field: str, limits: ImageLimits, mode: str = "RGB") -> Image.Image:
    """A base64 image (optionally a data: URL) of request field `field`, decoded within `limits` as
    `open_image` does; HTTP 413 (too large) or 422 naming the field when it cannot be."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    if len(data) > -(-limits.max_bytes // 3) * 4:  # longer than any base64 text of max_bytes bytes
        raise HTTPException(413, f"{field}: more than the limit of {limits.max_bytes:,} bytes")
    try:
        return open_image(base64.b64decode(data, validate=True), field, limits, mode)
    except binascii.Error as e:
        raise HTTPException(422, f"{field}: invalid base64 ({e})") from e
    except ImageTooLarge as e:
        raise HTTPException(413, str(e)) from e
    except ImageError as e:
        raise HTTPException(422, str(e)) from e


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
    server.share_input(*split_name(name), job_id)
    return name


def _remove_job_images(server: Server, request: dict[str, Any]) -> None:
    names = [request.get(key) for key in ("init_image", "mask")]
    names += [control[key] for control in request.get("controls", []) for key in CONTROL_IMAGES]
    names += [ip["image"] for ip in request.get("ip_adapters", [])]
    for name in names:
        if name:
            confined(server.folders.inputs, *split_name(name)).unlink(missing_ok=True)


def _read_base64(server: Server, ref: dict[str, str]) -> str:
    path = server.file(ref["type"], ref["subfolder"], ref["filename"])
    return base64.b64encode(path.read_bytes()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# the job


def run(server: Server, job: Job, live: Live) -> Outcome:
    """Make the n_iter batches of an A1111 job (skip and interrupt keep the image being made as far as it
    got; skip then goes on with the next batch)."""
    req = job.request
    model = server.models.model(req["checkpoint"], req["vae"])
    images = {key: _open_input(server, req[key]) for key in ("init_image", "mask")}
    controls = tuple(
        ControlSpec(**(record | {key: _open_input(server, record[key]) for key in CONTROL_IMAGES}))
        for record in req.get("controls", [])
    )
    ip_adapters = tuple(
        IPAdapterSpec(**(record | {"image": _open_input(server, record["image"])}))
        for record in req.get("ip_adapters", [])
    )
    base = GenerationRequest(**req["generation"], **images, controls=controls, ip_adapters=ip_adapters)
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
            except Skipped:  # before its first step: no image to keep
                continue
            for image, seed in zip(result.images, result.seeds, strict=True):
                scripts = req.get("controlnet_infotext")
                infotexts.append(request_infotext(result.request, seed, model, refiner, scripts))
                path = save_png(image, next_output_path(folder, seed), infotexts[-1])
                saved.append({"filename": path.name, "subfolder": folder.name, "type": kind})
            if result.interrupted and live.ending():  # not skipped: A1111 stops after an interrupted batch
                break
    except Interrupted:
        pass
    except ValueError as e:  # a request the model cannot make, e.g. a size not a multiple of its VAE's
        return Outcome(FAILED, {"http_status": 422}, str(e))
    info = _info(server, job, base, model, infotexts)
    return Outcome(DONE, {"images": saved, "info": info})


def _open_input(server: Server, name: str | None) -> Image.Image | None:
    if name is None:
        return None
    with Image.open(server.file("input", *split_name(name))) as im:
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
        "denoising_strength": _denoising_strength(req),
        "extra_generation_params": {"Schedule type": schedule_display_name(req.scheduler)},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": model.family.inpaint,
        "version": f"sdlab {version('sdlab')}",
    }


def _denoising_strength(req: GenerationRequest) -> float | None:
    """img2img's strength, the hires pass's, or None for a plain txt2img."""
    if req.hires is not None:
        return req.hires.denoise
    return req.strength if req.init_image is not None else None


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
    image = None if preview is None else png_base64(preview)
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
        "current_image": None if skip_image else image or live.preview,
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
    """A1111's options: those sdlab uses, then the ones clients stored (which change nothing)."""
    checkpoint = server.options["sd_model_checkpoint"]
    title = None
    if checkpoint is not None:
        title = _model_item(server, checkpoint, server.library.checkpoints().get(checkpoint))["title"]
    return {
        **server.options,
        "sd_model_checkpoint": title,
        "CLIP_stop_at_last_layers": server.options["CLIP_stop_at_last_layers"],
        "sd_vae": server.options.get("sd_vae") or "Automatic",
        "eta_noise_seed_delta": server.options.get("eta_noise_seed_delta", 0),
        "samples_format": "png",
        **_placement_options(server),
    }


def _placement_options(server: Server) -> dict[str, Any]:
    """A1111's options for how models run, as sdlab runs them (set by `sdlab serve`, not over the API)."""
    return {
        "cross_attention_optimization": A1111_ATTENTION[server.models.placement.attention][0],
        "randn_source": "CPU",  # noise is drawn on the CPU generator whatever the device
        "auto_vae_precision": True,  # a half-precision VAE that overflows is run again in float32
    }


def _set_options(server: Server, body: dict[str, Any]) -> None:
    """Set options: those sdlab uses are checked, others stored as given; none that names a path."""
    refused = sorted(key for key in body if key not in SETTABLE_OPTIONS and PATH_OPTION.search(key))
    if refused:
        raise HTTPException(422, f"options {refused} name paths and cannot be set over the API")
    fixed = _placement_options(server)
    wrong = [f"{k} = {body[k]!r} (sdlab runs with {v!r})" for k, v in fixed.items() if body.get(k, v) != v]
    if wrong:
        raise HTTPException(422, f"options {'; '.join(wrong)}: set by `sdlab serve`, not over the API")
    changes = dict(body)
    if "sd_model_checkpoint" in body:
        changes["sd_model_checkpoint"] = _checkpoint(server, str(body["sd_model_checkpoint"]))
    if "CLIP_stop_at_last_layers" in body:
        changes["CLIP_stop_at_last_layers"] = _clip_skip(body["CLIP_stop_at_last_layers"])
    if "sd_vae" in body:
        changes["sd_vae"] = _vae(server, body["sd_vae"])
    if "eta_noise_seed_delta" in body:
        changes["eta_noise_seed_delta"] = _noise_seed_delta(body["eta_noise_seed_delta"])
    server.options.update(changes)


def _noise_seed_delta(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPException(422, "eta_noise_seed_delta must be an integer")
    return value


# ---------------------------------------------------------------------------------------------
# what clients ask at start-up


def _memory(device: torch.device) -> dict[str, Any]:
    """A1111's memory report: RAM in bytes (`used` is this process's resident size, as in A1111) and, when
    the server runs on a CUDA device, that device's memory as A1111's `/sdapi/v1/memory` gives it."""
    try:
        total = _meminfo_bytes("MemTotal")
        used = _resident_bytes()
        ram: dict[str, Any] = {"free": total - used, "used": used, "total": total}
    except (OSError, ValueError, KeyError) as e:
        ram = {"error": str(e)}
    return {"ram": ram, "cuda": _cuda_memory(device) if device.type == "cuda" else {"error": "unavailable"}}


def _cuda_memory(device: torch.device) -> dict[str, Any]:
    """A CUDA device's memory in A1111's shape: the driver's free/used/total, torch's allocator counters
    (current and peak bytes of active, allocated, reserved and inactive-split memory) and its events."""
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    free, total = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)

    def counter(name: str) -> dict[str, int]:
        return {k: stats.get(f"{name}_bytes.all.{k}", 0) for k in ("current", "peak")}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": counter("active"),
        "allocated": counter("allocated"),
        "reserved": counter("reserved"),
        "inactive": counter("inactive_split"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }


def _meminfo_bytes(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    raise KeyError(f"{key} not in /proc/meminfo")


def _resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _cmd_flags(server: Server) -> dict[str, Any]:
    """The A1111 command-line flags a client may look at, as sdlab's server stands (paths not shown)."""
    return {
        "api": True,
        "nowebui": False,
        "api_auth": None,
        "api_log": False,
        **_placement_flags(server),
        "skip_torch_cuda_test": True,
        "ckpt": None,
        "ckpt_dir": None,
        "vae_dir": None,
        "lora_dir": None,
        "embeddings_dir": None,
        "hide_ui_dir_config": True,
        "freeze_settings": False,
        "gradio_auth": None,
        "disable_extra_extensions": True,
    }


def _placement_flags(server: Server) -> dict[str, Any]:
    """The A1111 flags A1111 would run with to place models as `sdlab serve --device/--dtype/--offload/
    --attention` does: --lowvram ~ sequential offload, --medvram ~ model offload, --no-half-vae when the VAE
    of the model used last stays in float32 while the rest computes in half precision."""
    placement, device, precision = server.models.placement, server.models.device(), server.models.precision()
    half = precision.compute != torch.float32
    chosen = A1111_ATTENTION[placement.attention][1]
    return {
        "lowvram": placement.offload == "sequential",
        "medvram": placement.offload == "model",
        "medvram_sdxl": False,  # sdlab offloads every family alike
        "no_half": not half,
        "no_half_vae": half and precision.vae == torch.float32,
        "precision": "autocast" if half else "full",
        "use_cpu": ["all"] if device.type == "cpu" else [],
        "device_id": None if device.index is None else str(device.index),
        **{flag: flag == chosen for _, flag in A1111_ATTENTION.values()},
    }


def startup_routes(api: APIRouter, server: Server) -> None:
    """The listings and refreshes clients call when they connect: A1111's shapes, sdlab's (mostly empty)
    contents."""

    @api.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        return _cmd_flags(server)

    @api.get("/memory")
    def memory() -> dict[str, Any]:
        return _memory(server.models.device())

    @api.get("/scripts")
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @api.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    for name in (
        "hypernetworks",
        "face-restorers",
        "realesrgan-models",
        "prompt-styles",
        "script-info",
    ):
        api.add_api_route(f"/{name}", _empty_list, methods=["GET"], name=name)
    for name in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings"):
        # the library rescans its folders on every listing: nothing is cached to refresh
        api.add_api_route(f"/{name}", _nothing, methods=["POST"], name=name)


def _empty_list() -> list[Any]:
    return []


def _nothing() -> None:
    return None
