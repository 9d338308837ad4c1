"""AUTOMATIC1111's hires fix (`StableDiffusionProcessingTxt2Img` in its `modules/processing.py`).

A first pass at the requested size; its latents upscaled, either in latent space (`Latent`, bilinear, and
the other `LATENT_UPSCALE_MODES`) or decoded, enlarged by a pixel upscaler and encoded again; cropped to
the aspect of `hr_resize_x`/`hr_resize_y` when both are given; then a second, img2img pass at the larger
size with its own steps, strength, prompts, sampler and schedule, from noise of the same seeds. This
module holds the record and the size and upscaling steps; `sdlab.pipeline.generate` runs the passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdlab.diffusion.samplers import resolve_sampler
from sdlab.upscale import upscale_image, upscaler_names

# A1111's `shared.latent_upscale_modes`: name -> (torch interpolation mode, antialias)
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


@dataclass(frozen=True)
class HiresFix:
    """A1111's `hr_*` settings. Empty prompts, sampler and schedule mean the first pass's."""

    scale: float = 2.0  # hr_scale: the factor, used when `resize` is (0, 0)
    resize: tuple[int, int] = (0, 0)  # hr_resize_x, hr_resize_y; one of them 0: from the aspect ratio
    steps: int = 0  # hr_second_pass_steps; 0: as many as the first pass
    denoise: float = 0.7  # denoising_strength of the second pass
    upscaler: str = "Latent"  # a LATENT_UPSCALE_MODES name, else a pixel upscaler (sdlab.upscale)
    prompt: str = ""  # hr_prompt
    negative_prompt: str = ""  # hr_negative_prompt
    sampler: str = ""  # hr_sampler_name
    scheduler: str = ""  # hr_scheduler
    upscaler_dirs: tuple[str, ...] = field(default=(), compare=False)  # where upscaler models are found

    def __post_init__(self) -> None:  # lists from JSON job requests become tuples
        object.__setattr__(self, "resize", tuple(int(v) for v in self.resize))
        object.__setattr__(self, "upscaler_dirs", tuple(str(d) for d in self.upscaler_dirs))

    def resolved(self, sampler: str, scheduler: str, prompt: str, negative_prompt: str) -> HiresFix:
        """Sampler and schedule as ComfyUI names (the first pass's where empty); prompts that are the first
        pass's left empty (A1111 writes neither in the infotext)."""
        name, schedule = resolve_sampler(self.sampler or sampler, self.scheduler or scheduler)
        return replace(
            self,
            sampler=name,
            scheduler=schedule or scheduler,
            prompt="" if self.prompt == prompt else self.prompt,
            negative_prompt="" if self.negative_prompt == negative_prompt else self.negative_prompt,
        )

    @property
    def latent(self) -> bool:
        """Upscaled in latent space (else decoded, upscaled in pixels and encoded again)."""
        return self.upscaler in LATENT_UPSCALE_MODES

    def validate(self, width: int, height: int, factor: int) -> tuple[int, int]:
        """Raise ValueError naming the first bad setting; the final (width, height)."""
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"hires scale must be a positive number, got {self.scale}")
        if not math.isfinite(self.denoise) or not 0.0 <= self.denoise <= 1.0:
            raise ValueError(f"hires denoising strength must be in [0, 1], got {self.denoise}")
        if len(self.resize) != 2 or min(self.resize) < 0:
            raise ValueError(f"hires resize must be two sizes >= 0 (0: from the aspect), got {self.resize}")
        if not 0 <= self.steps <= 1000:
            raise ValueError(f"hires steps must be between 0 (the first pass's) and 1000, got {self.steps}")
        final = target(width, height, self, factor).final_size(factor)
        if min(final) < factor:
            raise ValueError(f"the hires fix gives an empty image ({final[0]}x{final[1]})")
        if not self.latent:
            names = upscaler_names([Path(d) for d in self.upscaler_dirs])
            if self.upscaler not in names:
                known = ", ".join([*LATENT_UPSCALE_MODES, *names])
                raise ValueError(f"hires upscaler {self.upscaler!r} not found; available: {known}")
        return final


@dataclass(frozen=True)
class Target:
    """What the first pass is upscaled to (A1111's hr_upscale_to_x/y), and the latent columns and rows
    then cropped away (truncate_x/y), half at each side, to reach hr_resize_x/y's aspect ratio."""

    width: int
    height: int
    crop_x: int = 0
    crop_y: int = 0

    def final_size(self, factor: int) -> tuple[int, int]:
        """(width, height) of the final image: the upscaled latents, cropped, decoded."""
        return (self.width // factor - self.crop_x) * factor, (self.height // factor - self.crop_y) * factor


def target(width: int, height: int, hires: HiresFix, factor: int) -> Target:
    """A1111's `calculate_target_resolution`: the scale, or the resize size with the first pass's aspect
    ratio kept (one side 0: from the other; both given: cover them, then crop), `factor` its opt_f."""
    rx, ry = hires.resize
    if rx == 0 and ry == 0:
        return Target(int(width * hires.scale), int(height * hires.scale))
    if ry == 0:
        return Target(rx, rx * height // width)
    if rx == 0:
        return Target(ry * width // height, ry)
    up = Target(rx, rx * height // width) if width / height < rx / ry else Target(ry * width // height, ry)
    return replace(up, crop_x=(up.width - rx) // factor, crop_y=(up.height - ry) // factor)


def upscale_latents(latents: Tensor, mode: str, height: int, width: int) -> Tensor:
    """Latents (B, C, h, w) -> (B, C, height, width) by a LATENT_UPSCALE_MODES name, as A1111 interpolates."""
    interpolation, antialias = LATENT_UPSCALE_MODES[mode]
    return F.interpolate(latents, size=(height, width), mode=interpolation, antialias=antialias)


def crop_latents(latents: Tensor, t: Target) -> Tensor:
    """Crop `t.crop_x` columns and `t.crop_y` rows, the odd one from the end (A1111's truncation)."""
    h, w = latents.shape[-2:]
    return latents[..., t.crop_y // 2 : h - (t.crop_y + 1) // 2, t.crop_x // 2 : w - (t.crop_x + 1) // 2]


def upscale_to(image: Image.Image, name: str, width: int, height: int, dirs: Sequence[str]) -> Image.Image:
    """A1111's `images.resize_image(0, image, width, height, upscaler_name=name)`: the named upscaler when
    it enlarges ("None" never does), then Lanczos to the exact size."""
    scale = max(width / image.width, height / image.height)
    if name != "None" and scale > 1.0:
        image = upscale_image(image, name, scale, [Path(d) for d in dirs])
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)
