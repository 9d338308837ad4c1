"""AUTOMATIC1111's generation-parameters text ("infotext"), written into PNGs and read back.

<prompt>
Negative prompt: <negative>
Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sdlab.checkpoints.io import file_sha256
from sdlab.diffusion.samplers import display_name, resolve_sampler
from sdlab.diffusion.schedule import schedule_display_name
from sdlab.embeddings import embedding_hash
from sdlab.hires import HiresFix
from sdlab.networks import lora_hash

if TYPE_CHECKING:
    from sdlab.checkpoints.load import StableDiffusion
    from sdlab.pipeline import GenerationRequest

_PARAM = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NOT_A_KEY = re.compile(r"\s*(\w[\w \-/]*)?")  # what a failed _PARAM match ran through


def format_infotext(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    scheduler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_name: str | None = None,
    model_hash: str | None = None,
    extra: dict[str, object] | None = None,
) -> str:
    """The A1111 `parameters` text for one image."""
    fields: dict[str, object] = {
        "Steps": steps,
        "Sampler": display_name(sampler),
        "Schedule type": schedule_display_name(scheduler),
        "CFG scale": _number(cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        **(extra or {}),
    }
    params = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(params)
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, str]:
    """Prompt, negative prompt and the key/value parameters of an infotext."""
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(lines) > 1 or _PARAM.match(lines[-1] or "") else ""
    body = lines[:-1] if params_line else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for m in _params(params_line):
        value = m.group(2).strip()
        out[m.group(1).strip()] = value[1:-1].replace('\\"', '"') if value.startswith('"') else value
    return out


def _params(line: str) -> Iterator[re.Match[str]]:
    """`_PARAM.finditer(line)` in linear time. A match fails only where no `:` ends the key-like run it
    starts with, and fails alike at every position in that run: finditer retries each (seconds on a
    20 kB line), this goes on past it."""
    pos = 0
    while pos < len(line):
        if m := _PARAM.match(line, pos):
            yield m
            pos = m.end()
        else:
            run = _NOT_A_KEY.match(line, pos)  # its end may start a match (a tab): one past it only
            pos = run.end() + (run.group(1) is None)  # if it ran through whitespace alone


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _quote(v: object) -> str:
    s = str(v)
    return '"' + s.replace('"', '\\"') + '"' if any(c in s for c in ',:"\n') else s


def _hires_fields(hires: HiresFix, sampler: str, scheduler: str) -> dict[str, object]:
    """A1111's hires-fix fields, in its order (`StableDiffusionProcessingTxt2Img.init`), of a resolved
    `HiresFix` (empty prompts: the first pass's) after a first pass with `sampler` and `scheduler`."""
    other_schedule = hires.scheduler != scheduler
    fields: dict[str, object] = {
        "Hires sampler": display_name(hires.sampler) if hires.sampler != sampler else None,
        "Hires prompt": hires.prompt or None,
        "Hires negative prompt": hires.negative_prompt or None,
        "Hires schedule type": schedule_display_name(hires.scheduler) if other_schedule else None,
    }
    if hires.resize == (0, 0):
        fields["Hires upscale"] = _number(hires.scale)
    else:
        fields["Hires resize"] = f"{hires.resize[0]}x{hires.resize[1]}"
    fields["Hires steps"] = hires.steps or None
    fields["Hires upscaler"] = hires.upscaler
    return {k: v for k, v in fields.items() if v is not None}


_HIRES_MARKS = ("Hires upscale", "Hires resize", "Hires upscaler")


def hires_from_infotext(params: dict[str, str]) -> HiresFix | None:
    """The hires fix of parsed infotext parameters (`parse_infotext`), None without one; A1111's rule:
    a denoising strength with a hires upscale, resize or upscaler. Names are resolved to ComfyUI's, the
    first pass's where the infotext has none (A1111's `get_hr_sampler_and_scheduler`)."""
    if "Denoising strength" not in params or not any(k in params for k in _HIRES_MARKS):
        return None
    sampler = params.get("Hires sampler", params.get("Sampler", "Euler a"))
    schedule = params.get("Hires schedule type", params.get("Schedule type", "Automatic"))
    hires_sampler, hires_schedule = resolve_sampler(sampler, schedule)
    width, _, height = params.get("Hires resize", "0x0").partition("x")
    return HiresFix(
        scale=float(params.get("Hires upscale", 2.0)),
        resize=(int(width), int(height)),
        steps=int(params.get("Hires steps", 0)),
        denoise=float(params["Denoising strength"]),
        upscaler=params.get("Hires upscaler", "Latent"),
        prompt=params.get("Hires prompt", ""),
        negative_prompt=params.get("Hires negative prompt", ""),
        sampler=hires_sampler,
        scheduler=hires_schedule or "normal",
    )


def model_hash(path: str | Path) -> str | None:
    """A1111's short model hash: the first 10 hex digits of the file's SHA-256 (None for folders)."""
    path = Path(path)
    return file_sha256(path)[:10] if path.is_file() else None


def _inpainting_infotext(req: GenerationRequest) -> dict[str, object]:
    """A1111's inpainting entries: the mask mode, the blur (when there is one, and the same along x and y),
    "only masked" with its padding, the masked content other than "original"."""
    extra: dict[str, object] = {}
    if req.inpainting_mask_invert:
        extra["Mask mode"] = "Inpaint not masked"
    blur_x, blur_y = req.blur_xy
    if (blur_x or blur_y) and blur_x == blur_y:
        extra["Mask blur"] = blur_x
    if req.inpaint_full_res:
        extra |= {"Inpaint area": "Only masked", "Masked area padding": req.inpaint_full_res_padding}
    if req.inpainting_fill != "original":
        extra["Masked content"] = req.inpainting_fill
    return extra


def request_infotext(
    req: GenerationRequest,
    seed: int,
    model: StableDiffusion,
    refiner: StableDiffusion | None = None,
    scripts: dict[str, str] | None = None,
) -> str:
    """The infotext of image `seed` of a finished request (sampler and schedule already resolved);
    `scripts`: entries an extension writes (sd-webui-controlnet's `ControlNet 0`), after the hires fields."""
    extra: dict[str, object] = {}
    if refiner is not None:
        digest = model_hash(refiner.source)
        extra["Refiner"] = refiner.name + (f" [{digest}]" if digest else "")
        extra["Refiner switch at"] = _number(req.refiner_switch_at)
        if req.refiner_switch_by_steps:
            extra["Refiner switch by sampling steps"] = True
    if req.init_image is not None:
        extra["Denoising strength"] = _number(req.strength)
    if req.hires is not None:
        extra["Denoising strength"] = _number(req.hires.denoise)
    if req.mask is not None:
        extra |= _inpainting_infotext(req)
    if req.clip_skip > 1:
        extra["Clip skip"] = req.clip_skip
    if req.hires is not None:
        extra |= _hires_fields(req.hires, req.sampler, req.scheduler)
    extra |= scripts or {}
    if req.loras:  # A1111's extra network hashes: "name: short hash, ..."
        hashes = (f"{Path(f).stem.replace(':', '').replace(',', '')}: {lora_hash(f)}" for f, _ in req.loras)
        extra["Lora hashes"] = ", ".join(hashes)
    if req.embeddings:  # A1111's `TI hashes`: "name: first 12 hex digits of the file's SHA-256, ..."
        ti = (f"{n.replace(':', '').replace(',', '')}: {embedding_hash(f)}" for n, f in req.embeddings)
        extra["TI hashes"] = ", ".join(ti)
    if req.fast is not None and not req.fast.exact:  # says the image is an approximation (sdlab.fast)
        extra["Fast"] = req.fast.label
    return format_infotext(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        steps=req.steps,
        sampler=req.sampler,
        scheduler=req.scheduler,
        cfg_scale=req.cfg_scale,
        seed=seed,
        width=req.width,
        height=req.height,
        model_name=model.name,
        model_hash=model_hash(model.source),
        extra=extra,
    )
