"""IP-Adapter through the A1111 API as sd-webui-controlnet runs it: a ControlNet unit whose module is one of
the extension's CLIP modules (`ip-adapter_clip_sd15` / `ip-adapter_clip_h`, `ip-adapter_clip_sdxl` /
`ip-adapter_clip_g`, `ip-adapter_clip_sdxl_plus_vith`) and whose model is an IP-Adapter in models/ControlNet.
The module names the image encoder the extension loads from its clip_vision folder: `clip_h.pth` (ViT-H) or
`clip_g.pth` (ViT-bigG), found by stem in models/clip_vision. Weight and guidance start/end act as the
extension's (start/end a share of the steps); the image is squashed to the encoder's size by OpenCV's
INTER_AREA (`sdlab.ip_adapter`, convention "a1111")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from fastapi import HTTPException
from PIL import Image

from sdlab.images import RESIZE_MODES
from sdlab.ip_adapter import IPAdapterSpec
from sdlab.server.controlnet_api import (
    CONTROL_MODE_NAMES,
    HIDDEN,
    RESIZE_NAMES,
    RESOLUTION,
    Unit,
    _control_mode,
    _images,
    _number,
    _resize_mode,
    find_model,
)
from sdlab.server.library import Library, stem

# module name or UI label -> the extension's CLIP config (its file in clip_vision: CONFIG.pth)
IP_MODULES = {
    "ip-adapter_clip_sd15": "clip_h",
    "ip-adapter_clip_h": "clip_h",
    "ip-adapter_clip_sdxl": "clip_g",
    "ip-adapter_clip_g": "clip_g",
    "ip-adapter_clip_sdxl_plus_vith": "clip_h",
}


def ip_unit(
    library: Library,
    unit: dict[str, Any],
    index: int,
    init_image: Image.Image | None,
    decode: Callable[[str, str], Image.Image],
) -> Unit:
    """A unit of an IP-Adapter module as an IPAdapterSpec and the extension's infotext entry; HTTP 422
    naming the field for a missing image or encoder, a CLIP mask, or a bad value."""
    what = f"alwayson_scripts.controlnet.args[{index}]"
    module_name = unit["module"]
    title, path = find_model(library, str(unit.get("model", "None")))
    image, mask = _images(unit, what, decode)
    image = image or init_image
    if image is None:
        raise HTTPException(422, f"{what}.image: no image for the IP-Adapter (txt2img needs one)")
    if mask is not None:
        raise HTTPException(422, f"{what}.mask: IP-Adapter CLIP masks are not supported yet")
    encoder = IP_MODULES[module_name]
    found = [p for name, p in library.clip_visions().items() if stem(name) == encoder]
    if not found:
        folders = ", ".join(str(d) for d in library.dirs("clip_vision")) or "no clip_vision folder"
        raise HTTPException(422, f"{what}.module {module_name!r}: needs {encoder}.pth in {folders}")
    try:
        spec = IPAdapterSpec(
            str(path),
            image,
            _number(unit, "weight", 1.0, index),
            str(found[0]),
            _number(unit, "guidance_start", 0.0, index),
            _number(unit, "guidance_end", 1.0, index),
            "a1111",
        )
        spec.validate(index)
    except ValueError as e:
        raise HTTPException(422, f"{what}: {e}") from e
    resize = _resize_mode(unit.get("resize_mode", "Crop and Resize"))
    values = {
        "Module": module_name,
        "Model": title,
        "Weight": spec.weight,
        "Resize Mode": RESIZE_NAMES[RESIZE_MODES.index(resize)],
        "Processor Res": int(RESOLUTION.resolve(_number(unit, "processor_res", -1, index))),
        "Threshold A": HIDDEN.resolve(_number(unit, "threshold_a", -1, index)),
        "Threshold B": HIDDEN.resolve(_number(unit, "threshold_b", -1, index)),
        "Guidance Start": spec.start,
        "Guidance End": spec.end,
        "Pixel Perfect": bool(unit.get("pixel_perfect", False)),
        "Control Mode": CONTROL_MODE_NAMES[_control_mode(unit.get("control_mode", "Balanced"))],
    }
    return Unit(index, spec, ", ".join(f"{k}: {v}" for k, v in values.items()))  # type: ignore[arg-type]


def ip_record(spec: IPAdapterSpec) -> dict[str, Any]:
    """A spec's fields without its images (a job stores the image as a file)."""
    return {f.name: getattr(spec, f.name) for f in fields(spec) if f.name not in ("image", "negative_image")}
