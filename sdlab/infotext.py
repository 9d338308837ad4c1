"""AUTOMATIC1111's generation-parameters text ("infotext"), written into PNGs and read back.

<prompt>
Negative prompt: <negative>
Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from sdlab.checkpoints.io import file_sha256
from sdlab.diffusion.samplers import display_name
from sdlab.diffusion.schedule import schedule_display_name
from sdlab.embeddings import embedding_hash
from sdlab.networks import lora_hash

if TYPE_CHECKING:
    from sdlab.checkpoints.load import StableDiffusion
    from sdlab.pipeline import GenerationRequest

_PARAM = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


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
    for m in _PARAM.finditer(params_line):
        value = m.group(2).strip()
        out[m.group(1).strip()] = value[1:-1].replace('\\"', '"') if value.startswith('"') else value
    return out


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _quote(v: object) -> str:
    s = str(v)
    return '"' + s.replace('"', '\\"') + '"' if any(c in s for c in ',:"\n') else s


def model_hash(path: str | Path) -> str | None:
    """A1111's short model hash: the first 10 hex digits of the file's SHA-256 (None for folders)."""
    path = Path(path)
    return file_sha256(path)[:10] if path.is_file() else None


def request_infotext(
    req: GenerationRequest, seed: int, model: StableDiffusion, refiner: StableDiffusion | None = None
) -> str:
    """The infotext of image `seed` of a finished request (sampler and schedule already resolved)."""
    extra: dict[str, object] = {}
    if refiner is not None:
        digest = model_hash(refiner.source)
        extra["Refiner"] = refiner.name + (f" [{digest}]" if digest else "")
        extra["Refiner switch at"] = _number(req.refiner_switch_at)
        if req.refiner_switch_by_steps:
            extra["Refiner switch by sampling steps"] = True
    if req.init_image is not None:
        extra["Denoising strength"] = _number(req.strength)
    if req.mask is not None:
        extra["Mask blur"] = req.mask_blur
    if req.clip_skip > 1:
        extra["Clip skip"] = req.clip_skip
    if req.loras:  # A1111's extra network hashes: "name: short hash, ..."
        hashes = (f"{Path(f).stem.replace(':', '').replace(',', '')}: {lora_hash(f)}" for f, _ in req.loras)
        extra["Lora hashes"] = ", ".join(hashes)
    if req.embeddings:  # A1111's `TI hashes`: "name: first 12 hex digits of the file's SHA-256, ..."
        ti = (f"{n.replace(':', '').replace(',', '')}: {embedding_hash(f)}" for n, f in req.embeddings)
        extra["TI hashes"] = ", ".join(ti)
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
