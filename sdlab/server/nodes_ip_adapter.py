"""IP-Adapter in ComfyUI workflows: core ComfyUI's CLIPVisionLoader and the nodes of cubiq's
ComfyUI_IPAdapter_plus people's workflows contain (IPAdapterUnifiedLoader, IPAdapterModelLoader,
IPAdapterAdvanced, IPAdapter), declared with that pack's input names, choices and defaults. The adapter
rides on the MODEL (`Model.ip_adapters`) and acts while it samples, as the pack's attention patch does:
ComfyUI's `clip_preprocess` on the image, a black image's features as the "plus" negative side,
start_at/end_at as the σ range `percent_to_sigma` gives (`sdlab.ip_adapter`, convention "comfy"). Inputs
sdlab cannot honour (weight types other than linear, other embeds scalings, attention masks, image batches)
are refused naming the input. Registered in `sdlab.server.nodes.NODE_TYPES` on import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from sdlab.checkpoints.io import CheckpointError
from sdlab.ip_adapter import IPAdapterModel, IPAdapterSpec, load_clip_vision, load_ip_adapter
from sdlab.models.clip_vision import CLIPVisionModel
from sdlab.server.nodes import Env, Model, NodeError, _float, _list, node

# ComfyUI_IPAdapter_plus's WEIGHT_TYPES; sdlab runs "linear" (the same weight on every layer)
WEIGHT_TYPES = [
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
    "style transfer precise",
    "composition precise",
]
# IPAdapter's weight types ("standard": linear)
SIMPLE_WEIGHT_TYPES = ["standard", "prompt is more important", "style transfer"]
COMBINE_EMBEDS = ["concat", "add", "subtract", "average", "norm average"]  # only act on image batches
EMBEDS_SCALING = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]  # "V only": weight x output
# IPAdapterUnifiedLoader's presets -> the file-name patterns utils.get_ipadapter_file tries in order on SD1.x
# and on SDXL (none: the pack refuses the preset there); utils.get_clipvision_file's patterns by preset
_EXT = r"\.(safetensors|bin)$"
UNIFIED_PRESETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "LIGHT - SD1.5 only (low strength)": ((r"sd15.light.v11" + _EXT, r"sd15.light" + _EXT), ()),
    "STANDARD (medium strength)": ((r"ip.adapter.sd15" + _EXT,), (r"ip.adapter.sdxl.vit.h" + _EXT,)),
    "VIT-G (medium strength)": ((r"sd15.vit.g" + _EXT,), (r"ip.adapter.sdxl" + _EXT,)),
    "PLUS (high strength)": ((r"ip.adapter.plus.sd15" + _EXT,), (r"plus.sdxl.vit.h" + _EXT,)),
    "PLUS FACE (portraits)": ((r"plus.face.sd15" + _EXT,), (r"plus.face.sdxl.vit.h" + _EXT,)),
    "FULL FACE - SD1.5 only (portraits stronger)": ((r"full.face.sd15" + _EXT,), ()),
}
CLIP_VISION_BIGG = r"(ViT.bigG.14.*39B.b160k|ipadapter.*sdxl|sdxl.*model)\.(bin|safetensors)"
CLIP_VISION_H = r"(ViT.H.14.*s32B.b79K|ipadapter.*sd15|sd1.?5.*model)\.(bin|safetensors)"
T = TypeVar("T")
_RANGE = {
    "start_at": _float(0.0, 0.0, 1.0, 0.001),
    "end_at": _float(1.0, 0.0, 1.0, 0.001),
}


@dataclass(frozen=True)
class IPAdapterInput:
    """IPADAPTER: the adapter, and the image encoder when a unified loader brought one (the pack's
    pipeline)."""

    adapter: IPAdapterModel
    clip_vision: CLIPVisionModel | None = None


def _loaded(load: Callable[[Path, torch.dtype, str], T], path: Path, what: str) -> T:
    """A model file loaded at float32 on the CPU; its CheckpointError as the NodeError of input `what`."""
    try:
        return load(path, torch.float32, "cpu")
    except CheckpointError as e:
        raise NodeError(f"{what}: {e}") from e


@node(
    "CLIPVisionLoader",
    "Load CLIP Vision",
    "loaders",
    ("CLIP_VISION",),
    inputs={"clip_name": (lambda env: list(env.library.clip_visions()),)},
)
def clip_vision_loader(env: Env, clip_name: str) -> tuple[CLIPVisionModel]:
    """A CLIP image encoder from models/clip_vision (transformers' layout, as ComfyUI's files)."""
    path = env.library.find(env.library.clip_visions(), clip_name, "CLIP vision model")
    return (_loaded(load_clip_vision, path, "clip_name"),)


@node(
    "IPAdapterModelLoader",
    "IPAdapter Model Loader",
    "ipadapter/loaders",
    ("IPADAPTER",),
    inputs={"ipadapter_file": (lambda env: list(env.library.ipadapters()),)},
)
def ipadapter_model_loader(env: Env, ipadapter_file: str) -> tuple[IPAdapterInput]:
    """An IP-Adapter from models/ipadapter (plain or "plus"; .safetensors or .bin)."""
    path = env.library.find(env.library.ipadapters(), ipadapter_file, "IP-Adapter")
    return (IPAdapterInput(_loaded(load_ip_adapter, path, "ipadapter_file")),)


def _first_match(names: dict[str, Path], patterns: tuple[str, ...]) -> Path | None:
    """The first of the sorted names (ComfyUI's file list) matching the first pattern any name matches."""
    for pattern in patterns:
        found = [n for n in sorted(names) if re.search(pattern, n, re.IGNORECASE)]
        if found:
            return names[found[0]]
    return None


@node(
    "IPAdapterUnifiedLoader",
    "IPAdapter Unified Loader",
    "ipadapter",
    ("MODEL", "IPADAPTER"),
    inputs={"model": ("MODEL",), "preset": (_list(list(UNIFIED_PRESETS)),)},
    optional={"ipadapter": ("IPADAPTER",)},
    output_names=("model", "ipadapter"),
)
def ipadapter_unified_loader(
    env: Env, model: Model, preset: str, ipadapter: IPAdapterInput | None = None
) -> tuple[Model, IPAdapterInput]:
    """The IP-Adapter and CLIP vision model of a preset, found by ComfyUI_IPAdapter_plus's file-name rules
    in models/ipadapter and models/clip_vision (SDXL's files for an SDXL model); the model unchanged. An
    `ipadapter` input only lets the pack reuse what an earlier loader loaded, so it changes nothing here."""
    clip_pattern = CLIP_VISION_BIGG if preset.startswith("VIT-G") else CLIP_VISION_H
    clip_path = _first_match(env.library.clip_visions(), (clip_pattern,))
    if clip_path is None:
        raise NodeError(
            f"preset {preset!r}: ClipVision model not found (no file in clip_vision matches {clip_pattern})"
        )
    sdxl = model.sd.family.comfy_sdxl
    sd15_patterns, sdxl_patterns = UNIFIED_PRESETS[preset]
    patterns = sdxl_patterns if sdxl else sd15_patterns
    if not patterns:
        raise NodeError(f"preset {preset!r}: not supported for {'SDXL' if sdxl else 'SD1.5'} models")
    path = _first_match(env.library.ipadapters(), patterns)
    if path is None:
        raise NodeError(
            f"preset {preset!r}: IPAdapter model not found (no file in ipadapter matches "
            f"{' or '.join(patterns)})"
        )
    adapter = _loaded(load_ip_adapter, path, "preset")
    return model, IPAdapterInput(adapter, _loaded(load_clip_vision, clip_path, "preset"))


def _pixels01(image: Tensor, field: str) -> Tensor:
    """IMAGE pixels (1, 3, H, W) in [-1, 1] as ComfyUI's IMAGE values in [0, 1]."""
    if image.shape[0] != 1:
        raise NodeError(f"{field}: a batch of {image.shape[0]} images is not supported (give one)")
    return (image.float() + 1) / 2


def _apply(
    model: Model,
    ipadapter: IPAdapterInput,
    image: Tensor,
    weight: float,
    start_at: float,
    end_at: float,
    clip_vision: CLIPVisionModel | None = None,
    image_negative: Tensor | None = None,
) -> tuple[Model]:
    """The model with one more image prompt, read while it samples."""
    encoder = clip_vision if clip_vision is not None else ipadapter.clip_vision
    if encoder is None:
        raise NodeError("clip_vision: missing CLIPVision model (connect a Load CLIP Vision node)")
    negative = None if image_negative is None else _pixels01(image_negative, "image_negative")
    spec = IPAdapterSpec(
        ipadapter.adapter, _pixels01(image, "image"), weight, encoder, start_at, end_at, "comfy", negative
    )
    try:
        spec.validate(len(model.ip_adapters))
    except ValueError as e:
        raise NodeError(str(e)) from e
    return (replace(model, ip_adapters=(*model.ip_adapters, spec)),)


def _refuse(**given: object) -> None:
    """NodeError naming the first optional input given that sdlab cannot honour."""
    for name, value in given.items():
        if value is not None:
            raise NodeError(f"{name}: not supported yet (sdlab applies the adapter to the whole image)")


@node(
    "IPAdapterAdvanced",
    "IPAdapter Advanced",
    "ipadapter",
    ("MODEL",),
    inputs={
        "model": ("MODEL",),
        "ipadapter": ("IPADAPTER",),
        "image": ("IMAGE",),
        "weight": _float(1.0, -1.0, 5.0, 0.05),
        "weight_type": (_list(WEIGHT_TYPES),),
        "combine_embeds": (_list(COMBINE_EMBEDS),),
        **_RANGE,
        "embeds_scaling": (_list(EMBEDS_SCALING),),
    },
    optional={"image_negative": ("IMAGE",), "attn_mask": ("MASK",), "clip_vision": ("CLIP_VISION",)},
)
def ipadapter_advanced(
    env: Env,
    model: Model,
    ipadapter: IPAdapterInput,
    image: Tensor,
    weight: float,
    weight_type: str,
    combine_embeds: str,
    start_at: float,
    end_at: float,
    embeds_scaling: str,
    image_negative: Tensor | None = None,
    attn_mask: Tensor | None = None,
    clip_vision: CLIPVisionModel | None = None,
) -> tuple[Model]:
    """The model with an image prompt: weight_type linear, embeds_scaling "V only" (combine_embeds only
    combines an image batch, which is refused); image_negative's features replace the negative side's."""
    if weight_type != "linear":
        raise NodeError(f"weight_type {weight_type!r}: not supported yet (sdlab has linear)")
    if embeds_scaling != "V only":
        raise NodeError(f"embeds_scaling {embeds_scaling!r}: not supported yet (sdlab has 'V only')")
    _refuse(attn_mask=attn_mask)
    return _apply(model, ipadapter, image, weight, start_at, end_at, clip_vision, image_negative)


@node(
    "IPAdapter",
    "IPAdapter",
    "ipadapter",
    ("MODEL",),
    inputs={
        "model": ("MODEL",),
        "ipadapter": ("IPADAPTER",),
        "image": ("IMAGE",),
        "weight": _float(1.0, -1.0, 3.0, 0.05),
        **_RANGE,
        "weight_type": (_list(SIMPLE_WEIGHT_TYPES),),
    },
    optional={"attn_mask": ("MASK",)},
)
def ipadapter_simple(
    env: Env,
    model: Model,
    ipadapter: IPAdapterInput,
    image: Tensor,
    weight: float,
    start_at: float,
    end_at: float,
    weight_type: str,
    attn_mask: Tensor | None = None,
) -> tuple[Model]:
    """The model with an image prompt, the image encoder from the unified loader's pipeline; weight_type
    standard (linear)."""
    if weight_type != "standard":
        raise NodeError(f"weight_type {weight_type!r}: not supported yet (sdlab has standard)")
    _refuse(attn_mask=attn_mask)
    if ipadapter.clip_vision is None:
        raise NodeError(
            "ipadapter: CLIPVision model not present in the pipeline (load the models with the "
            "IPAdapterUnifiedLoader node, or use IPAdapter Advanced with a clip_vision input)"
        )
    return _apply(model, ipadapter, image, weight, start_at, end_at)
