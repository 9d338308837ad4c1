"""ComfyUI's core nodes on sdlab's pipeline: inputs named and bounded as ComfyUI declares them.

Values passed between nodes: MODEL is a `Model`, CLIP a `Clip`, VAE an `AutoencoderKL`,
CONDITIONING a `Conditioning` (context, and SDXL's pooled text and size / aesthetic values),
LATENT a `Latent` (scaled latents, as the U-Net sees them), IMAGE pixels (B, 3, H, W) in [-1, 1],
MASK (B, 1, H, W) in [0, 1] (1 = repaint) and UPSCALE_MODEL an `sdlab.upscale.Upscaler`.
Seeds follow sdlab's convention: image i of a batch draws its noise from seed + i. A node that runs the
shared loaded model first makes the part it runs carry its LoRAs (`sdlab.lora.use_loras`: the text
encoders for CLIPTextEncode, the U-Net for sampling), which stay merged for the next workflow with them.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdlab.checkpoints.io import CheckpointError
from sdlab.checkpoints.load import StableDiffusion
from sdlab.conditioning import Conditioning, encode_text
from sdlab.diffusion import denoiser
from sdlab.diffusion.samplers import SAMPLERS, Sampler
from sdlab.diffusion.schedule import SCHEDULES
from sdlab.embeddings import Embeddings, embedding_dirs
from sdlab.images import (
    DEFAULT_LIMITS,
    ImageError,
    ImageLimits,
    open_image,
    prepare_mask,
    probe_image,
    save_png,
    to_pil,
    to_tensor,
)
from sdlab.ip_adapter import IPAdapterSpec, ip_adapters_applied, prepare_ip_adapters
from sdlab.lora import use_loras
from sdlab.models.vae import AutoencoderKL
from sdlab.pipeline import (
    MAX_PIXELS,
    Guidance,
    decode_pixels,
    encode_pixels,
    sample,
    sampling_sigmas,
    seed_noise,
)
from sdlab.regions import guidance_sides
from sdlab.resample import common_upscale
from sdlab.server.jobs import Live
from sdlab.server.library import Library, ModelCache
from sdlab.server.paths import Folders, PathError, confined, image_files, relative_parts, split_name
from sdlab.upscale import Upscaler, load_upscaler, run_upscaler

MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFFFFFFFFFFFFFF
LATENT_UPSCALE = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
IMAGE_UPSCALE = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]  # as ComfyUI: no bislerp
CROP = ["disabled", "center"]
MASK_CHANNELS = {"alpha": "A", "red": "R", "green": "G", "blue": "B"}


class NodeError(Exception):
    """A node that cannot do what its inputs ask (the message is shown to the client)."""


LoRAs = tuple[tuple[Path, float], ...]  # (LoRA file, strength) to merge


@dataclass(frozen=True)
class Model:
    """MODEL: the loaded model and the LoRAs merged into its U-Net while it samples."""

    sd: StableDiffusion
    loras: LoRAs = ()  # merged into the U-Net while sampling
    ip_adapters: tuple[IPAdapterSpec, ...] = ()  # image prompts the cross-attentions read while sampling


@dataclass(frozen=True)
class Clip:
    """CLIP: the model's text encoder, the layer to stop at and LoRAs for it."""

    model: StableDiffusion
    layer: int | None = None  # the layer to stop at, from the end (-stop_at_clip_layer); None: the family's
    loras: LoRAs = ()  # merged into the text encoder while encoding


@dataclass(frozen=True)
class Latent:
    """LATENT: scaled latents (or an empty image's size) and an optional noise mask."""

    width: int  # image pixels
    height: int
    batch: int
    samples: Tensor | None = None  # (B, C, H/f, W/f) scaled; None: zeros of the sampling model's shape
    noise_mask: Tensor | None = None  # (B or 1, 1, H', W') in [0, 1]: where sampling may change the latents
    scaling: tuple[float, float] = (1.0, 0.0)  # (scale, shift) the samples are in: z' = (z − shift)·scale
    batch_index: tuple[int, ...] | None = None  # each image's place in its first batch (its noise seed + i)


def _rescaled(samples: Tensor, source: tuple[float, float], target: tuple[float, float]) -> Tensor:
    """Latents from one (scale, shift) to another, untouched when they agree (a standalone VAE file carries
    no scale of its own: its latents meet an SDXL model's through the raw VAE space, as in ComfyUI)."""
    if source == target:
        return samples
    return ((samples / source[0] + source[1]) - target[1]) * target[0]


def _scaling(vae: AutoencoderKL) -> tuple[float, float]:
    return vae.cfg.scale_factor, vae.cfg.shift_factor


@dataclass
class Env:
    """What nodes may use: the models, the folders, and the running job (progress, interrupts)."""

    library: Library
    models: ModelCache
    folders: Folders
    live: Live | None = None
    image_limits: ImageLimits = DEFAULT_LIMITS  # of the input images LoadImage and LoadImageMask read
    # the path of a file by type, subfolder, name (a server on a shared queue fetches it from the database)
    file: Callable[[str, str, str], Path] | None = None

    def step(self, step: int, total: int, latent: Tensor) -> None:
        """Report a sampling step to the running job (which may raise to stop it)."""
        if self.live is not None:
            self.live.step_done(step, total, latent)

    def png_text(self) -> dict[str, str]:
        """ComfyUI's PNG text chunks for the running workflow: `prompt`, and each `extra_pnginfo` entry (the
        frontend's `workflow`, so a saved image dropped on it restores the graph), as JSON."""
        if self.live is None or self.live.job.kind != "comfy":
            return {}
        request = self.live.job.request
        extra = (request.get("extra_data") or {}).get("extra_pnginfo")
        chunks = {"prompt": json.dumps(request["prompt"])}
        return chunks | ({k: json.dumps(v) for k, v in extra.items()} if isinstance(extra, dict) else {})


@dataclass(frozen=True)
class Saved:
    """An output node's result: what the client is told was written."""

    ui: dict[str, list[dict[str, str]]]


Choices = Callable[[Env], list[str]]  # a list-valued ("COMBO") input whose choices the server knows


@dataclass(frozen=True)
class NodeType:
    """A node class: its inputs and outputs as ComfyUI declares them, and what it does."""

    inputs: dict[str, tuple[Any, ...]]  # name -> (type, options) as ComfyUI's INPUT_TYPES "required"
    outputs: tuple[str, ...]
    run: Callable[..., tuple[Any, ...] | Saved]
    category: str
    description: str
    output_node: bool = False
    # ComfyUI's VALIDATE_INPUTS: (env, **literal inputs) -> {input name: problem}, checked before queueing
    check: Callable[..., dict[str, str]] | None = None
    display_name: str | None = None  # ComfyUI's NODE_DISPLAY_NAME_MAPPINGS entry (None: the class name)
    optional: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # INPUT_TYPES "optional"
    hidden: dict[str, str] = field(default_factory=dict)  # INPUT_TYPES "hidden" (filled by the server)
    output_names: tuple[str, ...] | None = None  # RETURN_NAMES (None: the types)


NODE_TYPES: dict[str, NodeType] = {}  # class name -> node type, filled by `node`


def node(name: str, display_name: str, category: str, outputs: tuple[str, ...], **options: Any) -> Callable:
    """Register the decorated function as node class `name` (ComfyUI's node class, declared where it runs):
    `inputs` as INPUT_TYPES "required", the other `NodeType` fields by name; the docstring describes it."""

    def register(run: Callable[..., Any]) -> Callable[..., Any]:
        description = " ".join((run.__doc__ or "").split("\n\n")[0].split())
        inputs = options.pop("inputs", {})
        NODE_TYPES[name] = NodeType(
            inputs, outputs, run, category, description, display_name=display_name, **options
        )
        return run

    return register


def _int(default: int, lo: int, hi: int, step: int = 1) -> tuple[str, dict[str, int]]:
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step})


def _float(default: float, lo: float, hi: float, step: float = 0.01) -> tuple[str, dict[str, float]]:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step})


def _list(values: list[str]) -> Choices:
    return lambda env: values


_SAMPLING = {
    "sampler_name": (_list(list(SAMPLERS)),),
    "scheduler": (_list(list(SCHEDULES)),),
    "positive": ("CONDITIONING",),
    "negative": ("CONDITIONING",),
    "latent_image": ("LATENT",),
}
_SIZE = {"width": _int(512, 0, MAX_RESOLUTION, 8), "height": _int(512, 0, MAX_RESOLUTION, 8)}
_LATENT_SIZE = {"width": _int(512, 16, MAX_RESOLUTION, 8), "height": _int(512, 16, MAX_RESOLUTION, 8)}
_TEXT = ("STRING", {"multiline": True, "dynamicPrompts": True})
_HIDDEN_PNG = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}  # SaveImage's, PreviewImage's


def check_input_image(env: Env, image: str, **_: Any) -> dict[str, str]:
    """LoadImage's VALIDATE_INPUTS: the file's format, bytes and pixels within the limits (header only)."""
    try:
        probe_image(_input_path(env, image), image, env.image_limits)
    except (ImageError, PathError) as e:
        return {"image": f"Invalid image file: {e}"}
    return {}


def check_pixels(env: Env, width: int = 0, height: int = 0, batch_size: int = 1, **_: Any) -> dict[str, str]:
    """The size a node makes is bounded as A1111 requests are: width x height x batch_size <= MAX_PIXELS
    (checked on the literal inputs before queueing; `bound_pixels` checks sizes and batches that arrive
    through links when the node runs)."""
    if width * height * batch_size <= MAX_PIXELS:
        return {}
    size = f"{width}x{height}x{batch_size}"
    return {"width": f"width x height x batch_size = {size} exceeds the limit of {MAX_PIXELS:,} pixels"}


def bound_pixels(field: str, width: int, height: int, batch: int) -> None:
    """Refuse, naming the input, an output of width x height x batch over MAX_PIXELS before it is
    allocated (NodeError): batches grow through links (RepeatLatentBatch, ImageBatch) past any one check."""
    if problems := check_pixels(None, width, height, batch):
        raise NodeError(f"{field}: {problems['width']}")


# ---------------------------------------------------------------------------------------------
# loaders and text


@node(
    "CheckpointLoaderSimple",
    "Load Checkpoint",
    "loaders",
    ("MODEL", "CLIP", "VAE"),
    inputs={"ckpt_name": (lambda env: list(env.library.checkpoints()),)},
)
def checkpoint_loader(env: Env, ckpt_name: str) -> tuple[Model, Clip, AutoencoderKL]:
    """Loads a diffusion model checkpoint.

    A listed checkpoint's model, text encoder and VAE."""
    model = env.models.model(ckpt_name)
    return Model(model), Clip(model), model.vae


@node(
    "VAELoader", "Load VAE", "loaders", ("VAE",), inputs={"vae_name": (lambda env: list(env.library.vaes()),)}
)
def vae_loader(env: Env, vae_name: str) -> tuple[AutoencoderKL]:
    """Loads a VAE.

    A listed standalone VAE."""
    return (env.models.vae(vae_name),)


@node(
    "LoraLoader",
    "Load LoRA",
    "loaders",
    ("MODEL", "CLIP"),
    inputs={
        "model": ("MODEL",),
        "clip": ("CLIP",),
        "lora_name": (lambda env: list(env.library.loras()),),
        "strength_model": _float(1.0, -100.0, 100.0),
        "strength_clip": _float(1.0, -100.0, 100.0),
    },
)
def lora_loader(
    env: Env, model: Model, clip: Clip, lora_name: str, strength_model: float, strength_clip: float
) -> tuple[Model, Clip]:
    """Applies a LoRA to the model and CLIP.

    The model and CLIP with a LoRA to merge (its U-Net and text-encoder parts at their own strengths)."""
    path = env.library.find(env.library.loras(), lora_name, "LoRA")
    return (
        replace(model, loras=(*model.loras, (path, strength_model))),
        replace(clip, loras=(*clip.loras, (path, strength_clip))),
    )


@node(
    "CLIPSetLastLayer",
    "CLIP Set Last Layer",
    "conditioning",
    ("CLIP",),
    inputs={"clip": ("CLIP",), "stop_at_clip_layer": _int(-1, -24, -1)},
)
def clip_set_last_layer(env: Env, clip: Clip, stop_at_clip_layer: int) -> tuple[Clip]:
    """Stops the text encoder at an earlier layer (clip skip).

    Stop the text encoder -stop_at_clip_layer layers from its end (-1: the last)."""
    return (replace(clip, layer=-stop_at_clip_layer),)


@node(
    "CLIPTextEncode",
    "CLIP Text Encode (Prompt)",
    "conditioning",
    ("CONDITIONING",),
    inputs={"text": _TEXT, "clip": ("CLIP",)},
)
def clip_text_encode(env: Env, text: str, clip: Clip) -> tuple[Conditioning]:
    """Encodes a text prompt (A1111 prompt syntax).

    A prompt's conditioning, A1111 prompt syntax included; SDXL sizes follow the sampled latent."""
    return (_encode(env, clip, text),)


@node(
    "CLIPTextEncodeSDXL",
    "CLIPTextEncodeSDXL",
    "advanced/conditioning",
    ("CONDITIONING",),
    inputs={
        "clip": ("CLIP",),
        "width": _int(1024, 0, MAX_RESOLUTION),
        "height": _int(1024, 0, MAX_RESOLUTION),
        "crop_w": _int(0, 0, MAX_RESOLUTION),
        "crop_h": _int(0, 0, MAX_RESOLUTION),
        "target_width": _int(1024, 0, MAX_RESOLUTION),
        "target_height": _int(1024, 0, MAX_RESOLUTION),
        "text_g": _TEXT,
        "text_l": _TEXT,
    },
)
def clip_text_encode_sdxl(
    env: Env,
    clip: Clip,
    width: int,
    height: int,
    crop_w: int,
    crop_h: int,
    target_width: int,
    target_height: int,
    text_g: str,
    text_l: str,
) -> tuple[Conditioning]:
    """Encodes SDXL prompts (one per text encoder) with size conditioning.

    SDXL base conditioning with its own prompt per encoder and explicit size conditioning."""
    _need_vector(clip, "target_size", "CLIPTextEncodeSDXL")
    cond = _encode(env, clip, [text_l, text_g])
    return (
        replace(
            cond,
            original_size=(height, width),
            crop=(crop_h, crop_w),
            target_size=(target_height, target_width),
        ),
    )


@node(
    "CLIPTextEncodeSDXLRefiner",
    "CLIPTextEncodeSDXLRefiner",
    "advanced/conditioning",
    ("CONDITIONING",),
    inputs={
        "ascore": _float(6.0, 0.0, 1000.0),
        "width": _int(1024, 0, MAX_RESOLUTION),
        "height": _int(1024, 0, MAX_RESOLUTION),
        "text": _TEXT,
        "clip": ("CLIP",),
    },
)
def clip_text_encode_sdxl_refiner(
    env: Env, clip: Clip, ascore: float, width: int, height: int, text: str
) -> tuple[Conditioning]:
    """Encodes an SDXL refiner prompt with an aesthetic score.

    SDXL refiner conditioning with an aesthetic score and the original size."""
    _need_vector(clip, "aesthetic_score", "CLIPTextEncodeSDXLRefiner")
    return (replace(_encode(env, clip, text), original_size=(height, width), aesthetic_score=ascore),)


def _encode(env: Env, clip: Clip, text: str | list[str]) -> Conditioning:
    """Encode with ComfyUI's `embedding:NAME` textual inversions from the models folder's embeddings/."""
    own = [p for p in (env.library.embedding_folder(),) if p is not None]
    embeddings = Embeddings.comfy(clip.model, text, embedding_dirs(own))
    use_loras(clip.model, clip.loras, ("text",))
    return encode_text(clip.model, text, clip.layer, embeddings)


def _need_vector(clip: Clip, field: str, node: str) -> None:
    family = clip.model.family
    if field not in family.vector:
        raise NodeError(f"{node} needs a model whose conditioning has {field} ({family.label} has not)")


# ---------------------------------------------------------------------------------------------
# sampling


@node(
    "EmptyLatentImage",
    "Empty Latent Image",
    "latent",
    ("LATENT",),
    inputs={**_LATENT_SIZE, "batch_size": _int(1, 1, 4096)},
    check=check_pixels,
)
def empty_latent_image(env: Env, width: int, height: int, batch_size: int) -> tuple[Latent]:
    """An empty latent image to sample from.

    A batch of empty latents of an image size, shaped by the model that samples it."""
    bound_pixels("batch_size", width, height, batch_size)
    return (Latent(width, height, batch_size),)


@node(
    "KSampler",
    "KSampler",
    "sampling",
    ("LATENT",),
    inputs={
        "model": ("MODEL",),
        "seed": _int(0, 0, MAX_SEED),
        "steps": _int(20, 1, 10000),
        "cfg": _float(8.0, 0.0, 100.0, 0.1),
        **_SAMPLING,
        "denoise": _float(1.0, 0.0, 1.0),
    },
)
def ksampler(
    env: Env,
    model: Model,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: Conditioning,
    negative: Conditioning,
    latent_image: Latent,
    denoise: float,
) -> tuple[Latent]:
    """Denoises a latent image.

    Sample `steps` steps; denoise < 1 runs the last steps of a steps/denoise-step schedule (ComfyUI)."""
    if denoise >= 0.9999:
        sigmas = sampling_sigmas(model.sd, sampler_name, scheduler, steps)
    elif denoise <= 0:
        return (latent_image,)
    else:
        sigmas = sampling_sigmas(model.sd, sampler_name, scheduler, int(steps / denoise))[-(steps + 1) :]
    guidance = Guidance(*guidance_sides(positive, negative), cfg)
    return (_sample(env, model, latent_image, seed, sigmas, guidance, sampler_name, add_noise=True),)


@node(
    "KSamplerAdvanced",
    "KSampler (Advanced)",
    "sampling",
    ("LATENT",),
    inputs={
        "model": ("MODEL",),
        "add_noise": (_list(["enable", "disable"]),),
        "noise_seed": _int(0, 0, MAX_SEED),
        "steps": _int(20, 1, 10000),
        "cfg": _float(8.0, 0.0, 100.0, 0.1),
        **_SAMPLING,
        "start_at_step": _int(0, 0, 10000),
        "end_at_step": _int(10000, 0, 10000),
        "return_with_leftover_noise": (_list(["disable", "enable"]),),
    },
)
def ksampler_advanced(
    env: Env,
    model: Model,
    add_noise: str,
    noise_seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: Conditioning,
    negative: Conditioning,
    latent_image: Latent,
    start_at_step: int,
    end_at_step: int,
    return_with_leftover_noise: str,
) -> tuple[Latent]:
    """Runs part of a sampling schedule.

    Steps start_at_step..end_at_step of a `steps`-step schedule, optionally leaving the noise in."""
    sigmas = sampling_sigmas(model.sd, sampler_name, scheduler, steps)
    if end_at_step < len(sigmas) - 1:
        sigmas = sigmas[: end_at_step + 1].clone()
        if return_with_leftover_noise == "disable":
            sigmas[-1] = 0
    sigmas = sigmas[start_at_step:]
    guidance = Guidance(*guidance_sides(positive, negative), cfg)
    noisy = add_noise == "enable"
    return (_sample(env, model, latent_image, noise_seed, sigmas, guidance, sampler_name, noisy),)


def _sample(
    env: Env,
    model: Model,
    latent: Latent,
    seed: int,
    sigmas: Tensor,
    guidance: Guidance,
    sampler: str | Sampler,
    add_noise: bool,
    callback: Callable[[int, int, Tensor], None] | None = None,
) -> Latent:
    """Noise the latents to sigmas[0] and run the sampler; a noise mask keeps the rest of the latents.
    `callback(step, total, denoised)` instead of the job's progress report."""
    if len(sigmas) < 2:
        return latent
    sd = model.sd
    scaling = (sd.config.vae.scale_factor, sd.config.vae.shift_factor)  # a standalone U-Net has no VAE
    init = _rescaled(
        _samples(latent, sd.config.unet.out_channels, sd.config.vae.downscale), latent.scaling, scaling
    )
    places = latent.batch_index or range(init.shape[0])
    seeds = [(seed + i) % (MAX_SEED + 1) for i in places]
    noise = seed_noise(seeds, tuple(init.shape[1:])) if add_noise else torch.zeros_like(init)
    mask = None if latent.noise_mask is None else _fit_mask(latent.noise_mask, init)
    guidance = replace(guidance, extra=_inpaint_inputs(sd, latent, init, mask))
    keep = None if mask is None else 1 - mask
    x = denoiser.add_noise(init, noise, sigmas[:1].expand(init.shape[0]))
    if env.live is not None:
        env.live.latent_format = sd.family.latent
    use_loras(sd, model.loras, ("unet",))
    guidance.ip = prepare_ip_adapters(model.ip_adapters, sd.unet)
    with ip_adapters_applied(sd.unet, guidance.ip):
        samples = sample(sd, x, sigmas, guidance, sampler, seeds, init, keep, callback or env.step)
    return replace(latent, samples=samples, scaling=scaling)


def _samples(latent: Latent, channels: int, factor: int) -> Tensor:
    """The latents, zeros of (B, channels, H/factor, W/factor) for an empty latent image."""
    if latent.samples is not None:
        return latent.samples
    return torch.zeros((latent.batch, channels, latent.height // factor, latent.width // factor))


def _fit_mask(mask: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(mask, size=like.shape[-2:], mode="bilinear", align_corners=False).to(like)


def _inpaint_inputs(
    model: StableDiffusion, latent: Latent, init: Tensor, mask: Tensor | None
) -> dict[str, Tensor]:
    """c_concat for 9-channel inpainting U-Nets: the mask and the (masked) image latents."""
    if not model.family.inpaint:
        return {}
    if mask is None:  # nothing masked: repaint everything of an empty latent, keep an encoded image
        mask = torch.full_like(init[:, :1], 1.0 if latent.samples is None else 0.0)
    return {"c_concat": torch.cat([mask.round().expand(init.shape[0], 1, -1, -1), init], dim=1)}


# ---------------------------------------------------------------------------------------------
# VAE and latents


@node("VAEDecode", "VAE Decode", "latent", ("IMAGE",), inputs={"samples": ("LATENT",), "vae": ("VAE",)})
def vae_decode(env: Env, samples: Latent, vae: AutoencoderKL) -> tuple[Tensor]:
    """Latents to pixels."""
    latents = _rescaled(
        _samples(samples, vae.cfg.embed_dim, vae.cfg.downscale), samples.scaling, _scaling(vae)
    )
    return (decode_pixels(vae, latents).float(),)


@node("VAEEncode", "VAE Encode", "latent", ("LATENT",), inputs={"pixels": ("IMAGE",), "vae": ("VAE",)})
def vae_encode(env: Env, pixels: Tensor, vae: AutoencoderKL) -> tuple[Latent]:
    """Pixels to latents.

    Pixels (cropped to the VAE's multiple) to latents: the posterior mode."""
    pixels = _crop_to(pixels, vae.cfg.downscale)
    b, _, h, w = pixels.shape
    return (Latent(w, h, b, encode_pixels(vae, pixels), scaling=_scaling(vae)),)


@node(
    "VAEEncodeForInpaint",
    "VAE Encode (for Inpainting)",
    "latent/inpaint",
    ("LATENT",),
    inputs={"pixels": ("IMAGE",), "vae": ("VAE",), "mask": ("MASK",), "grow_mask_by": _int(6, 0, 64)},
)
def vae_encode_for_inpaint(
    env: Env, pixels: Tensor, vae: AutoencoderKL, mask: Tensor, grow_mask_by: int
) -> tuple[Latent]:
    """Encodes an image for inpainting, the masked area greyed out.

    Encode with the masked pixels greyed out; the mask, grown by `grow_mask_by`, limits sampling."""
    pixels = _crop_to(pixels, vae.cfg.downscale)
    b, _, h, w = pixels.shape
    mask = F.interpolate(mask.float(), size=(h, w), mode="bilinear", align_corners=False).round()
    grown = F.max_pool2d(mask, 2 * grow_mask_by + 1, stride=1, padding=grow_mask_by) if grow_mask_by else mask
    latents = encode_pixels(vae, pixels * (1 - mask))  # 0 is mid-grey in [-1, 1]
    return (Latent(w, h, b, latents, noise_mask=grown, scaling=_scaling(vae)),)


@node(
    "SetLatentNoiseMask",
    "Set Latent Noise Mask",
    "latent/inpaint",
    ("LATENT",),
    inputs={"samples": ("LATENT",), "mask": ("MASK",)},
)
def set_latent_noise_mask(env: Env, samples: Latent, mask: Tensor) -> tuple[Latent]:
    """Limits sampling to the masked area.

    Latents whose sampling is limited to the mask."""
    return (replace(samples, noise_mask=mask.float()),)


@node(
    "LatentUpscale",
    "Upscale Latent",
    "latent",
    ("LATENT",),
    inputs={
        "samples": ("LATENT",),
        "upscale_method": (_list(LATENT_UPSCALE),),
        **_SIZE,
        "crop": (_list(CROP),),
    },
    check=check_pixels,
)
def latent_upscale(
    env: Env, samples: Latent, upscale_method: str, width: int, height: int, crop: str
) -> tuple[Latent]:
    """Resizes latents.

    Latents resized to an image size (a 0 side keeps the aspect ratio)."""
    w, h = _target_size(samples.width, samples.height, width, height, multiple=8)
    bound_pixels("samples", w, h, samples.batch)
    if samples.samples is None:
        return (replace(samples, width=w, height=h),)
    factor = samples.width // samples.samples.shape[-1]
    scaled = common_upscale(samples.samples, upscale_method, w // factor, h // factor, crop)
    return (replace(samples, width=w, height=h, samples=scaled),)


@node(
    "ImageScale",
    "Upscale Image",
    "image/upscaling",
    ("IMAGE",),
    inputs={"image": ("IMAGE",), "upscale_method": (_list(IMAGE_UPSCALE),), **_SIZE, "crop": (_list(CROP),)},
    check=check_pixels,
)
def image_scale(
    env: Env, image: Tensor, upscale_method: str, width: int, height: int, crop: str
) -> tuple[Tensor]:
    """Resizes images.

    Images resized (a 0 side keeps the aspect ratio)."""
    w, h = _target_size(image.shape[-1], image.shape[-2], width, height)
    bound_pixels("image", w, h, image.shape[0])
    return (common_upscale(image, upscale_method, w, h, crop),)


@node(
    "UpscaleModelLoader",
    "Load Upscale Model",
    "loaders",
    ("UPSCALE_MODEL",),
    inputs={"model_name": (lambda env: list(env.library.upscale_models()),)},
)
def upscale_model_loader(env: Env, model_name: str) -> tuple[Upscaler]:
    """Loads an upscaler model (ESRGAN, Real-ESRGAN, SwinIR, ...).

    A listed upscaler model (ESRGAN, Real-ESRGAN compact, SwinIR; others through spandrel)."""
    try:
        return (load_upscaler(env.library.find(env.library.upscale_models(), model_name, "upscale model")),)
    except CheckpointError as e:
        raise NodeError(str(e)) from e


@node(
    "ImageUpscaleWithModel",
    "Upscale Image (using Model)",
    "image/upscaling",
    ("IMAGE",),
    inputs={"upscale_model": ("UPSCALE_MODEL",), "image": ("IMAGE",)},
)
def image_upscale_with_model(env: Env, upscale_model: Upscaler, image: Tensor) -> tuple[Tensor]:
    """Upscales images with an upscaler model.

    Images upscaled by the model's factor, in 512-pixel tiles overlapping by 32 as ComfyUI runs them."""
    out = run_upscaler(upscale_model, (image.float() + 1) / 2, tile=512, overlap=32)
    return (out.clamp(0, 1) * 2 - 1,)


def _target_size(w: int, h: int, width: int, height: int, multiple: int = 1) -> tuple[int, int]:
    """(width, height), a 0 side following the other's aspect ratio; both 0 keeps the size."""
    if width == 0 and height == 0:
        return w, h
    width = width or max(multiple, round(w * height / h / multiple) * multiple)
    height = height or max(multiple, round(h * width / w / multiple) * multiple)
    return width, height


def _crop_to(pixels: Tensor, multiple: int) -> Tensor:
    h, w = (s // multiple * multiple for s in pixels.shape[-2:])
    if h == 0 or w == 0:
        raise NodeError(f"image {pixels.shape[-1]}x{pixels.shape[-2]} is smaller than the VAE's {multiple}px")
    return pixels[..., :h, :w]


# ---------------------------------------------------------------------------------------------
# image files


@node(
    "LoadImage",
    "Load Image",
    "image",
    ("IMAGE", "MASK"),
    inputs={"image": (lambda env: image_files(env.folders.inputs), {"image_upload": True})},
    check=check_input_image,
)
def load_image(env: Env, image: str) -> tuple[Tensor, Tensor]:
    """Loads an image from the input folder.

    An input image as pixels and its mask (1 - alpha; zeros without alpha), as ComfyUI's LoadImage:
    the colour under transparent pixels is kept (a mask-editor image keeps its picture), not composited."""
    rgba = open_image(_input_path(env, image), image, env.image_limits, mode="RGBA")
    alpha = rgba.getchannel("A")
    return to_tensor(rgba.convert("RGB")), prepare_mask(alpha, alpha.width, alpha.height, invert=True)


@node(
    "LoadImageMask",
    "Load Image (as Mask)",
    "mask",
    ("MASK",),
    inputs={
        "image": (lambda env: image_files(env.folders.inputs), {"image_upload": True}),
        "channel": (_list(list(MASK_CHANNELS)),),
    },
    check=check_input_image,
)
def load_image_mask(env: Env, image: str, channel: str) -> tuple[Tensor]:
    """Loads one channel of an input image as a mask.

    One channel of an input image as a mask (alpha inverted, as ComfyUI does)."""
    band = open_image(_input_path(env, image), image, env.image_limits, mode="RGBA")
    band = band.getchannel(MASK_CHANNELS[channel])
    return (prepare_mask(band, band.width, band.height, invert=channel == "alpha"),)


def _input_path(env: Env, name: str) -> Path:
    if env.file is not None:
        return env.file("input", *split_name(name))
    return confined(env.folders.inputs, *split_name(name))


@node(
    "SaveImage",
    "Save Image",
    "image",
    (),
    inputs={"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
    output_node=True,
    hidden=_HIDDEN_PNG,
)
def save_image(env: Env, images: Tensor, filename_prefix: str) -> Saved:
    """Saves images to the output folder.

    PNGs `<prefix>_00001_.png`, ... in the output folder (the prefix may name a subfolder)."""
    return _save(images, env.folders.outputs, filename_prefix, "output", env.png_text())


@node(
    "PreviewImage",
    "Preview Image",
    "image",
    (),
    inputs={"images": ("IMAGE",)},
    output_node=True,
    hidden=_HIDDEN_PNG,
)
def preview_image(env: Env, images: Tensor) -> Saved:
    """Shows images (temp folder).

    PNGs in the temp folder, for the client to show."""
    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    return _save(images, env.folders.temp, f"ComfyUI_temp_{suffix}", "temp", env.png_text())


def _save(images: Tensor, root: Path, prefix: str, kind: str, text: dict[str, str]) -> Saved:
    try:
        subfolder, name = split_name(prefix)
        folder = confined(root, subfolder, name).parent
    except PathError as e:
        raise NodeError(f"Saving image outside the output folder is not allowed ({e})") from e
    counter = _next_counter(folder, name)
    saved = []
    for i, image in enumerate(to_pil(images)):
        path = save_png(image, folder / f"{name}_{counter + i:05}_.png", text=text)
        saved.append({"filename": path.name, "subfolder": "/".join(relative_parts(subfolder)), "type": kind})
    return Saved({"images": saved})


def _next_counter(folder: Path, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"_(\d+)_.*\.png$")
    found = [int(m.group(1)) for p in folder.glob("*.png") if (m := pattern.match(p.name))]
    return max(found, default=0) + 1


def _declared(env: Env, spec: tuple[Any, ...]) -> list[Any]:
    """An input's declaration as /object_info lists it (a COMBO's choices listed now)."""
    return [spec[0](env), *spec[1:]] if callable(spec[0]) else list(spec)


def object_info(env: Env, name: str) -> dict[str, Any]:
    """A node type described as ComfyUI's GET /object_info does."""
    node = NODE_TYPES[name]
    kinds = {"required": node.inputs, "optional": node.optional}
    inputs: dict[str, Any] = {
        kind: {k: _declared(env, spec) for k, spec in specs.items()}
        for kind, specs in kinds.items()
        if specs or kind == "required"
    }
    if node.hidden:
        inputs["hidden"] = dict(node.hidden)
    return {
        "input": inputs,
        "input_order": {kind: list(specs) for kind, specs in inputs.items()},
        "output": list(node.outputs),
        "output_is_list": [False] * len(node.outputs),
        "output_name": list(node.output_names or node.outputs),
        "name": name,
        "display_name": node.display_name or name,
        "description": node.description,
        "python_module": "nodes",
        "category": node.category,
        "output_node": node.output_node,
    }


from sdlab.server import nodes_controlnet, nodes_core, nodes_ip_adapter  # noqa: E402, F401  (they register their nodes)
