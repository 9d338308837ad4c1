"""ComfyUI's conditioning lists: areas, masks, strengths and timestep ranges, weighted as ComfyUI samples.

A ComfyUI CONDITIONING is a list of entries (ConditioningCombine joins lists). Each entry denoises the
part of the latents its area covers, weighted by its strength, its mask or a ramp at the area's inner
edges; per side, the weighted predictions are averaged (comfy/samplers.py `get_area_and_mult`,
`calc_cond_batch`). Before sampling, percentage areas and masks are resolved at the latent size, each
timestep range becomes a σ range (`percent_to_sigma`), and each area entry gets an entry of the same
area on the other side (`resolve_areas_and_cond_masks`, `create_cond_with_same_area_if_none`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from sdlab.conditioning import Conditioning
from sdlab.control import controls_to_uncond
from sdlab.diffusion.schedule import DiscreteSchedule

Area = tuple[int, int, int, int]  # (height, width, y, x) in latent pixels
Conds = Conditioning | tuple[Conditioning, ...]  # ComfyUI's CONDITIONING: one entry or a list of them
FUZZ = 8  # latent pixels of the ramp at an area's inner edges


def entries(cond: Conds) -> tuple[Conditioning, ...]:
    """A CONDITIONING value as its list of entries."""
    return cond if isinstance(cond, tuple) else (cond,)


def single_or_list(items: list[Conditioning] | tuple[Conditioning, ...]) -> Conds:
    """Entries as a CONDITIONING value: the record itself when there is one."""
    return items[0] if len(items) == 1 else tuple(items)


def guidance_sides(positive: Conds, negative: Conds) -> tuple[Conds, Conds]:
    """The (cond, uncond) a `Guidance` takes: plain records when each side is one entry conditioning the
    whole image throughout (the ordinary path), else both as lists (ComfyUI's weighting); ControlNetApply's
    ControlNets are first lent to the negative side (`controls_to_uncond`)."""
    pos, neg = entries(positive), controls_to_uncond(entries(positive), entries(negative))
    if len(pos) == len(neg) == 1 and not pos[0].regional and not neg[0].regional:
        return pos[0], neg[0]
    return pos, neg


def percent_to_sigma(schedule: DiscreteSchedule, percent: float) -> float:
    """σ at a fraction of the schedule (0: before the first step, 1: the end), as ComfyUI's discrete
    model sampling maps it (`DiscreteSchedule.percent_to_sigma`)."""
    return schedule.percent_to_sigma(percent)


@dataclass(frozen=True)
class Region:
    """An entry resolved for one sampling run: its area and mask at the latent size, its σ range."""

    cond: Conditioning
    area: Area | None = None
    mask: Tensor | None = None  # (N, h, w) at the latent size
    sigma_start: float | None = None  # active while σ ≤ sigma_start ...
    sigma_end: float | None = None  # ... and σ ≥ sigma_end


def resolve(
    positive: tuple[Conditioning, ...],
    negative: tuple[Conditioning, ...],
    h: int,
    w: int,
    schedule: DiscreteSchedule,
) -> tuple[list[Region], list[Region]]:
    """Both sides' entries resolved for latents h x w, each area given a counterpart on the other side."""
    pos = [_resolve(c, h, w, schedule) for c in positive]
    neg = [_resolve(c, h, w, schedule) for c in negative]
    for r in list(pos):
        _same_area_if_none(neg, r)
    for r in list(neg):
        _same_area_if_none(pos, r)
    return pos, neg


def _resolve(c: Conditioning, h: int, w: int, schedule: DiscreteSchedule) -> Region:
    area = c.area
    if area is not None and area[0] == "percentage":
        _, ah, aw, ay, ax = area
        area = (max(1, round(ah * h)), max(1, round(aw * w)), round(ay * h), round(ax * w))
    mask = None
    if c.mask is not None:
        mask = c.mask.float()
        mask = mask[None] if mask.ndim == 2 else mask.reshape(-1, *mask.shape[-2:])
        if mask.shape[-2:] != (h, w):
            mask = F.interpolate(mask[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        if c.set_area_to_bounds:
            area = _mask_bounds(mask)
    start = None if c.start_percent is None else percent_to_sigma(schedule, c.start_percent)
    end = None if c.end_percent is None else percent_to_sigma(schedule, c.end_percent)
    return Region(c, None if area is None else tuple(int(v) for v in area), mask, start, end)


def _mask_bounds(mask: Tensor) -> Area:
    """The bounding box of a mask's non-zero pixels over the batch, at least 8 x 8 ((8, 8, 0, 0) if empty)."""
    ys, xs = torch.where(mask.abs().amax(dim=0) != 0)
    if len(ys) == 0:
        return (8, 8, 0, 0)
    y0, x0 = int(ys.min()), int(xs.min())
    return (max(8, int(ys.max()) - y0 + 1), max(8, int(xs.max()) - x0 + 1), y0, x0)


def _inside(a: Area, outer: Area) -> bool:
    return (
        a[2] >= outer[2]
        and a[3] >= outer[3]
        and a[0] + a[2] <= outer[0] + outer[2]
        and a[1] + a[3] <= (outer[1] + outer[3])
    )


def _same_area_if_none(side: list[Region], r: Region) -> None:
    """ComfyUI's `create_cond_with_same_area_if_none`: an area entry with no entry of its area on the other
    side gets one there, with r's area, mask and range and the text of the smallest entry containing it."""
    if r.area is None:
        return
    smallest: Region | None = None
    for x in side:
        if x.area is not None:
            if _inside(r.area, x.area) and (
                smallest is None
                or smallest.area is None
                or math.prod(smallest.area[:2]) > math.prod(x.area[:2])
            ):
                smallest = x
        elif smallest is None:
            smallest = x
    if smallest is None or smallest.area == r.area:
        return
    text = smallest.cond
    cond = replace(
        r.cond, context=text.context, pooled=text.pooled, original_size=text.original_size, crop=text.crop
    )
    cond = replace(cond, target_size=text.target_size, aesthetic_score=text.aesthetic_score)
    side.append(replace(r, cond=cond))


def weight(r: Region, x: Tensor, sigma: float) -> tuple[Area, Tensor] | None:
    """ComfyUI's `get_area_and_mult`: the area r denoises in latents x (B, C, h, w) and its weight there
    (mask x mask_strength, or a ramp of up to 8 pixels at the area's inner edges, x strength); None when σ
    is outside r's range."""
    if r.sigma_start is not None and sigma > r.sigma_start:
        return None
    if r.sigma_end is not None and sigma < r.sigma_end:
        return None
    b, ch, h, w = x.shape
    area = (h, w, 0, 0)
    if r.area is not None:
        ah, aw, y, x0 = r.area
        area = (min(h - y, ah), min(w - x0, aw), y, x0)
    ah, aw, y, x0 = area
    if r.mask is not None:
        mask = r.mask[:b, y : y + ah, x0 : x0 + aw].to(x) * r.cond.mask_strength
        mult = mask[:, None].repeat(b // mask.shape[0], ch, 1, 1)
    else:
        mult = torch.ones((b, ch, ah, aw), dtype=x.dtype, device=x.device)
    mult = mult * r.cond.strength
    if r.mask is None and r.area is not None:
        for dim, (size, start, full) in enumerate(((ah, y, h), (aw, x0, w))):
            rr = min(FUZZ, mult.shape[2 + dim] // 4)
            for t in range(rr):
                ramp = (1.0 / rr) * (t + 1)
                if start != 0:
                    mult.narrow(2 + dim, t, 1).mul_(ramp)
                if size + start < full:
                    mult.narrow(2 + dim, size - 1 - t, 1).mul_(ramp)
    return area, mult


def weighted_prediction(
    denoise: Callable[[Tensor, Conditioning, Area], Tensor], regions: list[Region], x: Tensor, sigma: Tensor
) -> Tensor:
    """One side's prediction: Σ D_i·mult_i / (Σ mult_i + 1e-37) over its active entries (ComfyUI's
    `calc_cond_batch`); `denoise(x_area, cond, area)` runs the model on the area's latents."""
    out = torch.zeros_like(x)
    count = torch.full_like(x, 1e-37)
    for r in regions:
        weighted = weight(r, x, float(sigma.reshape(-1)[0]))
        if weighted is None:
            continue
        (ah, aw, y, x0), mult = weighted
        d = denoise(x[:, :, y : y + ah, x0 : x0 + aw], r.cond, (ah, aw, y, x0))
        out[:, :, y : y + ah, x0 : x0 + aw] += d * mult
        count[:, :, y : y + ah, x0 : x0 + aw] += mult
    return out / count


def crop_inputs(inputs: dict[str, Tensor], area: Area, h: int, w: int) -> dict[str, Tensor]:
    """Model inputs for an area: spatial ones (c_concat of inpainting U-Nets, at the latent size) cropped."""
    ah, aw, y, x0 = area
    if (ah, aw) == (h, w):
        return inputs
    return {
        k: v[..., y : y + ah, x0 : x0 + aw] if v.ndim == 4 and v.shape[-2:] == (h, w) else v
        for k, v in inputs.items()
    }
