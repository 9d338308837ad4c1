"""IP-Adapter through the A1111 API as sd-webui-controlnet runs it: a ControlNet unit whose module is one of
the extension's CLIP modules (`ip-adapter_clip_sd15` / `ip-adapter_clip_h`, `ip-adapter_clip_sdxl` /
`ip-adapter_clip_g`, `ip-adapter_clip_sdxl_plus_vith`, or `ip-adapter-auto`, which picks one by the model's
preset name) and whose model is an IP-Adapter in models/ControlNet; `/controlnet/module_list` lists them. The
module names the image encoder the extension loads from its clip_vision folder: `clip_h.pth` (ViT-H) or
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

# the extension's IP-Adapter preprocessors sdlab runs, in its module_list order: name -> (UI label, its CLIP
# config: the file clip_vision/CONFIG.pth); "ip-adapter-auto" picks one by the model's name (AUTO_MODELS)
IP_PREPROCESSORS = {
    "ip-adapter-auto": ("ip-adapter-auto", ""),
    "ip-adapter_clip_sd15": ("ip-adapter_clip_h", "clip_h"),
    "ip-adapter_clip_sdxl_plus_vith": ("ip-adapter_clip_sdxl_plus_vith", "clip_h"),
    "ip-adapter_clip_sdxl": ("ip-adapter_clip_g", "clip_g"),
}
IP_MODULES = {key: config for name, (label, config) in IP_PREPROCESSORS.items() for key in (name, label)}
# the extension's IPAdapterPreset models with a CLIP preprocessor (scripts/ipadapter/presets.py): file stem ->
# CLIP config; the FaceID and PuLID presets need insightface and are not here
AUTO_MODELS = {
    **dict.fromkeys(("ip-adapter_sd15_vit-G", "ip-adapter_sdxl"), "clip_g"),
    **dict.fromkeys(
        (
            "ip-adapter_sd15_light",
            "ip-adapter_sd15_light_v11",
            "ip-adapter_sd15",
            "ip-adapter-plus_sd15",
            "ip-adapter_sd15_plus",
            "ip-adapter_plus_composition_sd15",
            "ip-adapter-plus-face_sd15",
            "ip-adapter-full-face_sd15",
            "ip-adapter_sdxl_vit-h",
            "ip-adapter-plus_sdxl_vit-h",
            "ip-adapter_plus_composition_sdxl",
            "ip-adapter-plus-face_sdxl_vit-h",
        ),
        "clip_h",
    ),
}


def ip_module_list(alias_names: bool) -> dict[str, dict[str, Any]]:
    """The IP-Adapter preprocessors' `/controlnet/module_list` entries (name or UI label -> module_detail:
    no sliders, as the extension lists them)."""
    return {
        (label if alias_names else name): {"model_free": False, "sliders": []}
        for name, (label, _) in IP_PREPROCESSORS.items()
    }


def _clip_config(module_name: str, model: str, what: str) -> str:
    """The CLIP config a unit's module names; for "ip-adapter-auto", the preset of the model's name (the
    part before " [hash]"), as the extension's `IPAdapterPreset.match_model`."""
    if IP_MODULES[module_name]:
        return IP_MODULES[module_name]
    stem = model.split("[")[0].strip()
    if stem not in AUTO_MODELS:
        raise HTTPException(
            422,
            f"{what}.module 'ip-adapter-auto': {stem} is not an IP-Adapter preset name "
            "(pick the preprocessor: ip-adapter_clip_h or ip-adapter_clip_g)",
        )
    return AUTO_MODELS[stem]


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
    encoder = _clip_config(module_name, title, what)
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
