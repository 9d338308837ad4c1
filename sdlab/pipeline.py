"""One request, one pipeline: txt2img, img2img and inpainting are fields of a `GenerationRequest`.

The CLI, the HTTP APIs and the web UI only parse their input into a `GenerationRequest` and call
`generate`. Seeds follow AUTOMATIC1111: image i of a request with seed s starts from
`torch.randn((1, C, H/8, W/8), generator=torch.Generator("cpu").manual_seed(s + i))`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdlab import regions
from sdlab.checkpoints.load import StableDiffusion
from sdlab.conditioning import Conditioning, Prompt, encode_prompts
from sdlab.control import (
    ComfyControl,
    Control,
    ControlSpec,
    adapter_features,
    comfy_features,
    comfy_residuals,
    control_residuals,
    load_controls,
    prepare_controls,
)
from sdlab.devices import large_buffers_kept
from sdlab.diffusion.denoiser import Denoiser, DenoiserFn, add_noise, guide
from sdlab.diffusion.samplers import DISCARD_PENULTIMATE_SIGMA, Sampler, get_sampler, resolve_sampler
from sdlab.diffusion.schedule import DiscreteSchedule, get_sigmas
from sdlab.embeddings import Embeddings, embedding_dirs
from sdlab.fast import FastMode, fast_mode
from sdlab.finite import check_finite, overflow_cause
from sdlab.hires import HiresFix, crop_latents, target, upscale_latents, upscale_to
from sdlab.images import (
    Box,
    apply_overlay,
    blur_mask,
    expand_box,
    fill_masked,
    flatten,
    latent_mask,
    mask_box,
    mask_overlay,
    masked_content,
    prepare_mask,
    read_mask,
    resize_image,
    to_pil,
    to_tensor,
)
from sdlab.ip_adapter import IPAdapterSpec, PreparedIP, ip_adapters_applied, prepare_ip_adapters
from sdlab.lora import use_loras
from sdlab.models.controlnet import ControlNetModel
from sdlab.models.ops import compute_dtype, device_of
from sdlab.networks import find_lora, lora_dirs, lora_tags, no_tags
from sdlab.offload import devices_emptied_after
from sdlab.vae_tools import decode_pixels, encode_pixels

Callback = Callable[[int, int, Tensor], None]
MAX_PIXELS = 4096 * 4096  # width x height x batch of one request (a 4096² image, or 16 at 1024²)
MAX_MASK_BLUR = 256  # A1111's slider stops at 64; the blur's taps grow as 5·blur
MAX_PROMPT_CHARS = 20_000  # ~5,000 tokens, ~70 chunks per encoder  # (step, total, current denoised latent)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines the images of one generation."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "euler_ancestral"
    scheduler: str = "normal"
    seed: int = -1
    batch_size: int = 1
    clip_skip: int = 1
    init_image: Image.Image | None = field(default=None, compare=False)
    strength: float = 0.75
    resize_mode: str = "resize"
    mask: Image.Image | None = field(default=None, compare=False)
    mask_blur: int = 4
    inpainting_mask_invert: bool = False
    # A1111's inpainting settings, defaults as its web UI's (its API route sends the API's own)
    mask_blur_x: int | None = None  # blur along x, and along y; None: mask_blur
    mask_blur_y: int | None = None
    mask_round: bool = True  # alpha masks thresholded, latent mask rounded to 0/1
    inpainting_fill: str | int = "original"  # masked content: fill, original, latent noise, latent nothing
    inpaint_full_res: bool = False  # "only masked": repaint a crop around the mask at width x height
    inpaint_full_res_padding: int = 32  # pixels of context around the mask in that crop
    loras: tuple[tuple[str, float], ...] = ()  # (file, weight) merged while generating, besides the tags
    lora_dirs: tuple[
        str, ...
    ] = ()  # where `<lora:NAME:W>` tags are looked up (then $SDLAB_MODELS_DIR, models)
    embedding_dirs: tuple[str, ...] = ()  # where embedding names are looked up (then $SDLAB_MODELS_DIR, .)
    embeddings: tuple[tuple[str, str], ...] = ()  # (name, file) of the embeddings used; set by generate
    refiner: str | None = None  # a second model that finishes the sampling (SDXL refiner), by name
    refiner_switch_at: float = 0.8  # share of the run after which the refiner takes over
    refiner_switch_by_steps: bool = False  # A1111 < 1.8: count steps instead of comparing timesteps
    hires: HiresFix | None = None  # A1111's hires fix: upscale, then a second (img2img) pass
    controls: tuple[ControlSpec, ...] = ()  # ControlNet units, their residuals summed (sdlab.control)
    ip_adapters: tuple[IPAdapterSpec, ...] = ()  # image prompts (sdlab.ip_adapter)
    fast: FastMode | None = None  # opt-in approximations (feature caching, token merging; sdlab.fast)

    def __post_init__(self) -> None:  # lists from JSON job requests become tuples
        if isinstance(self.hires, dict):
            object.__setattr__(self, "hires", HiresFix(**self.hires))
        object.__setattr__(self, "loras", tuple((str(f), float(w)) for f, w in self.loras))
        object.__setattr__(self, "inpainting_fill", masked_content(self.inpainting_fill))
        object.__setattr__(self, "lora_dirs", tuple(str(d) for d in self.lora_dirs))
        object.__setattr__(self, "embedding_dirs", tuple(str(d) for d in self.embedding_dirs))
        object.__setattr__(self, "embeddings", tuple((str(n), str(f)) for n, f in self.embeddings))
        object.__setattr__(self, "controls", tuple(self.controls))
        object.__setattr__(self, "ip_adapters", tuple(self.ip_adapters))

    def validate(self, latent_factor: int = 8, max_pixels: int = MAX_PIXELS) -> None:
        """Raise ValueError naming the first bad field; sizes are bounded before any work is done."""
        for name in ("width", "height"):
            v = getattr(self, name)
            if v <= 0 or v % latent_factor:
                raise ValueError(f"{name} must be a positive multiple of {latent_factor}, got {v}")
        if self.width * self.height * self.batch_size > max_pixels:
            raise ValueError(
                f"width x height x batch_size = {self.width}x{self.height}x{self.batch_size} exceeds the "
                f"limit of {max_pixels:,} pixels per request"
            )
        for name in ("cfg_scale", "strength", "refiner_switch_at"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise ValueError(f"{name} is longer than {MAX_PROMPT_CHARS:,} characters")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be between 1 and 1000, got {self.steps}")
        if not 1 <= self.batch_size <= 64:
            raise ValueError(f"batch_size must be between 1 and 64, got {self.batch_size}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.clip_skip < 1:
            raise ValueError(f"clip_skip must be at least 1, got {self.clip_skip}")
        if self.mask is not None and self.init_image is None:
            raise ValueError("a mask needs an init image to inpaint")
        self._validate_inpainting()
        if not 0.0 < self.refiner_switch_at <= 1.0:
            raise ValueError(f"refiner_switch_at must be in (0, 1], got {self.refiner_switch_at}")
        resolve_sampler(self.sampler, self.scheduler)
        if self.hires is not None:
            self._validate_hires(latent_factor, max_pixels)
        for i, control in enumerate(self.controls):
            control.validate(i)
        if self.controls and (self.refiner is not None or self.hires is not None):
            raise ValueError("controls with a refiner or the hires fix: not supported yet")
        for i, ip in enumerate(self.ip_adapters):
            ip.validate(i)
        if self.ip_adapters and (self.refiner is not None or self.hires is not None):
            raise ValueError("ip_adapters with a refiner or the hires fix: not supported yet")
        if self.fast is not None:
            self.fast.validate()
            if self.refiner is not None and not self.fast.exact:
                raise ValueError("fast with a refiner: not supported yet (the refiner would run exact)")

    def _validate_hires(self, latent_factor: int, max_pixels: int) -> None:
        """The hires fix: its settings, the final size against the pixel bound, its prompts' length; a
        txt2img of one model only (as in A1111)."""
        assert self.hires is not None
        width, height = self.hires.validate(self.width, self.height, latent_factor)
        if width * height * self.batch_size > max_pixels:
            raise ValueError(
                f"the hires fix's {width}x{height} x batch_size {self.batch_size} exceeds the limit of "
                f"{max_pixels:,} pixels per request"
            )
        if max(len(self.hires.prompt), len(self.hires.negative_prompt)) > MAX_PROMPT_CHARS:
            raise ValueError(f"a hires prompt is longer than {MAX_PROMPT_CHARS:,} characters")
        if self.init_image is not None or self.refiner is not None:
            raise ValueError("the hires fix is for txt2img without a refiner (as in A1111)")
        resolve_sampler(self.hires.sampler or self.sampler, self.hires.scheduler or self.scheduler)

    def _validate_inpainting(self) -> None:
        """Mask blurs within 0..MAX_MASK_BLUR (the work grows with them), a padding of at least 0."""
        for name in ("mask_blur", "mask_blur_x", "mask_blur_y"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_MASK_BLUR:
                raise ValueError(f"{name} must be between 0 and {MAX_MASK_BLUR}, got {value}")
        if (padding := self.inpaint_full_res_padding) < 0:
            raise ValueError(f"inpaint_full_res_padding must be at least 0, got {padding}")

    @property
    def blur_xy(self) -> tuple[int, int]:
        """The mask blur along x and y: mask_blur_x / mask_blur_y where set, else mask_blur."""
        x, y = self.mask_blur_x, self.mask_blur_y
        return (self.mask_blur if x is None else x, self.mask_blur if y is None else y)


class StopSampling(Exception):
    """Raised by a progress callback to end sampling early: `generate` then decodes the last denoised
    latents, as A1111 does for an interrupted image."""


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    request: GenerationRequest  # with the seed, sampler and schedule resolved
    latents: Tensor  # the final scaled latents (B, C, H/f, W/f)
    interrupted: bool = False  # stopped early by the callback: the images are the last denoised step


def resolve_seed(seed: int) -> int:
    """-1 (or any negative seed) means a fresh random 32-bit seed."""
    return random.randrange(2**32) if seed < 0 else seed


def seed_noise(seeds: list[int], shape: tuple[int, int, int]) -> Tensor:
    """The initial latent noise of each image, drawn on the CPU so every device gives the same."""
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    )


def _latents_of(model: StableDiffusion, image: Tensor, generator: torch.Generator | None) -> Tensor:
    """VAE-encode pixels in [-1, 1] to scaled latents (posterior sample, as A1111 and diffusers do)."""
    return encode_pixels(model.vae, image, generator)


def _device(model: StableDiffusion) -> torch.device:
    return device_of(model.unet)


def _dtype(model: StableDiffusion) -> torch.dtype:
    return compute_dtype(model.unet)


def decode(model: StableDiffusion, latents: Tensor) -> list[Image.Image]:
    """Scaled latents -> RGB images."""
    return to_pil(decode_pixels(model.vae, latents))


def generate(
    model: StableDiffusion,
    req: GenerationRequest,
    callback: Callback | None = None,
    refiner: StableDiffusion | None = None,
    controlnets: Mapping[str, ControlNetModel] | None = None,
) -> GenerationResult:
    """Run one request end to end and return the images with their seeds. `refiner`: the loaded model
    `req.refiner` names, which takes over the sampling at `req.refiner_switch_at` (A1111's refiner).
    `controlnets`: loaded ControlNets by the `model` names of `req.controls` (the others are loaded from
    their files for this call). The returned request has the seed, sampler, schedule, LoRA files and
    embeddings resolved."""
    factor = model.config.vae.downscale
    req.validate(factor)
    if (req.refiner is None) != (refiner is None):
        raise ValueError("a refiner needs both its name in the request and the loaded model")
    prompt, tagged = lora_tags(req.prompt)
    no_tags(req.negative_prompt, "negative prompt")
    found = [(str(find_lora(name, lora_dirs(req.lora_dirs))), weight) for name, weight in tagged]
    req = replace(req, seed=resolve_seed(req.seed), loras=(*req.loras, *found))
    sampler_name, schedule_name = resolve_sampler(req.sampler, req.scheduler)
    req = replace(req, sampler=sampler_name, scheduler=schedule_name or "normal")
    if req.hires is not None:
        hires = req.hires.resolved(req.sampler, req.scheduler, req.prompt, req.negative_prompt)
        req = replace(req, hires=hires)
    seeds = [req.seed + i for i in range(req.batch_size)]
    shape = (model.config.unet.out_channels, req.height // factor, req.width // factor)
    use_loras(model, req.loras)  # kept merged for the next request with the same set
    if refiner is not None:
        use_loras(refiner, ())
    with torch.inference_mode(), fast_mode(model.unet, req.fast), devices_emptied_after():
        noise = seed_noise(seeds, shape).to(_device(model), _dtype(model))
        embeddings = Embeddings.a1111(model, embedding_dirs(req.embedding_dirs))
        guidance = _guidance(model, prompt, req, embeddings)
        sigmas = sampling_sigmas(model, sampler_name, req.scheduler, req.steps)
        prepared = prepare_init_image(req)
        if prepared is not None and prepared.mask is None and req.mask is not None:  # a blank "only masked"
            req = replace(req, inpaint_full_res=False, inpainting_fill="original")  # plain img2img, as A1111
        init, keep, extra = None, None, _txt2img_conditioning(model, req.height, req.width, req.batch_size)
        if req.init_image is not None:
            init, keep, extra = _image_conditioning(model, req, prepared, noise)
            sigmas = img2img_sigmas(sigmas, req.strength, req.steps)
        guidance.extra = extra
        nets = load_controls(req.controls, controlnets or {}, model.unet)
        guidance.controls = prepare_controls(req.controls, nets, req.width, req.height, factor)
        guidance.ip = image_prompts = prepare_ip_adapters(req.ip_adapters, model.unet)
        handover = None
        if refiner is not None:
            refined = Embeddings.a1111(refiner, embedding_dirs(req.embedding_dirs))
            r_guidance = _guidance(refiner, prompt, req, refined)
            handover = Handover(refiner, r_guidance, req.refiner_switch_at, req.refiner_switch_by_steps)
            embeddings.used |= {k: v for k, v in refined.used.items() if k not in embeddings.used}
        second = _hires_guidance(model, req, embeddings) if req.hires is not None else None
        req = replace(req, embeddings=tuple((e.name, str(e.path)) for e in embeddings.used.values()))
        x = add_noise(torch.zeros_like(noise) if init is None else init, noise, sigmas[:1].expand(len(seeds)))
        with ip_adapters_applied(model.unet, image_prompts):
            samples, interrupted = _sample_until_stopped(
                model, x, sigmas, guidance, sampler_name, seeds, init, keep, callback, handover
            )
        if second is not None and not interrupted:  # A1111 skips the hires pass of an interrupted image
            samples, interrupted = _hires_pass(model, req, second, samples, seeds, callback)
        images = _overlay(decode(refiner or model, samples), prepared)
    return GenerationResult(images, seeds, req, samples, interrupted)


def img2img_sigmas(sigmas: Tensor, strength: float, steps: int) -> Tensor:
    """The end of a `steps`-step schedule that img2img runs at `strength`: int(strength·steps) steps
    (strength capped at 0.999, so at least one step), as A1111's `sample_img2img`."""
    t_enc = int(min(strength, 0.999) * steps)
    return sigmas[steps - t_enc - 1 :]


def _hires_guidance(model: StableDiffusion, req: GenerationRequest, embeddings: Embeddings) -> Guidance:
    """The hires pass's prompts (the first pass's where empty) encoded over its steps, prompt editing
    counted on from the first pass; SDXL sizes are the upscale target's (A1111's `calculate_hr_conds`)."""
    assert req.hires is not None
    prompt, tagged = lora_tags(req.hires.prompt or req.prompt)
    if tagged != lora_tags(req.prompt)[1]:
        raise ValueError("a hires prompt with other <lora:> tags than the prompt's: not supported yet")
    negative = req.hires.negative_prompt or req.negative_prompt
    no_tags(negative, "hires negative prompt")
    steps = req.hires.steps or req.steps
    cond, uncond = encode_prompts(model, prompt, negative, steps, req.clip_skip, embeddings, req.steps)
    t = target(req.width, req.height, req.hires, model.config.vae.downscale)

    def sized(c: Conditioning) -> Conditioning:
        return replace(c, original_size=(t.height, t.width), target_size=(t.height, t.width))

    return Guidance(cond.map(sized), uncond.map(sized), req.cfg_scale)


def _hires_pass(
    model: StableDiffusion,
    req: GenerationRequest,
    guidance: Guidance,
    first: Tensor,
    seeds: list[int],
    callback: Callback | None,
) -> tuple[Tensor, bool]:
    """A1111's `sample_hr_pass`: the first pass's latents upscaled (in latent space, or decoded, upscaled
    and encoded with each image's seed) and cropped, then sampled as img2img from noise of the same seeds."""
    hires, f = req.hires, model.config.vae.downscale
    assert hires is not None
    t = target(req.width, req.height, hires, f)
    if hires.latent:
        init = upscale_latents(first, hires.upscaler, t.height // f, t.width // f)
    else:
        images = decode(model, first)
        big = [upscale_to(im, hires.upscaler, t.width, t.height, hires.upscaler_dirs) for im in images]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        init = torch.cat([_latents_of(model, to_tensor(im), g) for im, g in zip(big, gens, strict=True)])
    init = crop_latents(init, t)
    steps = hires.steps or req.steps
    sigmas = sampling_sigmas(model, hires.sampler, hires.scheduler, steps)
    sigmas = img2img_sigmas(sigmas, hires.denoise, steps)
    guidance.extra = _txt2img_conditioning(model, init.shape[-2] * f, init.shape[-1] * f, len(seeds))
    noise = seed_noise(seeds, tuple(init.shape[1:])).to(init)
    x = add_noise(init, noise, sigmas[:1].expand(len(seeds)))
    return _sample_until_stopped(model, x, sigmas, guidance, hires.sampler, seeds, None, None, callback, None)


def _guidance(
    model: StableDiffusion, prompt: str, req: GenerationRequest, embeddings: Embeddings
) -> Guidance:
    """The request's A1111 prompts (without their `<lora:>` tags) encoded by `model`."""
    cond, uncond = encode_prompts(model, prompt, req.negative_prompt, req.steps, req.clip_skip, embeddings)
    return Guidance(cond, uncond, req.cfg_scale)


def _sample_until_stopped(
    model: StableDiffusion,
    x: Tensor,
    sigmas: Tensor,
    guidance: Guidance,
    sampler: str,
    seeds: list[int],
    init: Tensor | None,
    keep: Tensor | None,
    callback: Callback | None,
    handover: Handover | None,
) -> tuple[Tensor, bool]:
    """`sample`, and (the last denoised latents, True) when the callback stops it (A1111's interrupt)."""
    last: list[Tensor] = []

    def progress(step: int, total: int, denoised: Tensor) -> None:
        last[:] = [denoised]
        if callback is not None:
            callback(step, total, denoised)

    try:
        return sample(model, x, sigmas, guidance, sampler, seeds, init, keep, progress, handover), False
    except StopSampling:
        if not last:
            raise
        return last[0], True


def sampling_sigmas(model: StableDiffusion, sampler: str, scheduler: str, steps: int) -> Tensor:
    """The descending σ of a full `steps`-step run of a (ComfyUI-named) sampler and schedule."""
    schedule = DiscreteSchedule.for_model(model.config)
    discard = sampler in DISCARD_PENULTIMATE_SIGMA
    return get_sigmas(scheduler, schedule, steps, discard_penultimate=discard).to(_device(model))


@dataclass
class Guidance:
    """What classifier-free guidance conditions on: the conditionings (fixed, or an A1111 `Prompt` that
    changes by model call and may have weighted `AND` parts), the scale, extra model inputs (c_concat
    of inpainting U-Nets)."""

    cond: Conditioning | Prompt
    uncond: Conditioning | Prompt
    scale: float
    extra: dict[str, Tensor] = field(default_factory=dict)
    controls: list[Control] = field(default_factory=list)  # ControlNet units applied on each call
    ip: PreparedIP | None = None  # IP-Adapter image tokens and gates (sdlab.ip_adapter)


@dataclass
class Calls:
    """The number of denoiser calls so far in a sampling run (A1111's `CFGDenoiser.step`), and the index
    of the last finished sampler step of `total` (A1111's `state.sampling_step`, which ControlNet reads)."""

    n: int = 0
    step: int = 0
    total: int = 1
    sigma: float = 0.0  # σ of the current call (the σ ranges of ComfyUI's ControlNets read it)


def _at(c: Conditioning | Prompt, call: int) -> list[tuple[Conditioning, float]]:
    return [(c, 1.0)] if isinstance(c, Conditioning) else c.at(call)


@dataclass
class Handover:
    """A second model that takes over the sampling part-way (A1111's refiner): from the first
    denoiser call whose nearest DDPM timestep t has (999 − t)/1000 ≥ switch_at (A1111 ≥ 1.8; the
    `denoising_end` of diffusers), or with `by_steps` whose call count i has i/steps ≥ switch_at."""

    model: StableDiffusion
    guidance: Guidance
    switch_at: float
    by_steps: bool = False


def guided_denoiser(model: StableDiffusion, guidance: Guidance, x: Tensor, calls: Calls) -> DenoiserFn:
    """D(x, σ) with classifier-free guidance for latents shaped like x (B, C, h, w); the conditionings
    of call `calls.n` (prompt editing), their U-Net inputs built once each."""
    b, _, h, w = x.shape
    f = model.config.vae.downscale
    unet = _unet_fn(model, guidance.controls, calls, guidance.ip)
    denoiser = Denoiser(unet, DiscreteSchedule.for_model(model.config), model.config.prediction)
    built: dict[tuple[int, bool], dict[str, Tensor]] = {}
    sides = (guidance.cond, guidance.uncond)
    comfy_controls = any(
        c.control for side in sides if not isinstance(side, Prompt) for c in regions.entries(side)
    )

    def inputs(cond: Conditioning, negative: bool) -> dict[str, Tensor]:
        key = (id(cond), negative)
        if key not in built:
            built[key] = {**cond.model_inputs(model.family, b, h * f, w * f, negative), **guidance.extra}
            if guidance.ip is not None:  # appended to the context by the U-Net function
                tokens = guidance.ip.uncond if negative else guidance.ip.cond
                built[key]["ip_tokens"] = tokens.expand(b, -1, -1)
            if guidance.controls:  # which rows are conditional (ControlNet's "control" mode)
                built[key]["control_mark"] = torch.full((b,), 0.0 if negative else 1.0, device=x.device)
            if comfy_controls:  # ComfyUI's ControlNets, each entry its own (rows batch when they agree)
                built[key]["control"] = cond.control  # type: ignore[assignment]
        return built[key]

    if isinstance(guidance.cond, tuple):  # ComfyUI's conditioning lists (areas, masks, timestep ranges)
        return _regional(denoiser, model, guidance, x, inputs)

    def guided(x: Tensor, sigma: Tensor, **extra: Tensor) -> Tensor:
        conds = [(inputs(c, False), weight) for c, weight in _at(guidance.cond, calls.n)]
        (uncond, _), *more = _at(guidance.uncond, calls.n)
        if more:
            raise ValueError("a negative prompt has no AND parts")
        return guide(denoiser, x, sigma, conds, inputs(uncond, True), guidance.scale, extra)

    return guided


def _regional(
    denoiser: DenoiserFn,
    model: StableDiffusion,
    guidance: Guidance,
    x: Tensor,
    inputs: Callable[[Conditioning, bool], dict[str, Tensor]],
) -> DenoiserFn:
    """ComfyUI's guidance of conditioning lists (`sdlab.regions`): each side's entries weighted by area,
    mask and timestep range, then D_u + scale·(D_c − D_u); at scale 1 the unconditional side is skipped."""
    h, w = x.shape[-2:]
    schedule = DiscreteSchedule.for_model(model.config)
    sides = regions.resolve(guidance.cond, guidance.uncond, h, w, schedule)  # type: ignore[arg-type]

    def side(index: int, x: Tensor, sigma: Tensor, extra: dict[str, Tensor]) -> Tensor:
        def run(part: Tensor, cond: Conditioning, area: regions.Area) -> Tensor:
            if guidance.controls and part.shape[-2:] != (h, w):
                raise ValueError("ControlNet with area or mask-bounds conditioning is not supported")
            own = {**inputs(cond, index == 1), **extra}
            return denoiser(part, sigma, **regions.crop_inputs(own, area, h, w))

        return regions.weighted_prediction(run, sides[index], x, sigma)

    def guided(x: Tensor, sigma: Tensor, **extra: Tensor) -> Tensor:
        cond = side(0, x, sigma, extra)
        if math.isclose(guidance.scale, 1.0):
            return cond
        uncond = side(1, x, sigma, extra)
        return uncond + (cond - uncond) * guidance.scale

    return guided


def _handing_over(
    first: DenoiserFn, handover: Handover, schedule: DiscreteSchedule, steps: int, calls: Calls
) -> DenoiserFn:
    """`first` until the hand-over point, then the second model's guided denoiser for good."""
    second: DenoiserFn | None = None

    def denoise(x: Tensor, sigma: Tensor, **kw: Tensor) -> Tensor:
        nonlocal second
        if second is None:
            if handover.by_steps:
                done = calls.n / steps
            else:
                t = int((schedule.sigmas.to(sigma) - sigma.max()).abs().argmin())
                done = (999 - t) / 1000
            if done >= handover.switch_at:
                second = guided_denoiser(handover.model, handover.guidance, x, calls)
        return (first if second is None else second)(x, sigma, **kw)

    return denoise


def sample(
    model: StableDiffusion,
    x: Tensor,
    sigmas: Tensor,
    guidance: Guidance,
    sampler: str | Sampler,
    seeds: list[int],
    init: Tensor | None = None,
    keep: Tensor | None = None,
    callback: Callback | None = None,
    handover: Handover | None = None,
) -> Tensor:
    """Run `sampler` (a name, or a sampler function with its options bound, as ComfyUI's SAMPLER nodes make
    one) on noisy latents x (B, C, h, w) from σ = sigmas[0] down to sigmas[-1].

    Image i draws its sampler noise from a generator seeded with seeds[i]; where `keep` is 1 the
    latents stay at `init` (latent-blending inpainting); `handover` switches models part-way.
    """
    calls = Calls(total=len(sigmas) - 1)
    guided = guided_denoiser(model, guidance, x, calls)
    schedule = DiscreteSchedule.for_model(model.config)
    if handover is not None:
        guided = _handing_over(guided, handover, schedule, len(sigmas) - 1, calls)
    if keep is not None:
        guided = _blend_denoised(guided, init, keep)
    guided = _counted(guided, calls)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    total = len(sigmas) - 1

    def on_step(i: int, sigma: Tensor, xi: Tensor, denoised: Tensor) -> None:
        calls.step = i
        if callback is not None:
            callback(i + 1, total, denoised)

    run = get_sampler(sampler, schedule) if isinstance(sampler, str) else sampler
    with large_buffers_kept(device_of(model.unet)):
        samples = run(guided, x, sigmas, callback=on_step, generator=generators)
    check_finite(samples, "the sampled latents", overflow_cause("U-Net", samples.dtype))
    return samples if keep is None else init * keep + samples * (1 - keep)


def _unet_fn(
    model: StableDiffusion,
    controls: list[Control] | None = None,
    calls: Calls | None = None,
    ip: PreparedIP | None = None,
) -> Callable[..., Tensor]:
    """The U-Net as `model(x_in, t, context=..., y=..., c_concat=..., control_mark=..., control=...)`;
    c_concat feeds inpainting U-Nets; `controls` add their residuals at the step fraction `calls` reports,
    computed from the latents without c_concat (as A1111's extension does for inpainting models);
    `control`, a ComfyUI entry's ControlNet chain, adds its residuals at the σ `calls` reports; `ip`'s
    adapters are switched on or off by their start/end at that fraction or σ."""
    schedule = DiscreteSchedule.for_model(model.config)

    def sigma_at(percent: float) -> float:
        return regions.percent_to_sigma(schedule, percent)

    def unet(
        x: Tensor,
        t: Tensor,
        context: Tensor,
        c_concat: Tensor | None = None,
        y: Tensor | None = None,
        control_mark: Tensor | None = None,
        control: tuple[ComfyControl, ...] = (),
        ip_tokens: Tensor | None = None,
    ) -> Tensor:
        residuals, features = None, None
        if controls:
            fraction = calls.step / calls.total if calls is not None else 0.0
            residuals = control_residuals(controls, x, t, context, y, control_mark, fraction)
            features = adapter_features(controls, x, control_mark, fraction, model.unet.cfg)
        if control:
            assert calls is not None, "ComfyUI's ControlNets need the σ of each call"
            bounds = [(sigma_at(c.start_percent), sigma_at(c.end_percent)) for c in control]
            residuals = comfy_residuals(control, bounds, x, t, context, y, calls.sigma, model.unet, residuals)
            features = comfy_features(control, bounds, x, calls.sigma, model.unet, features)
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x)], dim=1)
        if ip_tokens is not None:  # IP-Adapter: the cross-attentions split them off (sdlab.ip_adapter)
            context = torch.cat([context, ip_tokens.to(context)], dim=1)
            if ip is not None and calls is not None:
                ip.update(calls.step / calls.total, calls.sigma, sigma_at)
        return model.unet(x, t, context, y, residuals, features)

    return unet


@dataclass(frozen=True)
class InitImage:
    """The init image made ready as A1111's img2img does (`StableDiffusionProcessingImg2Img.init`)."""

    pixels: Image.Image  # at width x height: the whole image or, "only masked", the crop around the mask
    mask: Image.Image | None = None  # the blurred repaint mask over `pixels` (greyscale)
    overlay: Image.Image | None = None  # the init image laid over the results (RGBA, clear where repainted)
    paste_to: tuple[int, int, int, int] | None = None  # (x, y, w, h) where a crop's result goes back


def prepare_init_image(req: GenerationRequest) -> InitImage | None:
    """The request's init image, mask and overlay (None for txt2img): the mask read, inverted and
    blurred at the mask's size, then the whole picture or the crop around the mask ("only masked") scaled
    to width x height, its masked part filled for the "fill" masked content."""
    if req.init_image is None:
        return None
    image = flatten(req.init_image)
    if req.mask is None:
        return InitImage(resize_image(image, req.width, req.height, req.resize_mode))
    mask = blur_mask(read_mask(req.mask, req.mask_round, req.inpainting_mask_invert), *req.blur_xy)
    box = mask_box(mask, req.inpaint_full_res_padding) if req.inpaint_full_res else None
    if req.inpaint_full_res and box is None:  # nothing masked: A1111 makes a plain img2img
        return InitImage(resize_image(image, req.width, req.height, req.resize_mode))
    prepared = _whole_picture(req, image, mask) if box is None else _only_masked(req, image, mask, box)
    if req.inpainting_fill == "fill":
        prepared = replace(prepared, pixels=fill_masked(prepared.pixels, prepared.mask))
    return prepared


def _whole_picture(req: GenerationRequest, image: Image.Image, mask: Image.Image) -> InitImage:
    """Image and mask resized alike; the overlay keeps the init image where the mask is under half."""
    image = resize_image(image, req.width, req.height, req.resize_mode)
    mask = resize_image(mask, req.width, req.height, req.resize_mode)
    return InitImage(image, mask, mask_overlay(image, mask.point(lambda v: min(2 * v, 255))))


def _only_masked(req: GenerationRequest, image: Image.Image, mask: Image.Image, box: Box) -> InitImage:
    """The box around the mask grown to the generation's aspect, cut from image and mask and scaled to
    width x height; the overlay is the whole init image, the result goes back into the box."""
    x1, y1, x2, y2 = expand_box(box, req.width, req.height, mask.width, mask.height)
    at_size = mask if mask.size == image.size else resize_image(mask, *image.size, req.resize_mode)
    crop = [resize_image(im.crop((x1, y1, x2, y2)), req.width, req.height, "fill") for im in (image, mask)]
    return InitImage(crop[0], crop[1], mask_overlay(image, at_size), (x1, y1, x2 - x1, y2 - y1))


def _image_conditioning(
    model: StableDiffusion, req: GenerationRequest, prepared: InitImage, noise: Tensor
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """Init latents, the latent 'keep' mask for latent blending, and c_concat for 9-channel U-Nets;
    "latent noise" / "latent nothing" put the seeds' noise / zeros in the masked latents (A1111)."""
    batch = noise.shape[0]
    image = to_tensor(prepared.pixels)
    gen = torch.Generator("cpu").manual_seed(req.seed)
    init = _latents_of(model, image, gen).expand(batch, -1, -1, -1)
    if prepared.mask is None:
        hard = torch.ones_like(image[:, :1])
        return init, None, _inpaint_conditioning(model, image, hard, batch) if model.family.inpaint else {}
    masked = latent_mask(prepared.mask, init.shape[-1], init.shape[-2], req.mask_round).to(init)
    if req.inpainting_fill == "latent noise":
        init = init * (1 - masked) + noise * masked
    elif req.inpainting_fill == "latent nothing":
        init = init * (1 - masked)
    extra: dict[str, Tensor] = {}
    if model.family.inpaint:
        soft = prepare_mask(prepared.mask, req.width, req.height)
        extra = _inpaint_conditioning(model, image, soft.round() if req.mask_round else soft, batch)
    return init, 1 - masked, extra


def _txt2img_conditioning(model: StableDiffusion, height: int, width: int, batch: int) -> dict[str, Tensor]:
    """Extra U-Net inputs of a txt2img: for inpainting U-Nets a blank image, all masked (A1111's
    `txt2img_image_conditioning`); none for others."""
    if not model.family.inpaint:
        return {}
    blank = torch.zeros(1, 3, height, width)
    return _inpaint_conditioning(model, blank, torch.ones_like(blank[:, :1]), batch)


def _inpaint_conditioning(
    model: StableDiffusion, image: Tensor, hard: Tensor, batch: int
) -> dict[str, Tensor]:
    """c_concat of a 9-channel inpainting U-Net: the repaint mask at latent size and the latents of the
    image with the repainted part blanked (A1111, diffusers); txt2img passes a blank image, all masked."""
    masked = _latents_of(model, image * (1 - hard), None)
    c_mask = F.interpolate(hard, size=masked.shape[-2:], mode="nearest").to(masked)
    return {"c_concat": torch.cat([c_mask, masked], dim=1).expand(batch, -1, -1, -1)}


def _overlay(images: list[Image.Image], prepared: InitImage | None) -> list[Image.Image]:
    """Lay the init image over the results outside the mask, a crop's result first put back in its
    place, as A1111 does after inpainting."""
    if prepared is None or prepared.overlay is None:
        return images
    return [apply_overlay(im, prepared.overlay, prepared.paste_to) for im in images]


def _counted(denoiser: DenoiserFn, calls: Calls) -> DenoiserFn:
    """Count the calls of a denoiser (the index prompt schedules and the refiner switch read)."""

    def counted(x: Tensor, sigma: Tensor, **kw: Tensor) -> Tensor:
        calls.sigma = float(sigma.reshape(-1)[0])
        try:
            return denoiser(x, sigma, **kw)
        finally:
            calls.n += 1

    return counted


def _blend_denoised(denoiser: Callable[..., Tensor], init: Tensor, keep: Tensor) -> Callable[..., Tensor]:
    """Keep the unmasked region at the init image's latents (A1111's latent-blending inpainting)."""

    def blended(x: Tensor, sigma: Tensor, **kw: Tensor) -> Tensor:
        return init * keep + denoiser(x, sigma, **kw) * (1 - keep)

    return blended
