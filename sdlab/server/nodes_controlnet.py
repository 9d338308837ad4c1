"""ComfyUI's ControlNet nodes (ControlNetLoader, DiffControlNetLoader, ControlNetApply,
ControlNetApplyAdvanced), declared as ComfyUI's nodes.py declares them and applied by its rules: the
ControlNet rides on each CONDITIONING entry (`Conditioning.control`, chained and summed), the control
image is centre-cut and resized by nearest-exact to the latents' size at each call, its residuals times
the strength, active over the σ range `percent_to_sigma` gives (`sdlab.control.comfy_residuals`).
The loaders load T2I-Adapter files too, as ComfyUI's `load_controlnet` falls through to
`load_t2i_adapter`; those apply as its `T2IAdapter` does (`sdlab.control.comfy_features`: features times
the strength added after input blocks, control image cut to the latents' size x 8 rounded up to the
adapter's pixel unshuffle). Registered in `sdlab.server.nodes.NODE_TYPES` on import.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from sdlab.checkpoints.io import CheckpointError
from sdlab.conditioning import Conditioning
from sdlab.control import ComfyControl, load_controlnet
from sdlab.models.controlnet import ControlNetModel
from sdlab.models.t2i_adapter import T2IAdapterModel
from sdlab.models.vae import AutoencoderKL
from sdlab.regions import Conds, entries, single_or_list
from sdlab.server.nodes import Env, Model, NodeError, _float, node

_NAME = {"control_net_name": (lambda env: list(env.library.controlnets()),)}
_APPLY = {"control_net": ("CONTROL_NET",), "image": ("IMAGE",), "strength": _float(1.0, 0.0, 10.0)}
_RANGE = {"start_percent": _float(0.0, 0.0, 1.0, 0.001), "end_percent": _float(1.0, 0.0, 1.0, 0.001)}
Net = ControlNetModel | T2IAdapterModel


def _load(env: Env, name: str, model: Model | None = None) -> Net:
    path = env.library.find(env.library.controlnets(), name, "ControlNet")
    base = None if model is None else model.sd.unet.state_dict()
    try:
        return load_controlnet(path, base_unet=base)
    except CheckpointError as e:
        raise NodeError(str(e)) from e


@node("ControlNetLoader", "Load ControlNet Model", "loaders", ("CONTROL_NET",), inputs=_NAME)
def controlnet_loader(env: Env, control_net_name: str) -> tuple[Net]:
    """A ControlNet (single-file or diffusers layout) or T2I-Adapter from models/controlnet (or A1111's
    models/ControlNet)."""
    return (_load(env, control_net_name),)


@node(
    "DiffControlNetLoader",
    "Load ControlNet Model (diff)",
    "loaders",
    ("CONTROL_NET",),
    inputs={"model": ("MODEL",), **_NAME},
)
def diff_controlnet_loader(env: Env, model: Model, control_net_name: str) -> tuple[Net]:
    """A ControlNet, a "difference" one made whole with the model's U-Net weights (or a T2I-Adapter)."""
    return (_load(env, control_net_name, model),)


def _control(net: Net, image: Tensor, strength: float, start: float, end: float) -> ComfyControl:
    """IMAGE pixels (1, 3, H, W) in [-1, 1] as ComfyUI's control image in [0, 1]."""
    if image.shape[0] != 1:
        raise NodeError(f"image: a batch of {image.shape[0]} control images is not supported (give one)")
    return ComfyControl(net, (image.float() + 1) / 2, strength, start, end)


@node(
    "ControlNetApply",
    "Apply ControlNet",
    "conditioning/controlnet",
    ("CONDITIONING",),
    inputs={"conditioning": ("CONDITIONING",), **_APPLY},
)
def controlnet_apply(
    env: Env, conditioning: Conds, control_net: Net, image: Tensor, strength: float
) -> tuple[Conds]:
    """A ControlNet on every entry, over the whole schedule; the negative side gets it too when sampling."""
    if strength == 0:
        return (conditioning,)
    control = _control(control_net, image, strength, 0.0, 1.0)
    out = [
        replace(c, control=(*c.control, control), control_apply_to_uncond=True) for c in entries(conditioning)
    ]
    return (single_or_list(out),)


@node(
    "ControlNetApplyAdvanced",
    "Apply ControlNet (Advanced)",
    "conditioning/controlnet",
    ("CONDITIONING", "CONDITIONING"),
    inputs={"positive": ("CONDITIONING",), "negative": ("CONDITIONING",), **_APPLY, **_RANGE},
    optional={"vae": ("VAE",)},
    output_names=("positive", "negative"),
)
def controlnet_apply_advanced(
    env: Env,
    positive: Conds,
    negative: Conds,
    control_net: Net,
    image: Tensor,
    strength: float,
    start_percent: float,
    end_percent: float,
    vae: AutoencoderKL | None = None,
) -> tuple[Conds, Conds]:
    """A ControlNet on the entries of both sides from start_percent to end_percent of the schedule, after
    the ones they carry (entries with the same chain share it). `vae`: used by ComfyUI only for ControlNets
    that take latents (not SD1.x/SD2.x/SDXL ones), so unused here."""
    if strength == 0:
        return positive, negative
    added: dict[tuple[ComfyControl, ...], ComfyControl] = {}

    def chained(c: Conditioning) -> Conditioning:
        if c.control not in added:
            added[c.control] = _control(control_net, image, strength, start_percent, end_percent)
        return replace(c, control=(*c.control, added[c.control]), control_apply_to_uncond=False)

    pos = [chained(c) for c in entries(positive)]
    return single_or_list(pos), single_or_list([chained(c) for c in entries(negative)])
