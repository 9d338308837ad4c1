"""AUTOMATIC1111's sd-webui-controlnet through the A1111 API: the units of
`alwayson_scripts.controlnet.args` as `ControlSpec`s, and the extension's `/controlnet/*` routes.

Field names, defaults, module names, model titles ("name [hash]", looked up as the extension's
`find_closest_lora_model_name` does) and the infotext entry follow the extension
(`internal_controlnet/args.py`, `scripts/api.py`, `scripts/global_state.py`). The control map is made
as the extension makes it (`sdlab.server.controlnet_maps`): the image scaled to `processor_res` (or the
pixel-perfect size) around a preprocessor with a resolution slider, then fitted to the output size by
`detectmap_proc` (binary edge maps re-binarised and thinned); the `inpaint` module's image and mask are
fitted together as the extension fits them (in float32, the mask following the colours), the colours
then rounded to 8 bits (a job stores its images as PNG). Unit images are read as the extension reads
them (HWC3: transparency composited on white; a mask's first channel).
A unit whose model is a T2I-Adapter runs as one (`sdlab.control`).
The extension also appends the detected maps to the returned images; sdlab returns only the generated
images."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sdlab.control import A1111_CONTROL_MODES, CONTROL_MODES, ControlSpec
from sdlab.images import DEFAULT_LIMITS, RESIZE_MODES, ImageLimits
from sdlab.ip_adapter import IPAdapterSpec
from sdlab.preprocess import NEEDS_WEIGHTS, preprocess
from sdlab.server.controlnet_maps import (
    at_resolution,
    detectmap_proc,
    hwc3,
    inpaint_input,
    shortest_edge,
    visualize_inpaint_mask,
)
from sdlab.server.library import Library
from sdlab.server.preview import png_base64
from sdlab.server.state import MAX_JOB_IMAGES, Server

API_VERSION = 3  # external_code.get_api_version()
UNIT_COUNT = 3  # the extension's default control_net_unit_count ("Multi-ControlNet: max models")
RESIZE_NAMES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # ResizeMode values, as RESIZE_MODES
RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Envelope (Outer Fit)": "Resize and Fill",
}
CONTROL_MODE_NAMES = {mode: name for name, mode in A1111_CONTROL_MODES.items()}


@dataclass(frozen=True)
class Slider:
    """One of a preprocessor's sliders (the extension's PreprocessorParameter)."""

    name: str
    value: float
    min: float
    max: float
    step: float = 1.0

    def resolve(self, value: float) -> float:
        """The extension's bound check: a value outside the slider (such as -1) means the default."""
        return value if self.min <= value <= self.max else self.value


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)
HIDDEN = Slider("EMPTY_LABEL", 0.5, 0.0, 1.0, 0.01)  # the bound check of a module without that slider


@dataclass(frozen=True)
class Module:
    """A preprocessor as the extension lists it: sdlab's function, the UI label, its sliders and how it
    scales its input to processor_res first (`scaling`: "pad", the extension's `resize_image_with_pad`;
    "cut", the same cut back before it runs; "edge", the shorter side to the resolution by area; "": not)."""

    preprocessor: str
    label: str
    scaling: str = ""
    slider_1: Slider | None = None
    slider_2: Slider | None = None

    @property
    def resolution(self) -> bool:
        return bool(self.scaling)

    def run(self, image: Image.Image, res: int, a: float | None, b: float | None) -> np.ndarray:
        """The detected map (H, W, 3) of `image` at processor resolution `res`, as the extension makes it."""

        def detect(x: np.ndarray) -> np.ndarray:
            return np.asarray(preprocess(self.preprocessor, Image.fromarray(x), None, a, b).convert("RGB"))

        arr = hwc3(np.asarray(image.convert("RGB")))
        if self.scaling == "edge":
            return detect(shortest_edge(arr, res))
        if self.scaling:
            return at_resolution(arr, res, detect, crop_first=self.scaling == "cut")
        return detect(arr)

    def detail(self) -> dict[str, Any]:
        """The extension's `module_detail` entry."""
        sliders = [s for s in (RESOLUTION if self.resolution else None, self.slider_1, self.slider_2) if s]
        return {
            "model_free": False,  # the extension's legacy flag, false for these too
            "sliders": [
                {"name": s.name, "value": s.value, "min": s.min, "max": s.max, "step": s.step}
                for s in sliders
            ],
        }


MODULES: dict[str, Module] = {
    "none": Module("none", "none"),
    "canny": Module(
        "canny",
        "canny",
        "pad",
        Slider("Low Threshold", 100, 1, 255),
        Slider("High Threshold", 200, 1, 255),
    ),
    "invert": Module("invert", "invert (from white bg & black line)"),
    "lineart_standard": Module("lineart_standard", "lineart_standard (from white bg & black line)", "pad"),
    "scribble_xdog": Module("scribble_xdog", "scribble_xdog", "pad", Slider("XDoG Threshold", 32, 1, 64)),
    "threshold": Module("threshold", "threshold", "pad", Slider("Binarization Threshold", 127, 0, 255)),
    "tile_resample": Module(
        "tile_resample", "tile_resample", "", Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01)
    ),
    "blur_gaussian": Module("blur_gaussian", "blur_gaussian", "cut", Slider("Sigma", 9.0, 0.01, 64.0, 0.01)),
    "inpaint": Module("inpaint", "inpaint_global_harmonious"),
    "color": Module("color_grid", "t2ia_color_grid", "edge"),  # for T2I-Adapter color models
}
BY_LABEL = {m.label: name for name, m in MODULES.items()}
# unit fields sdlab reads; the others must keep the extension's default (or are harmless)
HARMLESS_UNIT_FIELDS = {"low_vram", "save_detected_map", "is_ui", "input_mode", "output_dir", "loopback"}
DEFAULT_UNIT_FIELDS: dict[str, Any] = {
    "inpaint_crop_input_image": True,
    "batch_images": None,
    "advanced_weighting": None,
    "effective_region_mask": None,
    "ipadapter_input": None,
    "batch_mask_dir": None,
    "animatediff_batch": False,
    "batch_modifiers": [],
    "batch_image_files": [],
    "batch_keyframe_idx": None,
    "pulid_mode": "Fidelity",
    "union_control_type": "Unknown",
}


def legacy_hash(path: Path) -> str:
    """A1111's `sd_models.model_hash`: 8 hex digits of the SHA-256 of 64 KiB at offset 1 MiB (the
    extension's model titles)."""
    with path.open("rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def model_titles(library: Library) -> dict[str, Path]:
    """The extension's model list, "name [hash]" -> file (one per lower-cased file stem, first wins)."""
    titles: dict[str, Path] = {}
    seen: set[str] = set()
    for path in library.controlnets().values():
        stem = path.stem
        if stem != "None" and stem.lower() not in seen:
            seen.add(stem.lower())
            titles[f"{stem} [{legacy_hash(path)}]"] = path
    return titles


def find_model(library: Library, name: str) -> tuple[str, Path]:
    """(title, file) of a unit's `model` as the extension resolves it: the title, the file stem in any
    case, else the shortest stem containing it."""
    titles = model_titles(library)
    if name in titles:
        return name, titles[name]
    search = name.lower()
    stems = {path.stem.lower(): title for title, path in titles.items()}
    matches = sorted((s for s in stems if search in s), key=len) if search not in stems else [search]
    if not name or name == "None" or not matches:
        raise HTTPException(
            422, f"controlnet model {name!r} not found; available: {', '.join(titles) or 'none'}"
        )
    title = stems[matches[0]]
    return title, titles[title]


def module_of(name: str) -> Module:
    """A module by its name or UI label; 422 naming a weight-needing or unknown one."""
    key = BY_LABEL.get(name, name)
    if key in MODULES:
        return MODULES[key]
    if key in NEEDS_WEIGHTS:
        raise HTTPException(422, f"controlnet module {name!r}: {NEEDS_WEIGHTS[key]}")
    if key == "inpaint_only":
        raise HTTPException(
            422,
            f"controlnet module {name!r}: it blends the VAE-encoded control image into every step's "
            "prediction and the decoded image, which sdlab does not do yet; inpaint_global_harmonious runs",
        )
    if key.startswith("ip-adapter"):
        from sdlab.server.ip_adapter_api import IP_PREPROCESSORS  # it builds on this module

        raise HTTPException(
            422,
            f"controlnet module {name!r}: an IP-Adapter preprocessor; sdlab runs "
            f"{', '.join(IP_PREPROCESSORS)} in units and /controlnet/detect does not return their features",
        )
    raise HTTPException(422, f"controlnet module {name!r} is not supported; sdlab has {', '.join(MODULES)}")


def _resize_mode(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return RESIZE_MODES[value] if value < len(RESIZE_MODES) else "resize"  # 3 and above: Just Resize
    name = RESIZE_ALIASES.get(value, value)
    if name not in RESIZE_NAMES:
        raise HTTPException(
            422, f"controlnet resize_mode {value!r}: expected one of {', '.join(RESIZE_NAMES)}"
        )
    return RESIZE_MODES[RESIZE_NAMES.index(name)]


def _control_mode(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(CONTROL_MODES):
        return CONTROL_MODES[value]
    if value not in A1111_CONTROL_MODES:
        raise HTTPException(
            422, f"controlnet control_mode {value!r}: expected one of {', '.join(A1111_CONTROL_MODES)}"
        )
    return A1111_CONTROL_MODES[value]


def _number(unit: dict[str, Any], key: str, default: float, index: int) -> float:
    value = unit.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HTTPException(422, f"controlnet unit {index}: {key} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Unit:
    """A parsed unit: the spec and the extension's infotext value for it."""

    index: int  # in the request's args (the infotext's `ControlNet N`)
    spec: ControlSpec | IPAdapterSpec  # IP-Adapter units: sdlab.server.ip_adapter_api
    infotext: str


def parse_units(
    library: Library,
    scripts: dict[str, Any],
    size: tuple[int, int],
    init_image: Image.Image | None,
    limits: ImageLimits,
) -> list[Unit]:
    """The enabled units of a request's `alwayson_scripts` (only `controlnet` is known; its args are unit
    dicts), for an image of `size` (width, height); img2img units without an image use `init_image`."""
    from sdlab.server.a1111 import decode_image

    for key in scripts:
        if key.lower() != "controlnet":
            raise HTTPException(422, f"alwayson_scripts {key!r}: sdlab does not support this script yet")
    script = next(iter(scripts.values()), None)
    args = script.get("args", []) if isinstance(script, dict) else script or []
    if not isinstance(args, list) or not all(isinstance(u, dict) for u in args):
        raise HTTPException(422, "alwayson_scripts.controlnet.args must be a list of unit objects")

    def decode(data: str, what: str) -> Image.Image:
        return decode_image(data, what, limits, "RGBA")  # HWC3 made by _images, as the extension's

    units = []
    for i, unit in enumerate(args):
        if not unit.get("enabled", True):  # the API's units count as enabled unless they say otherwise
            continue
        units.append(_unit(library, unit, i, size, init_image, decode))
    return units


def _unit(library: Library, unit: dict[str, Any], i: int, size: tuple[int, int], init_image, decode) -> Unit:
    what = f"alwayson_scripts.controlnet.args[{i}]"
    for key, default in DEFAULT_UNIT_FIELDS.items():
        if key in unit and unit[key] != default and unit[key] not in (None, [], ""):
            raise HTTPException(
                422, f"{what}.{key} = {unit[key]!r}: sdlab does not support this unit field yet"
            )
    if unit.get("hr_option", "Both") not in ("Both", 0):
        raise HTTPException(422, f"{what}.hr_option: sdlab runs ControlNet without the hires fix only")
    module_name = unit.get("module", "none")
    from sdlab.server.ip_adapter_api import IP_MODULES, ip_unit  # it builds on this module

    if module_name in IP_MODULES:
        return ip_unit(library, unit, i, init_image, decode)
    module = module_of(module_name)
    title, path = find_model(library, str(unit.get("model", "None")))
    image, mask = _images(unit, what, decode)
    image = image or init_image
    if image is None:
        raise HTTPException(422, f"{what}.image: no control image (txt2img needs one)")
    if mask is not None and module.preprocessor != "inpaint":
        raise HTTPException(422, f"{what}.mask: only the inpaint module reads a mask")
    if module.preprocessor == "inpaint" and image is init_image:
        raise HTTPException(
            422,
            f"{what}.image: an inpaint unit needs its own image and mask; sdlab does not take them from "
            "img2img's init image and mask as the extension does",
        )
    resize = _resize_mode(unit.get("resize_mode", "Crop and Resize"))
    threshold_a = _number(unit, "threshold_a", -1, i)
    threshold_b = _number(unit, "threshold_b", -1, i)
    a, b = (module.slider_1 or HIDDEN).resolve(threshold_a), (module.slider_2 or HIDDEN).resolve(threshold_b)
    res = RESOLUTION.resolve(_number(unit, "processor_res", -1, i))
    if unit.get("pixel_perfect", False):
        res = pixel_perfect_resolution(image.size, size, resize)
    sliders = (a if module.slider_1 else None, b if module.slider_2 else None)
    try:
        if module.preprocessor == "inpaint":
            spec = inpaint_control(str(path), image, mask, resize, size)
        else:  # the extension's map at the output size, given as it is
            spec = ControlSpec(str(path), control_map(module, image, int(res), *sliders, resize, size, what))
        spec = replace(
            spec,
            weight=_number(unit, "weight", 1.0, i),
            guidance_start=_number(unit, "guidance_start", 0.0, i),
            guidance_end=_number(unit, "guidance_end", 1.0, i),
            control_mode=_control_mode(unit.get("control_mode", "Balanced")),
        )
        spec.validate(i)
    except ValueError as e:
        raise HTTPException(422, f"{what}: {e}") from e
    values = {
        "Module": module_name,
        "Model": title,
        "Weight": spec.weight,
        "Resize Mode": RESIZE_NAMES[RESIZE_MODES.index(resize)],
        "Processor Res": int(res),
        "Threshold A": a,
        "Threshold B": b,
        "Guidance Start": spec.guidance_start,
        "Guidance End": spec.guidance_end,
        "Pixel Perfect": bool(unit.get("pixel_perfect", False)),
        "Control Mode": CONTROL_MODE_NAMES[spec.control_mode],
    }
    return Unit(i, spec, ", ".join(f"{k}: {v}" for k, v in values.items()))


MAX_MAP_PIXELS = DEFAULT_LIMITS.max_pixels  # a preprocessor's input once scaled to processor_res


def control_map(
    module: Module,
    image: Image.Image,
    res: int,
    a: float | None,
    b: float | None,
    resize: str,
    size: tuple[int, int],
    what: str,
) -> Image.Image:
    """The extension's control map of a unit: `module` run at processor resolution `res`, fitted to `size`
    (width, height) by `detectmap_proc` with resize mode `resize`; 422 naming the field it cannot make."""
    detected = detected_map(module, image, res, a, b, what)
    return Image.fromarray(detectmap_proc(detected, resize, size[1], size[0]))


def inpaint_control(
    model: str, image: Image.Image, mask: Image.Image | None, resize: str, size: tuple[int, int]
) -> ControlSpec:
    """An inpaint unit's control as the extension feeds it: image and mask (none: nothing repainted) fitted
    to `size` (width, height) by `detectmap_proc` with resize mode `resize`, the colours rounded to 8 bits;
    ValueError when the mask's size is not the image's."""
    arr = inpaint_input(np.asarray(image), None if mask is None else np.asarray(mask))
    fitted = detectmap_proc(arr, resize, size[1], size[0], inpaint=True)
    rgb = Image.fromarray(np.round(fitted[:, :, :3]).clip(0, 255).astype(np.uint8))
    mask = Image.fromarray(fitted[:, :, 3].astype(np.uint8))
    return ControlSpec(model, rgb, preprocessor="inpaint", mask=mask)


def detected_map(
    module: Module, image: Image.Image, res: int, a: float | None, b: float | None, what: str
) -> np.ndarray:
    """`Module.run`, with 422s naming `what` for a resolution too large for the image or a failure."""
    w, h = image.size
    if module.resolution and w * h * (res / min(w, h)) ** 2 > MAX_MAP_PIXELS:
        raise HTTPException(
            422, f"{what}.processor_res = {res}: the scaled image would exceed {MAX_MAP_PIXELS:,} px"
        )
    try:
        return module.run(image, res, a, b)
    except ValueError as e:
        raise HTTPException(422, f"{what}: {e}") from e


def _images(unit: dict[str, Any], what: str, decode) -> tuple[Image.Image | None, Image.Image | None]:
    """The unit's image and mask: `image` (or the legacy `input_image`) as base64, {"image", "mask"} or
    [image, mask]; `mask` (or `mask_image`) as base64. Both read as the extension's `parse_image` reads them
    (HWC3: transparency composited on white); the mask is its first channel (white = repaint)."""
    image = unit.get("image", unit.get("input_image"))
    mask = unit.get("mask", unit.get("mask_image"))
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    elif isinstance(image, list) and len(image) == 2 and all(isinstance(x, str) for x in image):
        image, mask = image
    if image is not None and not isinstance(image, str):
        raise HTTPException(422, f"{what}.image: expected base64 text or {{'image': ..., 'mask': ...}}")
    return (_parsed(decode(image, f"{what}.image")) if image else None), (
        Image.fromarray(np.asarray(_parsed(decode(mask, f"{what}.mask")))[:, :, 0]) if mask else None
    )


def _parsed(image: Image.Image) -> Image.Image:
    """An image as the extension's `parse_image` makes it: HWC3, transparency composited on white."""
    return Image.fromarray(hwc3(np.asarray(image.convert("RGBA"))))


def pixel_perfect_resolution(image: tuple[int, int], target: tuple[int, int], resize: str) -> int:
    """The extension's pixel-perfect processor resolution for an image (w, h) and a target (w, h)."""
    k = (target[1] / image[1], target[0] / image[0])
    scale = min(k) if resize == "fill" else max(k)
    return round(scale * min(image))


def spec_record(spec: ControlSpec) -> dict[str, Any]:
    """A spec's fields without its images (a job stores those as files)."""
    return {f.name: getattr(spec, f.name) for f in fields(spec) if f.name not in ("image", "mask")}


class DetectRequest(BaseModel):
    """`/controlnet/detect`'s body, with the extension's defaults (`low_vram` changes nothing here); NaN
    and Inf refused, not taken as the default as the extension's range check would."""

    model_config = ConfigDict(allow_inf_nan=False)
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field([], max_length=MAX_JOB_IMAGES)
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = []
    low_vram: bool = False


def routes(server: Server) -> APIRouter:
    """The extension's `/controlnet/*` routes of one server."""
    api = APIRouter(prefix="/controlnet")

    @api.get("/version")
    def version() -> dict[str, int]:
        return {"version": API_VERSION}

    @api.get("/settings")
    def settings() -> dict[str, int]:
        return {"control_net_unit_count": UNIT_COUNT}

    @api.get("/model_list")
    def model_list(update: bool = True) -> dict[str, list[str]]:
        return {"model_list": list(model_titles(server.library))}

    @api.get("/module_list")
    def module_list(alias_names: bool = False) -> dict[str, Any]:
        from sdlab.server.ip_adapter_api import ip_module_list  # it builds on this module

        names = {(m.label if alias_names else name): m for name, m in MODULES.items()}
        detail = {n: m.detail() for n, m in names.items()} | ip_module_list(alias_names)
        return {"module_list": list(detail), "module_detail": detail}

    @api.post("/detect")
    def detect(body: DetectRequest) -> dict[str, Any]:
        from sdlab.server.a1111 import decode_image

        module, limits = module_of(body.controlnet_module), server.settings.image_limits
        inputs, masks = body.controlnet_input_images, body.controlnet_masks
        if not inputs:
            raise HTTPException(422, "No image selected")
        if module.preprocessor == "inpaint" and len(masks) != len(inputs):
            raise HTTPException(
                422, f"Preprocessor {body.controlnet_module} requires `controlnet_masks` param."
            )
        a = module.slider_1.resolve(body.controlnet_threshold_a) if module.slider_1 else None
        b = module.slider_2.resolve(body.controlnet_threshold_b) if module.slider_2 else None
        res = RESOLUTION.resolve(body.controlnet_processor_res)
        images = []
        for i, data in enumerate(inputs):
            image = _parsed(decode_image(data, f"controlnet_input_images[{i}]", limits, "RGBA"))
            if module.preprocessor != "inpaint":
                out = detected_map(module, image, int(res), a, b, f"controlnet_input_images[{i}]")
                images.append(png_base64(Image.fromarray(out)))
                continue
            mask = np.asarray(decode_image(masks[i], f"controlnet_masks[{i}]", limits, "RGBA"))[:, :, 0]
            try:
                rgba = inpaint_input(np.asarray(image), mask)
            except ValueError as e:
                raise HTTPException(422, f"controlnet_masks[{i}]: {e}") from e
            images.append(png_base64(Image.fromarray(visualize_inpaint_mask(rgba))))
        return {"info": "Success", "images": images}

    return api
