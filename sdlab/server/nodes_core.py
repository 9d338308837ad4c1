"""More of ComfyUI's core nodes, each declared where it runs (`node`), with ComfyUI's names, display names,
categories, inputs and defaults: loaders, conditioning lists (combine, average, concat, areas, masks,
timestep ranges), latent and image operations, tiled VAE, and the custom-sampling nodes (SAMPLER, SIGMAS,
NOISE and GUIDER values). Registered in `sdlab.server.nodes.NODE_TYPES` on import.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdlab.checkpoints.io import CheckpointError
from sdlab.checkpoints.load import StableDiffusion
from sdlab.checkpoints.parts import load_text_encoders, load_unet
from sdlab.diffusion.samplers import SAMPLERS, Sampler, sample_sa_solver
from sdlab.diffusion.schedule import SCHEDULES, DiscreteSchedule, get_sigmas
from sdlab.models.vae import AutoencoderKL
from sdlab.pipeline import Guidance
from sdlab.regions import Conds, entries, guidance_sides, single_or_list
from sdlab.resample import common_upscale
from sdlab.server.nodes import (
    IMAGE_UPSCALE,
    LATENT_UPSCALE,
    MAX_RESOLUTION,
    MAX_SEED,
    Clip,
    Env,
    Latent,
    Model,
    NodeError,
    _crop_to,
    _float,
    _int,
    _list,
    _rescaled,
    _sample,
    _samples,
    _scaling,
    bound_pixels,
    checkpoint_loader,
    lora_loader,
    node,
)
from sdlab.vae_tools import decode_tiled, encode_tiled

LATENT_CHANNELS, LATENT_FACTOR = 4, 8  # an empty latent made concrete, as ComfyUI's EmptyLatentImage makes it


# ---------------------------------------------------------------------------------------------
# loaders


@node(
    "CheckpointLoader",
    "Load Checkpoint With Config (DEPRECATED)",
    "advanced/loaders",
    ("MODEL", "CLIP", "VAE"),
    inputs={
        "config_name": (lambda env: list(env.library.configs()),),
        "ckpt_name": (lambda env: list(env.library.checkpoints()),),
    },
)
def checkpoint_loader_with_config(
    env: Env, config_name: str, ckpt_name: str
) -> tuple[Model, Clip, AutoencoderKL]:
    """Loads a checkpoint; the listed config names the architecture, which sdlab reads from the weights."""
    return checkpoint_loader(env, ckpt_name)


@node(
    "LoraLoaderModelOnly",
    "LoraLoaderModelOnly",
    "loaders",
    ("MODEL",),
    inputs={
        "model": ("MODEL",),
        "lora_name": (lambda env: list(env.library.loras()),),
        "strength_model": _float(1.0, -100.0, 100.0),
    },
)
def lora_loader_model_only(env: Env, model: Model, lora_name: str, strength_model: float) -> tuple[Model]:
    """Applies a LoRA to the model's U-Net only."""
    return (lora_loader(env, model, Clip(model.sd), lora_name, strength_model, 0.0)[0],)


def _part_file(env: Env, kind: str, name: str, what: str) -> Path:
    return env.library.find(env.library.listing(kind), name, what)


def _loaded(load: Callable[[], StableDiffusion]) -> StableDiffusion:
    try:
        return load()
    except CheckpointError as e:
        raise NodeError(str(e)) from e


@node(
    "UNETLoader",
    "Load Diffusion Model",
    "advanced/loaders",
    ("MODEL",),
    inputs={
        "unet_name": (lambda env: list(env.library.listing("diffusion_models")),),
        "weight_dtype": (_list(["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]),),
    },
)
def unet_loader(env: Env, unet_name: str, weight_dtype: str) -> tuple[Model]:
    """Loads a standalone U-Net file (original or diffusers keys) from diffusion_models/ or unet/."""
    if weight_dtype != "default":
        raise NodeError(f"UNETLoader weight_dtype {weight_dtype!r}: sdlab runs no fp8 weights (use default)")
    path = _part_file(env, "diffusion_models", unet_name, "diffusion model")
    return (Model(_loaded(lambda: load_unet(path, env.models.placement))),)


@node(
    "CLIPLoader",
    "Load CLIP",
    "advanced/loaders",
    ("CLIP",),
    inputs={
        "clip_name": (lambda env: list(env.library.listing("text_encoders")),),
        "type": (_list(["stable_diffusion", "stable_cascade", "sd3", "stable_audio"]),),
    },
)
def clip_loader(env: Env, clip_name: str, type: str) -> tuple[Clip]:
    """Loads a standalone CLIP-L (SD1) or OpenCLIP ViT-H (SD2) text encoder, in either key layout."""
    return (_text_encoders(env, [clip_name], type, "stable_diffusion", "CLIPLoader"),)


@node(
    "DualCLIPLoader",
    "DualCLIPLoader",
    "advanced/loaders",
    ("CLIP",),
    inputs={
        "clip_name1": (lambda env: list(env.library.listing("text_encoders")),),
        "clip_name2": (lambda env: list(env.library.listing("text_encoders")),),
        "type": (_list(["sdxl", "sd3", "flux"]),),
    },
)
def dual_clip_loader(env: Env, clip_name1: str, clip_name2: str, type: str) -> tuple[Clip]:
    """Loads SDXL's two text encoders (CLIP-L and OpenCLIP bigG, in either order and key layout)."""
    return (_text_encoders(env, [clip_name1, clip_name2], type, "sdxl", "DualCLIPLoader"),)


def _text_encoders(env: Env, names: list[str], kind: str, supported: str, node_name: str) -> Clip:
    if kind != supported:
        raise NodeError(f"{node_name} type {kind!r}: sdlab runs only {supported!r} text encoders here")
    paths = [_part_file(env, "text_encoders", n, "text encoder") for n in names]
    return Clip(_loaded(lambda: load_text_encoders(paths, kind == "sdxl", env.models.placement)))


# ---------------------------------------------------------------------------------------------
# conditioning lists

_STRENGTH = _float(1.0, 0.0, 10.0)


def _each(conditioning: Conds, **fields: Any) -> Conds:
    """Every entry with `fields` set (ComfyUI's `conditioning_set_values`)."""
    return single_or_list([replace(c, **fields) for c in entries(conditioning)])


@node(
    "ConditioningCombine",
    "Conditioning (Combine)",
    "conditioning",
    ("CONDITIONING",),
    inputs={"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)},
)
def conditioning_combine(env: Env, conditioning_1: Conds, conditioning_2: Conds) -> tuple[Conds]:
    """Both lists of entries as one: their predictions are averaged by area and mask while sampling."""
    return ((*entries(conditioning_1), *entries(conditioning_2)),)


@node(
    "ConditioningAverage",
    "ConditioningAverage",  # ComfyUI's display-name entry has a stray space, so its class name shows
    "conditioning",
    ("CONDITIONING",),
    inputs={
        "conditioning_to": ("CONDITIONING",),
        "conditioning_from": ("CONDITIONING",),
        "conditioning_to_strength": _float(1.0, 0.0, 1.0),
    },
)
def conditioning_average(
    env: Env, conditioning_to: Conds, conditioning_from: Conds, conditioning_to_strength: float
) -> tuple[Conds]:
    """to·s + from·(1 − s) per entry of `to` (from's first entry, cut or zero-padded to its length)."""
    source, s = entries(conditioning_from)[0], conditioning_to_strength
    out = []
    for c in entries(conditioning_to):
        t0 = source.context[:, : c.context.shape[1]]
        if t0.shape[1] < c.context.shape[1]:
            pad = torch.zeros((1, c.context.shape[1] - t0.shape[1], c.context.shape[2]), dtype=t0.dtype)
            t0 = torch.cat([t0, pad], dim=1)
        pooled_to = c.pooled if c.pooled is not None else source.pooled
        pooled = c.pooled
        if source.pooled is not None and pooled_to is not None:
            pooled = pooled_to * s + source.pooled * (1.0 - s)
        out.append(replace(c, context=c.context * s + t0 * (1.0 - s), pooled=pooled))
    return (single_or_list(out),)


@node(
    "ConditioningConcat",
    "Conditioning (Concat)",
    "conditioning",
    ("CONDITIONING",),
    inputs={"conditioning_to": ("CONDITIONING",), "conditioning_from": ("CONDITIONING",)},
)
def conditioning_concat(env: Env, conditioning_to: Conds, conditioning_from: Conds) -> tuple[Conds]:
    """from's first entry's tokens appended to each entry of `to`."""
    source = entries(conditioning_from)[0].context
    return (
        single_or_list(
            [replace(c, context=torch.cat([c.context, source], 1)) for c in entries(conditioning_to)]
        ),
    )


@node(
    "ConditioningSetArea",
    "Conditioning (Set Area)",
    "conditioning",
    ("CONDITIONING",),
    inputs={
        "conditioning": ("CONDITIONING",),
        "width": _int(64, 64, MAX_RESOLUTION, 8),
        "height": _int(64, 64, MAX_RESOLUTION, 8),
        "x": _int(0, 0, MAX_RESOLUTION, 8),
        "y": _int(0, 0, MAX_RESOLUTION, 8),
        "strength": _STRENGTH,
    },
)
def conditioning_set_area(
    env: Env, conditioning: Conds, width: int, height: int, x: int, y: int, strength: float
) -> tuple[Conds]:
    """Limits the entries to a rectangle of the image (pixels, in steps of the latent's 8)."""
    area = (height // 8, width // 8, y // 8, x // 8)
    return (_each(conditioning, area=area, strength=strength, set_area_to_bounds=False),)


_FRACTION = _float(1.0, 0.0, 1.0)


@node(
    "ConditioningSetAreaPercentage",
    "Conditioning (Set Area with Percentage)",
    "conditioning",
    ("CONDITIONING",),
    inputs={
        "conditioning": ("CONDITIONING",),
        "width": _FRACTION,
        "height": _FRACTION,
        "x": _float(0.0, 0.0, 1.0),
        "y": _float(0.0, 0.0, 1.0),
        "strength": _STRENGTH,
    },
)
def conditioning_set_area_percentage(
    env: Env, conditioning: Conds, width: float, height: float, x: float, y: float, strength: float
) -> tuple[Conds]:
    """Limits the entries to a rectangle given as fractions of the image."""
    area = ("percentage", height, width, y, x)
    return (_each(conditioning, area=area, strength=strength, set_area_to_bounds=False),)


@node(
    "ConditioningSetAreaStrength",
    "ConditioningSetAreaStrength",
    "conditioning",
    ("CONDITIONING",),
    inputs={"conditioning": ("CONDITIONING",), "strength": _STRENGTH},
)
def conditioning_set_area_strength(env: Env, conditioning: Conds, strength: float) -> tuple[Conds]:
    """Sets the entries' weight."""
    return (_each(conditioning, strength=strength),)


@node(
    "ConditioningSetMask",
    "Conditioning (Set Mask)",
    "conditioning",
    ("CONDITIONING",),
    inputs={
        "conditioning": ("CONDITIONING",),
        "mask": ("MASK",),
        "strength": _STRENGTH,
        "set_cond_area": (_list(["default", "mask bounds"]),),
    },
)
def conditioning_set_mask(
    env: Env, conditioning: Conds, mask: Tensor, strength: float, set_cond_area: str
) -> tuple[Conds]:
    """Limits the entries to a mask (weighted by it); "mask bounds" also crops to its bounding box."""
    planes = mask.float().reshape(-1, *mask.shape[-2:])
    bounds = set_cond_area != "default"
    return (_each(conditioning, mask=planes, set_area_to_bounds=bounds, mask_strength=strength),)


@node(
    "ConditioningZeroOut",
    "ConditioningZeroOut",
    "advanced/conditioning",
    ("CONDITIONING",),
    inputs={"conditioning": ("CONDITIONING",)},
)
def conditioning_zero_out(env: Env, conditioning: Conds) -> tuple[Conds]:
    """The entries with their text embeddings (and pooled embeddings) zeroed."""
    return (single_or_list([c.zeroed() for c in entries(conditioning)]),)


@node(
    "ConditioningSetTimestepRange",
    "ConditioningSetTimestepRange",
    "advanced/conditioning",
    ("CONDITIONING",),
    inputs={
        "conditioning": ("CONDITIONING",),
        "start": _float(0.0, 0.0, 1.0, 0.001),
        "end": _float(1.0, 0.0, 1.0, 0.001),
    },
)
def conditioning_set_timestep_range(env: Env, conditioning: Conds, start: float, end: float) -> tuple[Conds]:
    """Limits the entries to a part of the sampling schedule (fractions of it, 0 = the start)."""
    return (_each(conditioning, start_percent=start, end_percent=end),)


# ---------------------------------------------------------------------------------------------
# latents


def _concrete(latent: Latent) -> Tensor:
    return _samples(latent, LATENT_CHANNELS, LATENT_FACTOR)


def _factor(latent: Latent) -> int:
    return LATENT_FACTOR if latent.samples is None else latent.width // latent.samples.shape[-1]


def _with_samples(latent: Latent, samples: Tensor, **fields: Any) -> Latent:
    h, w = samples.shape[-2:]
    factor = _factor(latent)
    return replace(
        latent, samples=samples, width=w * factor, height=h * factor, batch=samples.shape[0], **fields
    )


@node(
    "LatentUpscaleBy",
    "Upscale Latent By",
    "latent",
    ("LATENT",),
    inputs={
        "samples": ("LATENT",),
        "upscale_method": (_list(LATENT_UPSCALE),),
        "scale_by": _float(1.5, 0.01, 8.0),
    },
)
def latent_upscale_by(env: Env, samples: Latent, upscale_method: str, scale_by: float) -> tuple[Latent]:
    """Latents resized by a factor."""
    if samples.samples is None:
        f = LATENT_FACTOR
        w, h = round(samples.width // f * scale_by) * f, round(samples.height // f * scale_by) * f
        bound_pixels("scale_by", w, h, samples.batch)
        return (replace(samples, width=w, height=h),)
    z = samples.samples
    w, h = round(z.shape[-1] * scale_by), round(z.shape[-2] * scale_by)
    bound_pixels("scale_by", w * _factor(samples), h * _factor(samples), samples.batch)
    return (_with_samples(samples, common_upscale(z, upscale_method, w, h, "disabled")),)


@node(
    "LatentComposite",
    "Latent Composite",
    "latent",
    ("LATENT",),
    inputs={
        "samples_to": ("LATENT",),
        "samples_from": ("LATENT",),
        "x": _int(0, 0, MAX_RESOLUTION, 8),
        "y": _int(0, 0, MAX_RESOLUTION, 8),
        "feather": _int(0, 0, MAX_RESOLUTION, 8),
    },
)
def latent_composite(
    env: Env, samples_to: Latent, samples_from: Latent, x: int, y: int, feather: int
) -> tuple[Latent]:
    """samples_from pasted into samples_to at (x, y), its inner edges feathered over `feather` pixels."""
    x, y, feather = x // 8, y // 8, feather // 8
    to = _concrete(samples_to)
    source = _rescaled(_concrete(samples_from), samples_from.scaling, samples_to.scaling)
    source = source[:, :, : to.shape[2] - y, : to.shape[3] - x]
    out = to.clone()
    h, w = source.shape[-2:]
    mask = torch.ones_like(source)
    for t in range(feather):
        ramp = (1.0 / feather) * (t + 1)
        if y != 0:
            mask[:, :, t : t + 1, :] *= ramp
        if y + h < to.shape[2]:
            mask[:, :, h - 1 - t : h - t, :] *= ramp
        if x != 0:
            mask[:, :, :, t : t + 1] *= ramp
        if x + w < to.shape[3]:
            mask[:, :, :, w - 1 - t : w - t] *= ramp
    out[:, :, y : y + h, x : x + w] = source * mask + out[:, :, y : y + h, x : x + w] * (1 - mask)
    return (_with_samples(samples_to, out),)


@node(
    "LatentBlend",
    "Latent Blend",
    "_for_testing",
    ("LATENT",),
    inputs={"samples1": ("LATENT",), "samples2": ("LATENT",), "blend_factor": _float(0.5, 0.0, 1.0)},
)
def latent_blend(env: Env, samples1: Latent, samples2: Latent, blend_factor: float) -> tuple[Latent]:
    """samples1·f + samples2·(1 − f); samples2 resized (bicubic, centre crop) to samples1's size first."""
    a = _concrete(samples1)
    b = _rescaled(_concrete(samples2), samples2.scaling, samples1.scaling)
    if b.shape != a.shape:
        b = common_upscale(b, "bicubic", a.shape[-1], a.shape[-2], "center")
    return (_with_samples(samples1, a * blend_factor + b * (1 - blend_factor)),)


@node(
    "LatentFromBatch",
    "Latent From Batch",
    "latent/batch",
    ("LATENT",),
    inputs={"samples": ("LATENT",), "batch_index": _int(0, 0, 63), "length": _int(1, 1, 64)},
)
def latent_from_batch(env: Env, samples: Latent, batch_index: int, length: int) -> tuple[Latent]:
    """Images batch_index .. batch_index + length − 1 of a batch; each keeps its place (its noise seed)."""
    n = samples.batch if samples.samples is None else samples.samples.shape[0]
    start = min(n - 1, batch_index)
    length = min(n - start, length)
    mask = samples.noise_mask
    if mask is not None and mask.shape[0] > 1:
        if mask.shape[0] < n:
            mask = mask.repeat(math.ceil(n / mask.shape[0]), 1, 1, 1)[:n]
        mask = mask[start : start + length]
    places = tuple(samples.batch_index or range(n))[start : start + length]
    if samples.samples is None:  # an empty latent stays empty: the sampling model gives it its shape
        return (replace(samples, batch=length, noise_mask=mask, batch_index=places),)
    picked = samples.samples[start : start + length].clone()
    return (_with_samples(samples, picked, noise_mask=mask, batch_index=places),)


@node(
    "RepeatLatentBatch",
    "Repeat Latent Batch",
    "latent/batch",
    ("LATENT",),
    inputs={"samples": ("LATENT",), "amount": _int(1, 1, 64)},
)
def repeat_latent_batch(env: Env, samples: Latent, amount: int) -> tuple[Latent]:
    """The batch repeated `amount` times (later copies placed after the batch's own places)."""
    bound_pixels("amount", samples.width, samples.height, samples.batch * amount)
    mask = samples.noise_mask
    if mask is not None and mask.shape[0] > 1:
        mask = mask.repeat(amount, 1, 1, 1)
    places = samples.batch_index
    if places is not None:
        offset = max(places) - min(places) + 1
        places = places + tuple(p + i * offset for i in range(1, amount) for p in places)
    if samples.samples is None:
        return (replace(samples, batch=samples.batch * amount, noise_mask=mask, batch_index=places),)
    z = samples.samples.repeat(amount, 1, 1, 1)
    return (_with_samples(samples, z, noise_mask=mask, batch_index=places),)


# ---------------------------------------------------------------------------------------------
# tiled VAE (ComfyUI's tiles: decode tile_size/8 latent pixels overlapping by 16, encode tile_size image
# pixels overlapping by 64)

DECODE_OVERLAP, ENCODE_OVERLAP = 16, 64
_TILE = _int(512, 320, 4096, 64)


@node(
    "VAEDecodeTiled",
    "VAE Decode (Tiled)",
    "_for_testing",
    ("IMAGE",),
    inputs={"samples": ("LATENT",), "vae": ("VAE",), "tile_size": _TILE},
)
def vae_decode_tiled(env: Env, samples: Latent, vae: AutoencoderKL, tile_size: int) -> tuple[Tensor]:
    """Latents to pixels in overlapping tiles (bounded memory for large images)."""
    scale, shift = _scaling(vae)
    latents = _rescaled(
        _samples(samples, vae.cfg.embed_dim, vae.cfg.downscale), samples.scaling, (scale, shift)
    )
    z = latents / scale + shift
    tile = tile_size // vae.cfg.downscale
    with torch.no_grad():
        return (
            torch.cat([decode_tiled(vae, z[i : i + 1], tile, DECODE_OVERLAP) for i in range(len(z))]).float(),
        )


@node(
    "VAEEncodeTiled",
    "VAE Encode (Tiled)",
    "_for_testing",
    ("LATENT",),
    inputs={"pixels": ("IMAGE",), "vae": ("VAE",), "tile_size": _TILE},
)
def vae_encode_tiled(env: Env, pixels: Tensor, vae: AutoencoderKL, tile_size: int) -> tuple[Latent]:
    """Pixels to latents (the posterior mode) in overlapping tiles."""
    pixels = _crop_to(pixels, vae.cfg.downscale)
    b, _, h, w = pixels.shape
    scale, shift = _scaling(vae)
    z = encode_tiled(vae, pixels, tile_size, ENCODE_OVERLAP).mode()
    return (Latent(w, h, b, (z - shift) * scale, scaling=(scale, shift)),)


# ---------------------------------------------------------------------------------------------
# custom sampling: SAMPLER (a sampler name, or a sampler function with its options), SIGMAS (a σ tensor),
# NOISE, GUIDER


@dataclass(frozen=True)
class Noise:
    """NOISE: the seed of the initial noise (image i: seed + i), or None for none (DisableNoise)."""

    seed: int | None


@dataclass(frozen=True)
class Guider:
    """GUIDER: classifier-free guidance of a model by two conditionings."""

    model: Model
    positive: Conds
    negative: Conds
    cfg: float


@node(
    "KSamplerSelect",
    "KSamplerSelect",
    "sampling/custom_sampling/samplers",
    ("SAMPLER",),
    inputs={"sampler_name": (_list(list(SAMPLERS)),)},
)
def ksampler_select(env: Env, sampler_name: str) -> tuple[str]:
    """A sampler by name."""
    return (sampler_name,)


_UNROUNDED = {"step": 0.01, "round": False}


@node(
    "SamplerSASolver",
    "SamplerSASolver",
    "sampling/custom_sampling/samplers",
    ("SAMPLER",),
    inputs={
        "model": ("MODEL",),
        "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, **_UNROUNDED}),
        "sde_start_percent": _float(0.2, 0.0, 1.0, 0.001),
        "sde_end_percent": _float(0.8, 0.0, 1.0, 0.001),
        "s_noise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, **_UNROUNDED}),
        "predictor_order": _int(3, 1, 6),
        "corrector_order": _int(4, 0, 6),
        "use_pece": ("BOOLEAN", {"default": False}),
        "simple_order_2": ("BOOLEAN", {"default": False}),
    },
)
def sampler_sa_solver(
    env: Env,
    model: Model,
    eta: float,
    sde_start_percent: float,
    sde_end_percent: float,
    s_noise: float,
    predictor_order: int,
    corrector_order: int,
    use_pece: bool,
    simple_order_2: bool,
) -> tuple[Sampler]:
    """SA-Solver with these options, its SDE interval placed on `model`'s schedule (ComfyUI's node)."""
    sampler = partial(
        sample_sa_solver,
        eta=eta,
        sde_start_percent=sde_start_percent,
        sde_end_percent=sde_end_percent,
        s_noise=s_noise,
        predictor_order=predictor_order,
        corrector_order=corrector_order,
        use_pece=use_pece,
        simple_order_2=simple_order_2,
        schedule=DiscreteSchedule.for_model(model.sd.config),
    )
    return (sampler,)


@node(
    "BasicScheduler",
    "BasicScheduler",
    "sampling/custom_sampling/schedulers",
    ("SIGMAS",),
    inputs={
        "model": ("MODEL",),
        "scheduler": (_list(list(SCHEDULES)),),
        "steps": _int(20, 1, 10000),
        "denoise": _float(1.0, 0.0, 1.0),
    },
)
def basic_scheduler(env: Env, model: Model, scheduler: str, steps: int, denoise: float) -> tuple[Tensor]:
    """The model's σ schedule; denoise < 1 keeps the last steps of a steps/denoise-step schedule."""
    total = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return (torch.zeros(0),)
        total = int(steps / denoise)
    sigmas = get_sigmas(scheduler, DiscreteSchedule.for_model(model.sd.config), total)
    return (sigmas[-(steps + 1) :],)


@node(
    "RandomNoise",
    "RandomNoise",
    "sampling/custom_sampling/noise",
    ("NOISE",),
    inputs={"noise_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True})},
)
def random_noise(env: Env, noise_seed: int) -> tuple[Noise]:
    """Gaussian noise from a seed."""
    return (Noise(noise_seed),)


@node("DisableNoise", "DisableNoise", "sampling/custom_sampling/noise", ("NOISE",))
def disable_noise(env: Env) -> tuple[Noise]:
    """No initial noise (the latents are sampled as they are)."""
    return (Noise(None),)


@node(
    "CFGGuider",
    "CFGGuider",
    "sampling/custom_sampling/guiders",
    ("GUIDER",),
    inputs={
        "model": ("MODEL",),
        "positive": ("CONDITIONING",),
        "negative": ("CONDITIONING",),
        "cfg": _float(8.0, 0.0, 100.0, 0.1),
    },
)
def cfg_guider(env: Env, model: Model, positive: Conds, negative: Conds, cfg: float) -> tuple[Guider]:
    """Classifier-free guidance at a scale."""
    return (Guider(model, positive, negative, cfg),)


@node(
    "SamplerCustomAdvanced",
    "SamplerCustomAdvanced",
    "sampling/custom_sampling",
    ("LATENT", "LATENT"),
    inputs={
        "noise": ("NOISE",),
        "guider": ("GUIDER",),
        "sampler": ("SAMPLER",),
        "sigmas": ("SIGMAS",),
        "latent_image": ("LATENT",),
    },
    output_names=("output", "denoised_output"),
)
def sampler_custom_advanced(
    env: Env, noise: Noise, guider: Guider, sampler: str | Sampler, sigmas: Tensor, latent_image: Latent
) -> tuple[Latent, Latent]:
    """Samples along the σ schedule; also returns the last step's prediction of the clean latents."""
    denoised: list[Tensor] = []

    def step(i: int, total: int, prediction: Tensor) -> None:
        denoised[:] = [prediction]
        env.step(i, total, prediction)

    guidance = Guidance(*guidance_sides(guider.positive, guider.negative), guider.cfg)
    seed, noisy = noise.seed or 0, noise.seed is not None
    out = _sample(env, guider.model, latent_image, seed, sigmas, guidance, sampler, noisy, step)
    return out, (replace(out, samples=denoised[0]) if denoised else out)


# ---------------------------------------------------------------------------------------------
# images (pixels in [-1, 1]: ComfyUI's 1 − x is −x, its grey 0.5 is 0)


@node(
    "ImageScaleBy",
    "Upscale Image By",
    "image/upscaling",
    ("IMAGE",),
    inputs={
        "image": ("IMAGE",),
        "upscale_method": (_list(IMAGE_UPSCALE),),
        "scale_by": _float(1.0, 0.01, 8.0),
    },
)
def image_scale_by(env: Env, image: Tensor, upscale_method: str, scale_by: float) -> tuple[Tensor]:
    """Images resized by a factor."""
    w, h = round(image.shape[-1] * scale_by), round(image.shape[-2] * scale_by)
    bound_pixels("scale_by", w, h, image.shape[0])
    return (common_upscale(image, upscale_method, w, h, "disabled"),)


@node("ImageInvert", "Invert Image", "image", ("IMAGE",), inputs={"image": ("IMAGE",)})
def image_invert(env: Env, image: Tensor) -> tuple[Tensor]:
    """Images with their colours inverted."""
    return (-image,)


@node("ImageBatch", "Batch Images", "image", ("IMAGE",), inputs={"image1": ("IMAGE",), "image2": ("IMAGE",)})
def image_batch(env: Env, image1: Tensor, image2: Tensor) -> tuple[Tensor]:
    """Two batches as one, image2 resized (bilinear, centre crop) to image1's size."""
    bound_pixels("image2", image1.shape[-1], image1.shape[-2], image1.shape[0] + image2.shape[0])
    if image1.shape[1:] != image2.shape[1:]:
        image2 = common_upscale(image2, "bilinear", image1.shape[-1], image1.shape[-2], "center")
    return (torch.cat([image1, image2]),)


_PAD = _int(0, 0, MAX_RESOLUTION, 8)


@node(
    "ImagePadForOutpaint",
    "Pad Image for Outpainting",
    "image",
    ("IMAGE", "MASK"),
    inputs={
        "image": ("IMAGE",),
        "left": _PAD,
        "top": _PAD,
        "right": _PAD,
        "bottom": _PAD,
        "feathering": _int(40, 0, MAX_RESOLUTION),
    },
)
def image_pad_for_outpaint(
    env: Env, image: Tensor, left: int, top: int, right: int, bottom: int, feathering: int
) -> tuple[Tensor, Tensor]:
    """Images padded with grey and the mask to outpaint: 1 on the padding, inside ((f − d)/f)² within
    `feathering` pixels of a padded side (d: the distance to it), as ComfyUI computes it."""
    b, c, h, w = image.shape
    bound_pixels("image", w + left + right, h + top + bottom, b)
    padded = torch.zeros((b, c, h + top + bottom, w + left + right), dtype=torch.float32)
    padded[:, :, top : top + h, left : left + w] = image
    mask = torch.ones((h + top + bottom, w + left + right))
    inner = torch.zeros((h, w))
    if 0 < feathering and feathering * 2 < h and feathering * 2 < w:
        i = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
        j = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
        far_h, far_w = torch.full_like(i, h), torch.full_like(j, w)
        d = torch.stack(
            [
                i if top else far_h,
                h - i if bottom else far_h,
                j if left else far_w,
                w - j if right else far_w,
            ]
        ).amin(dim=0)
        inner = torch.where(d < feathering, ((feathering - d) / feathering) ** 2, inner)
    mask[top : top + h, left : left + w] = inner
    return padded, mask[None, None]
