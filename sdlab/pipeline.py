"""One request, one pipeline: txt2img, img2img and inpainting are fields of a `GenerationRequest`.

The CLI, the HTTP APIs and the web UI only parse their input into a `GenerationRequest` and call
`generate`. Seeds follow AUTOMATIC1111: image i of a request with seed s starts from
`torch.randn((1, C, H/8, W/8), generator=torch.Generator("cpu").manual_seed(s + i))`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdlab.checkpoints.load import StableDiffusion
from sdlab.conditioning import Conditioning, Prompt, encode_prompts
from sdlab.diffusion.denoiser import Denoiser, DenoiserFn, add_noise, guide
from sdlab.diffusion.samplers import DISCARD_PENULTIMATE_SIGMA, get_sampler, resolve_sampler
from sdlab.diffusion.schedule import DiscreteSchedule, get_sigmas
from sdlab.embeddings import Embeddings, embedding_dirs
from sdlab.images import prepare_mask, resize_image, to_pil, to_tensor
from sdlab.lora import use_loras
from sdlab.networks import find_lora, lora_dirs, lora_tags, no_tags
from sdlab.vae_tools import decode_pixels, encode_pixels

Callback = Callable[[int, int, Tensor], None]
MAX_PIXELS = 4096 * 4096  # width x height x batch of one request (a 4096² image, or 16 at 1024²)
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
    loras: tuple[tuple[str, float], ...] = ()  # (file, weight) merged while generating, besides the tags
    lora_dirs: tuple[
        str, ...
    ] = ()  # where `<lora:NAME:W>` tags are looked up (then $SDLAB_MODELS_DIR, models)
    embedding_dirs: tuple[str, ...] = ()  # where embedding names are looked up (then $SDLAB_MODELS_DIR, .)
    embeddings: tuple[tuple[str, str], ...] = ()  # (name, file) of the embeddings used; set by generate
    refiner: str | None = None  # a second model that finishes the sampling (SDXL refiner), by name
    refiner_switch_at: float = 0.8  # share of the run after which the refiner takes over
    refiner_switch_by_steps: bool = False  # A1111 < 1.8: count steps instead of comparing timesteps

    def __post_init__(self) -> None:  # lists from JSON job requests become tuples
        object.__setattr__(self, "loras", tuple((str(f), float(w)) for f, w in self.loras))
        object.__setattr__(self, "lora_dirs", tuple(str(d) for d in self.lora_dirs))
        object.__setattr__(self, "embedding_dirs", tuple(str(d) for d in self.embedding_dirs))
        object.__setattr__(self, "embeddings", tuple((str(n), str(f)) for n, f in self.embeddings))

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
        if not 0.0 < self.refiner_switch_at <= 1.0:
            raise ValueError(f"refiner_switch_at must be in (0, 1], got {self.refiner_switch_at}")
        resolve_sampler(self.sampler, self.scheduler)


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
    return next(model.unet.parameters()).device


def _dtype(model: StableDiffusion) -> torch.dtype:
    return next(model.unet.parameters()).dtype


def decode(model: StableDiffusion, latents: Tensor) -> list[Image.Image]:
    """Scaled latents -> RGB images."""
    return to_pil(decode_pixels(model.vae, latents))


def generate(
    model: StableDiffusion,
    req: GenerationRequest,
    callback: Callback | None = None,
    refiner: StableDiffusion | None = None,
) -> GenerationResult:
    """Run one request end to end and return the images with their seeds. `refiner`: the loaded model
    `req.refiner` names, which takes over the sampling at `req.refiner_switch_at` (A1111's refiner).
    The returned request has the seed, sampler, schedule, LoRA files and embeddings resolved."""
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
    seeds = [req.seed + i for i in range(req.batch_size)]
    shape = (model.config.unet.out_channels, req.height // factor, req.width // factor)
    use_loras(model, req.loras)  # kept merged for the next request with the same set
    if refiner is not None:
        use_loras(refiner, ())
    with torch.inference_mode():
        noise = seed_noise(seeds, shape).to(_device(model), _dtype(model))
        embeddings = Embeddings.a1111(model, embedding_dirs(req.embedding_dirs))
        guidance = _guidance(model, prompt, req, embeddings)
        sigmas = sampling_sigmas(model, sampler_name, req.scheduler, req.steps)
        init, keep, extra = None, None, {}
        if req.init_image is None and model.family.inpaint:
            blank = torch.zeros(1, 3, req.height, req.width)
            extra = _inpaint_conditioning(model, blank, torch.ones_like(blank[:, :1]), req.batch_size)
        if req.init_image is not None:
            init, keep, extra = _image_conditioning(model, req, req.batch_size)
            t_enc = int(min(req.strength, 0.999) * req.steps)
            sigmas = sigmas[req.steps - t_enc - 1 :]
        guidance.extra = extra
        handover = None
        if refiner is not None:
            refined = Embeddings.a1111(refiner, embedding_dirs(req.embedding_dirs))
            r_guidance = _guidance(refiner, prompt, req, refined)
            handover = Handover(refiner, r_guidance, req.refiner_switch_at, req.refiner_switch_by_steps)
            embeddings.used |= {k: v for k, v in refined.used.items() if k not in embeddings.used}
        req = replace(req, embeddings=tuple((e.name, str(e.path)) for e in embeddings.used.values()))
        x = add_noise(torch.zeros_like(noise) if init is None else init, noise, sigmas[:1].expand(len(seeds)))
        samples, interrupted = _sample_until_stopped(
            model, x, sigmas, guidance, sampler_name, seeds, init, keep, callback, handover
        )
        images = _overlay(decode(refiner or model, samples), req)
    return GenerationResult(images, seeds, req, samples, interrupted)


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


@dataclass
class Calls:
    """The number of denoiser calls so far in a sampling run (A1111's `CFGDenoiser.step`)."""

    n: int = 0


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
    denoiser = Denoiser(_unet_fn(model), DiscreteSchedule.for_model(model.config), model.config.prediction)
    built: dict[tuple[int, bool], dict[str, Tensor]] = {}

    def inputs(cond: Conditioning, negative: bool) -> dict[str, Tensor]:
        key = (id(cond), negative)
        if key not in built:
            built[key] = {**cond.model_inputs(model.family, b, h * f, w * f, negative), **guidance.extra}
        return built[key]

    def guided(x: Tensor, sigma: Tensor, **extra: Tensor) -> Tensor:
        conds = [(inputs(c, False), weight) for c, weight in _at(guidance.cond, calls.n)]
        (uncond, _), *more = _at(guidance.uncond, calls.n)
        if more:
            raise ValueError("a negative prompt has no AND parts")
        return guide(denoiser, x, sigma, conds, inputs(uncond, True), guidance.scale, extra)

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
    sampler: str,
    seeds: list[int],
    init: Tensor | None = None,
    keep: Tensor | None = None,
    callback: Callback | None = None,
    handover: Handover | None = None,
) -> Tensor:
    """Run `sampler` on noisy latents x (B, C, h, w) from σ = sigmas[0] down to sigmas[-1].

    Image i draws its sampler noise from a generator seeded with seeds[i]; where `keep` is 1 the
    latents stay at `init` (latent-blending inpainting); `handover` switches models part-way.
    """
    calls = Calls()
    guided = guided_denoiser(model, guidance, x, calls)
    if handover is not None:
        schedule = DiscreteSchedule.for_model(model.config)
        guided = _handing_over(guided, handover, schedule, len(sigmas) - 1, calls)
    if keep is not None:
        guided = _blend_denoised(guided, init, keep)
    guided = _counted(guided, calls)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    total = len(sigmas) - 1

    def on_step(i: int, sigma: Tensor, xi: Tensor, denoised: Tensor) -> None:
        if callback is not None:
            callback(i + 1, total, denoised)

    samples = get_sampler(sampler)(guided, x, sigmas, callback=on_step, generator=generators)
    return samples if keep is None else init * keep + samples * (1 - keep)


def _unet_fn(model: StableDiffusion) -> Callable[..., Tensor]:
    """The U-Net as `model(x_in, t, context=..., y=..., c_concat=...)`; c_concat feeds inpainting U-Nets."""

    def unet(
        x: Tensor, t: Tensor, context: Tensor, c_concat: Tensor | None = None, y: Tensor | None = None
    ) -> Tensor:
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x)], dim=1)
        return model.unet(x, t, context, y)

    return unet


def _image_conditioning(
    model: StableDiffusion, req: GenerationRequest, batch: int
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """Init latents, the latent 'keep' mask for latent blending, and c_concat for 9-channel U-Nets."""
    assert req.init_image is not None
    image = to_tensor(resize_image(req.init_image, req.width, req.height, req.resize_mode))
    gen = torch.Generator("cpu").manual_seed(req.seed)
    init = _latents_of(model, image, gen).expand(batch, -1, -1, -1)
    mask = _request_mask(req)
    if model.family.inpaint:
        hard = torch.ones_like(image[:, :1]) if mask is None else mask.round()
        return init, None, _inpaint_conditioning(model, image, hard, batch)
    if mask is None:
        return init, None, {}
    latent_mask = F.interpolate(mask, size=init.shape[-2:], mode="bilinear", align_corners=False).to(init)
    return init, 1 - latent_mask, {}


def _request_mask(req: GenerationRequest) -> Tensor | None:
    """The request's repaint mask (1, 1, H, W) in [0, 1], blurred and inverted as asked."""
    if req.mask is None:
        return None
    return prepare_mask(req.mask, req.width, req.height, req.mask_blur, req.inpainting_mask_invert)


def _inpaint_conditioning(
    model: StableDiffusion, image: Tensor, hard: Tensor, batch: int
) -> dict[str, Tensor]:
    """c_concat of a 9-channel inpainting U-Net: the repaint mask at latent size and the latents of the
    image with the repainted part blanked (A1111, diffusers); txt2img passes a blank image, all masked."""
    masked = _latents_of(model, image * (1 - hard), None)
    c_mask = F.interpolate(hard, size=masked.shape[-2:], mode="nearest").to(masked)
    return {"c_concat": torch.cat([c_mask, masked], dim=1).expand(batch, -1, -1, -1)}


def _overlay(images: list[Image.Image], req: GenerationRequest) -> list[Image.Image]:
    """Paste the init image back outside the (blurred) mask, as A1111 does after inpainting."""
    mask = _request_mask(req)
    if mask is None or req.init_image is None:
        return images
    init = to_tensor(resize_image(req.init_image, req.width, req.height, req.resize_mode))
    return [to_pil(init * (1 - mask) + to_tensor(im) * mask)[0] for im in images]


def _counted(denoiser: DenoiserFn, calls: Calls) -> DenoiserFn:
    """Count the calls of a denoiser (the index prompt schedules and the refiner switch read)."""

    def counted(x: Tensor, sigma: Tensor, **kw: Tensor) -> Tensor:
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
