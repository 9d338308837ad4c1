"""IP-Adapter in ComfyUI workflows: core ComfyUI's CLIPVisionLoader and the nodes of cubiq's
ComfyUI_IPAdapter_plus people's workflows contain (IPAdapterModelLoader, IPAdapterAdvanced, IPAdapter),
declared with that pack's input names, choices and defaults. The adapter rides on the MODEL
(`Model.ip_adapters`) and acts while it samples, as the pack's attention patch does: ComfyUI's
`clip_preprocess` on the image, a black image's features as the "plus" negative side, start_at/end_at as
the σ range `percent_to_sigma` gives (`sdlab.ip_adapter`, convention "comfy"). Inputs sdlab cannot honour
(weight types other than linear, other embeds scalings, attention masks, image batches) are refused
naming the input. Registered in `sdlab.server.nodes.NODE_TYPES` on import.
"""

from __future__ import annotations

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
