"""ControlNet in the pipeline: what a request asks for (`ControlSpec`), the ControlNet files, the control
image prepared once, and the residuals the U-Net adds on each model call.

Semantics follow AUTOMATIC1111's sd-webui-controlnet (`scripts/hook.py`): a unit is active while the
step fraction `sampling_step / total_steps` lies in [guidance_start, guidance_end], where sampling_step
is the index of the last finished sampler step (A1111's `state.sampling_step`, 0 before the first).
Control modes: "balanced" adds `weight` x residuals to both classifier-free-guidance halves (diffusers'
`guess_mode=False`); "prompt" ("My prompt is more important") scales residual i by
weight·0.825^(12−i) (soft injection); "control" ("ControlNet is more important") does the same on the
conditional half only. Several units add their residuals.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdlab.checkpoints import keymaps
from sdlab.checkpoints.detect import detect_controlnet
from sdlab.checkpoints.io import WEIGHT_SUFFIXES, CheckpointError, read_state_dict
from sdlab.checkpoints.load import build_module, folder_weights
from sdlab.conditioning import Conditioning
from sdlab.config import UNetConfig
from sdlab.images import RESIZE_MODES, resize_image
from sdlab.models.controlnet import ControlNetModel
from sdlab.models.ops import compute_dtype, device_of
from sdlab.models.t2i_adapter import (
    T2IAdapterModel,
    aligned,
    detect_adapter,
    diffusers_to_original,
    feature_slots,
    is_adapter,
    place_features,
)
from sdlab.models.unet import UNetModel
from sdlab.offload import follow, home_device
from sdlab.preprocess import preprocess
from sdlab.resample import common_upscale

StateDict = dict[str, Tensor]
CONTROL_MODES = ("balanced", "prompt", "control")
# sd-webui-controlnet's names (and its API's integers 0, 1, 2) for the modes above
A1111_CONTROL_MODES = {
    "Balanced": "balanced",
    "My prompt is more important": "prompt",
    "ControlNet is more important": "control",
}
SOFT_INJECTION = 0.825  # residual i of 13 scaled by 0.825^(12 - i) in the "prompt" and "control" modes
ADAPTER_SOFT_INJECTION = (0.25, 0.62, 0.825, 1.0)  # the extension's scales of a T2I-Adapter's 4 features
SINGLE_FILE_PREFIX = "control_model."
CONTROLNET_FOLDERS = ("ControlNet", "controlnet")  # A1111's models/ControlNet, ComfyUI's models/controlnet


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet unit of a request: the model (a path, or a name in the ControlNet folders), the
    control image, and how it is applied."""

    model: str
    image: Image.Image | None = field(default=None, compare=False)
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "balanced"
    resize_mode: str = "resize"  # sdlab.images.RESIZE_MODES (A1111's resize modes; "resize" = diffusers)
    preprocessor: str = "none"  # a name of sdlab.preprocess.preprocessor_names()
    mask: Image.Image | None = field(default=None, compare=False)  # the `inpaint` preprocessor's
    threshold_a: float | None = None  # the preprocessor's first and second settings (A1111's sliders)
    threshold_b: float | None = None

    def validate(self, index: int) -> None:
        """Raise ValueError naming the unit and its first bad field."""
        what = f"controls[{index}]"
        if self.image is None:
            raise ValueError(f"{what}: no control image")
        if not np.isfinite(self.weight) or not 0.0 <= self.weight <= 2.0:
            raise ValueError(f"{what}.weight must be in [0, 2], got {self.weight}")
        if not 0.0 <= self.guidance_start <= self.guidance_end <= 1.0:
            raise ValueError(
                f"{what}: need 0 <= guidance_start <= guidance_end <= 1, "
                f"got {self.guidance_start}, {self.guidance_end}"
            )
        if self.control_mode not in CONTROL_MODES:
            raise ValueError(f"{what}.control_mode must be one of {', '.join(CONTROL_MODES)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"{what}.resize_mode must be one of {', '.join(RESIZE_MODES)}")


def control_mode(value: str | int) -> str:
    """sdlab's mode name from itself, A1111's display name or A1111's API integer (0, 1, 2)."""
    if isinstance(value, int) and 0 <= value < len(CONTROL_MODES):
        return CONTROL_MODES[value]
    if value in CONTROL_MODES:
        return str(value)
    if value in A1111_CONTROL_MODES:
        return A1111_CONTROL_MODES[str(value)]
    raise ValueError(f"unknown control mode {value!r}; expected one of {', '.join(A1111_CONTROL_MODES)}")


# ---------------------------------------------------------------------------------------------
# files


def controlnet_dirs(extra: Sequence[str | Path] = ()) -> list[Path]:
    """Folders ControlNet names are looked up in: the given ones, then ControlNet/ and controlnet/ under
    $SDLAB_MODELS_DIR and ./models."""
    roots = [Path(p) for p in os.environ.get("SDLAB_MODELS_DIR", "").split(os.pathsep) if p]
    return [Path(p) for p in extra] + [
        r / sub for r in [*roots, Path("models")] for sub in CONTROLNET_FOLDERS
    ]


def find_controlnet(name: str, folders: Sequence[Path]) -> Path:
    """A ControlNet file or diffusers folder: a path, or a name (with or without suffix) in `folders`."""
    path = Path(name)
    if path.exists():
        return path
    for folder in folders:
        for candidate in (folder / name, *(folder / f"{name}{s}" for s in WEIGHT_SUFFIXES)):
            if candidate.exists():
                return candidate
    searched = ", ".join(str(f) for f in folders)
    raise CheckpointError(f"{name}: no such ControlNet file or folder (searched {searched})")


def read_controlnet(source: str | Path, base_unet: StateDict | None = None) -> StateDict:
    """A ControlNet's tensors in the cldm layout: single files with `control_model.` keys (whole
    checkpoints holding one too) or bare ones, diffusers ControlNetModel files and folders. A
    "difference" ControlNet (a `difference` key; ComfyUI's DiffControlNetLoader) stores its weights minus
    the U-Net's, so it needs `base_unet` (the U-Net's state dict) to add back."""
    return _controlnet_layout(_read_control_file(Path(source)), Path(source), base_unet)


def _read_control_file(source: Path) -> StateDict:
    return folder_weights(source, "diffusion_pytorch_model") if source.is_dir() else read_state_dict(source)


def _controlnet_layout(sd: StateDict, source: Path, base_unet: StateDict | None) -> StateDict:
    if "lora_controlnet" in sd:
        raise CheckpointError(f"{source}: Control-LoRA files are not supported (only full ControlNets)")
    if "style_embedding" in sd:
        raise CheckpointError(f"{source}: a T2I style adapter (needs CLIP vision features) is not supported")
    difference = sd.pop("difference", None) is not None
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        sd = keymaps.controlnet_diffusers_to_ldm(sd)
    elif any(k.startswith(SINGLE_FILE_PREFIX) for k in sd):
        sd = {
            k.removeprefix(SINGLE_FILE_PREFIX): v for k, v in sd.items() if k.startswith(SINGLE_FILE_PREFIX)
        }
    if "input_hint_block.0.weight" not in sd:
        raise CheckpointError(
            f"{source}: not a ControlNet or T2I-Adapter (no input_hint_block.0.weight, control_model.*, "
            "controlnet_cond_embedding.*, conv_in or body.* tensors)"
        )
    if difference:
        if base_unet is None:
            raise CheckpointError(f"{source}: a difference ControlNet needs the model it was made from")
        sd = {k: v + base_unet[k].to(v) if k in base_unet else v for k, v in sd.items()}
    return sd


def load_controlnet(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    base_unet: StateDict | None = None,
) -> ControlNetModel | T2IAdapterModel:
    """A ControlNet or T2I-Adapter module from a file or diffusers folder (either layout), its
    configuration detected from the keys and shapes."""
    source = Path(source)
    sd = _read_control_file(source)
    if is_adapter(sd):
        return load_adapter(sd, source, dtype, device)
    sd = _controlnet_layout(sd, source, base_unet)
    cfg = detect_controlnet(sd, str(source))
    return build_module(ControlNetModel, cfg, sd, f"{source} (ControlNet)", dtype, device)  # type: ignore[return-value]


def load_adapter(
    sd: StateDict, source: Path, dtype: torch.dtype, device: torch.device | str
) -> T2IAdapterModel:
    """A T2I-Adapter from its tensors, original (`conv_in`, `body.N...`) or diffusers (`adapter.body...`)."""
    if "adapter.body.0.resnets.0.block1.weight" in sd:
        sd = diffusers_to_original(sd)
    if any(".skep." in k or ".down_opt.op." in k for k in sd):
        raise CheckpointError(f"{source}: a T2I-Adapter with skip or strided-conv blocks is not supported")
    cfg = detect_adapter(sd)
    return build_module(T2IAdapterModel, cfg, sd, f"{source} (T2I-Adapter)", dtype, device)  # type: ignore[return-value]


def load_controls(
    specs: Sequence[ControlSpec], loaded: Mapping[str, ControlNetModel | T2IAdapterModel], unet: UNetModel
) -> dict[str, ControlNetModel | T2IAdapterModel]:
    """The ControlNet of each unit: taken from `loaded` by its `model` name, else read from its file (a
    path or a name in `controlnet_dirs()`) at the U-Net's dtype and device (the CPU when it is offloaded);
    each checked against `unet` and offloaded as it is (`sdlab.offload.follow`)."""
    nets = dict(loaded)
    dtype, device = compute_dtype(unet), home_device(unet)
    for i, spec in enumerate(specs):
        if spec.model not in nets:
            path = find_controlnet(spec.model, controlnet_dirs())
            base = unet.state_dict()
            nets[spec.model] = load_controlnet(path, dtype=dtype, device=device, base_unet=base)
        _check_fits(nets[spec.model], unet.cfg, f"controls[{i}] ({spec.model})")
        follow(nets[spec.model], unet)
    return nets


def _check_fits(net: ControlNetModel | T2IAdapterModel, unet: UNetConfig, what: str) -> None:
    """A ControlNet or adapter made for another model family gives residuals of the wrong shapes: name
    the mismatch (an adapter's features are tried on 64x64 latents)."""
    if isinstance(net, T2IAdapterModel):
        try:
            feature_slots(unet, net.cfg.feature_shapes(64, 64), 64, 64)
        except ValueError as e:
            raise ValueError(f"{what}: a T2I-Adapter for another model: {e}") from None
        return
    control = net.cfg.unet
    for name in ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels"):
        theirs, ours = getattr(control, name), getattr(unet, name)
        if theirs != ours:
            raise ValueError(f"{what}: a ControlNet for a U-Net with {name} {theirs}, this model has {ours}")


# ---------------------------------------------------------------------------------------------
# applying


@dataclass
class Control:
    """A unit ready to sample with: its network, the control image (1, C, H, W) and how it applies."""

    net: ControlNetModel | T2IAdapterModel
    hint: Tensor
    weight: float
    start: float
    end: float
    mode: str
    features: list[Tensor] | None = None  # an adapter's output: it depends on the image only, so made once

    def active(self, fraction: float) -> bool:
        return self.start <= fraction <= self.end

    def scales(self, count: int) -> list[float]:
        """Per-residual weights: flat when balanced, else A1111's soft injection weight·0.825^(12−i)
        (SDXL's 10 residuals take the first 10 of those 13, as the extension does); a T2I-Adapter's four
        features weight·(0.25, 0.62, 0.825, 1)."""
        if self.mode == "balanced":
            return [self.weight] * count
        if isinstance(self.net, T2IAdapterModel):
            return [self.weight * s for s in ADAPTER_SOFT_INJECTION[-count:]]
        return [self.weight * SOFT_INJECTION ** float(12 - i) for i in range(count)]


def hint_tensor(image: Image.Image) -> Tensor:
    """An RGB control image -> (1, 3, H, W) in [0, 1]. An RGBA image from the `inpaint` preprocessor
    carries the repaint mask in alpha: masked pixels become −1 (the ControlNet inpaint protocol)."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if image.mode != "RGBA":
        return arr.contiguous()
    rgb, mask = arr[:, :3], (arr[:, 3:] > 0.5).float()
    return rgb * (1 - mask) - mask


def _resized(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """`resize_image` for RGB, and for RGBA (an inpaint control) with the alpha resized alike."""
    rgb = resize_image(image.convert("RGB"), width, height, mode)
    if image.mode == "RGBA":
        rgb.putalpha(resize_image(image.getchannel("A").convert("RGB"), width, height, mode).getchannel(0))
    return rgb


def prepare_controls(
    specs: Sequence[ControlSpec],
    nets: Mapping[str, ControlNetModel | T2IAdapterModel],
    width: int,
    height: int,
    latent_factor: int = 8,
) -> list[Control]:
    """Each unit's control image preprocessed, resized to the image size (width x height, or for a model
    whose VAE does not downscale by the ControlNet's 8, the latent size times 8) and made a tensor, once;
    a one-channel adapter (sketch) gets the first channel, as sd-webui-controlnet gives it."""
    controls = []
    for i, spec in enumerate(specs):
        spec.validate(i)
        net = nets[spec.model]
        assert spec.image is not None
        image = preprocess(spec.preprocessor, spec.image, spec.mask, spec.threshold_a, spec.threshold_b)
        w, h = (n // latent_factor * net.cfg.downscale for n in (width, height))
        hint = hint_tensor(_resized(image, w, h, spec.resize_mode))
        if isinstance(net, T2IAdapterModel):
            hint = _adapter_hint(hint, net, i, spec.model)
        if hint.shape[1] != net.cfg.hint_channels:
            raise ValueError(
                f"controls[{i}]: {spec.model} takes {net.cfg.hint_channels}-channel control images, "
                f"the prepared image has {hint.shape[1]}"
            )
        controls.append(
            Control(net, hint, spec.weight, spec.guidance_start, spec.guidance_end, spec.control_mode)
        )
    return controls


def _adapter_hint(hint: Tensor, net: T2IAdapterModel, index: int, name: str) -> Tensor:
    """A T2I-Adapter's control image: its first channel for a one-channel adapter; its sides must be
    multiples of the adapter's pixel unshuffle (16 for SDXL's: the extension fails on others too)."""
    f = net.cfg.unshuffle
    if hint.shape[-1] % f or hint.shape[-2] % f:
        raise ValueError(
            f"controls[{index}]: the T2I-Adapter {name} needs a size whose width and height are multiples "
            f"of {f} px, got {hint.shape[-1]}x{hint.shape[-2]}"
        )
    return hint[:, :1] if net.cfg.hint_channels == 1 else hint


def control_residuals(
    controls: Sequence[Control],
    x: Tensor,
    t: Tensor,
    context: Tensor,
    y: Tensor | None,
    cond_mark: Tensor | None,
    fraction: float,
) -> list[Tensor] | None:
    """The summed, scaled residuals of the units active at step fraction `fraction` for U-Net inputs
    x (B, 4, h, w), t (B,), context, y; `cond_mark` (B,) is 1 on conditional rows, 0 on unconditional
    ones (the "control" mode leaves those without control). None when no unit is active."""
    total: list[Tensor] | None = None
    for c in controls:
        if isinstance(c.net, T2IAdapterModel) or not c.active(fraction):
            continue
        outs = _net_outputs(c.net, c.hint, x, t, context, y)
        mark = 1.0
        if c.mode == "control" and cond_mark is not None:
            mark = cond_mark.to(x.device, x.dtype)[:, None, None, None]
        total = _added(total, [o * (s * mark) for o, s in zip(outs, c.scales(len(outs)), strict=True)])
    return total


def adapter_features(
    controls: Sequence[Control], x: Tensor, cond_mark: Tensor | None, fraction: float, unet: UNetConfig
) -> list[Tensor | None] | None:
    """The U-Net's `adapter` argument: the summed, scaled features of the T2I-Adapter units active at
    step fraction `fraction`, each at its input block (`feature_slots`), for latents x; `cond_mark` as in
    `control_residuals`. None when no adapter is active. Odd sizes pool and align as sd-webui-controlnet
    does (floor, then nearest to the U-Net's shape)."""
    total: list[Tensor | None] | None = None
    for c in controls:
        if not isinstance(c.net, T2IAdapterModel) or not c.active(fraction):
            continue
        if c.features is None:
            with torch.no_grad():
                features = c.net(c.hint.to(device_of(c.net), compute_dtype(c.net)), pooling="a1111")
            c.features = aligned(c.net.cfg, features, *x.shape[-2:])
        mark = 1.0
        if c.mode == "control" and cond_mark is not None:
            mark = cond_mark.to(x.device, x.dtype)[:, None, None, None]
        scales = c.scales(len(c.features))
        feats = [f.to(x.device, x.dtype) * (s * mark) for f, s in zip(c.features, scales, strict=True)]
        total = _placed(total, unet, feats, x)
    return total


def _placed(
    total: list[Tensor | None] | None, unet: UNetConfig, features: list[Tensor], x: Tensor
) -> list[Tensor | None]:
    """`total` (the U-Net's `adapter` argument so far) plus an adapter's features placed for latents x."""
    try:
        placed = place_features(unet, features, *x.shape[-2:])
    except ValueError as e:
        raise ValueError(f"T2I-Adapter at {x.shape[-1] * 8}x{x.shape[-2] * 8} px: {e}") from None
    return placed if total is None else [_sum(a, b) for a, b in zip(total, placed, strict=True)]


def _sum(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _net_outputs(
    net: ControlNetModel, hint: Tensor, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None
) -> list[Tensor]:
    """A ControlNet's residuals for U-Net inputs x, t, context, y, run at its own dtype, returned at x's;
    a one-image hint serves the whole batch."""
    dtype = compute_dtype(net)
    hint = hint.to(x.device, dtype).expand(len(x), -1, -1, -1)
    outs = net(x.to(dtype), hint, t, context.to(dtype), None if y is None else y.to(dtype))
    return [o.to(x.dtype) for o in outs]


def _added(total: list[Tensor] | None, outs: list[Tensor]) -> list[Tensor]:
    return outs if total is None else [a + b for a, b in zip(total, outs, strict=True)]


# ---------------------------------------------------------------------------------------------
# ComfyUI's ControlNet (ControlNetApply / ControlNetApplyAdvanced)


@dataclass(frozen=True, eq=False)
class ComfyControl:
    """A ControlNet or T2I-Adapter attached to a ComfyUI CONDITIONING entry: the control image as given
    (1, 3, H, W) in [0, 1], its strength, and the part of the schedule it acts in as percents that become σ
    bounds with `percent_to_sigma` (ComfyUI's rule, not A1111's step fraction). An entry holds a chain of
    these, summed (ComfyUI's `set_previous_controlnet`); equal only to itself, so entries sharing a chain
    batch."""

    net: ControlNetModel | T2IAdapterModel
    image: Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    # a T2I-Adapter's features by (latent height, width, dtype, device), kept while the size holds (ComfyUI)
    features: dict[tuple, list[Tensor]] = field(default_factory=dict, repr=False)


def comfy_hint(image: Tensor, width: int, height: int) -> Tensor:
    """ComfyUI's `common_upscale(image, width, height, "nearest-exact", "center")`: the centre cut to the
    target's aspect ratio with ComfyUI's rounding, then resized by nearest-exact."""
    return common_upscale(image, "nearest-exact", width, height, "center")


def comfy_residuals(
    chain: Sequence[ComfyControl],
    bounds: Sequence[tuple[float, float]],
    x: Tensor,
    t: Tensor,
    context: Tensor,
    y: Tensor | None,
    sigma: float,
    unet: UNetModel,
    total: list[Tensor] | None = None,
) -> list[Tensor] | None:
    """The summed residuals of an entry's ControlNets active at σ (`bounds`: each one's (σ_start, σ_end);
    active while σ_end ≤ σ ≤ σ_start), each times its strength, for U-Net inputs x (B, C, h, w), t, context,
    y; the control image cut and resized to the latents' size x the ControlNet's downscale at each call
    (an area entry's latents give the area's size, as in ComfyUI); added to `total` (other residuals).
    None when there are none. A ControlNet is offloaded as `unet` is, else moved to x's device."""
    for c, (start, end) in zip(chain, bounds, strict=True):
        if isinstance(c.net, T2IAdapterModel) or sigma > start or sigma < end:
            continue
        if not follow(c.net, unet) and device_of(c.net) != x.device:
            c.net.to(x.device)
        f = c.net.cfg.downscale
        hint = comfy_hint(c.image.to(x.device, torch.float32), x.shape[-1] * f, x.shape[-2] * f)
        total = _added(total, [o * c.strength for o in _net_outputs(c.net, hint, x, t, context, y)])
    return total


def comfy_features(
    chain: Sequence[ComfyControl],
    bounds: Sequence[tuple[float, float]],
    x: Tensor,
    sigma: float,
    unet: UNetModel,
    total: list[Tensor | None] | None = None,
) -> list[Tensor | None] | None:
    """The U-Net's `adapter` argument from an entry's T2I-Adapters active at σ (as `comfy_residuals`),
    added to `total`: ComfyUI's `T2IAdapter.get_control`, each feature times the strength."""
    for c, (start, end) in zip(chain, bounds, strict=True):
        if not isinstance(c.net, T2IAdapterModel) or sigma > start or sigma < end:
            continue
        total = _placed(total, unet.cfg, [f * c.strength for f in _comfy_adapter_output(c, x, unet)], x)
    return total


def _comfy_adapter_output(c: ComfyControl, x: Tensor, unet: UNetModel) -> list[Tensor]:
    """A ComfyUI T2I-Adapter's features for latents x: the control image cut and resized (nearest-exact) to
    the latents' size x 8 rounded up to the adapter's pixel-unshuffle factor, made grey for a one-channel
    adapter (the channels' mean), run at x's dtype with ComfyUI's pooling; kept while the size holds. The
    adapter is offloaded as `unet` is (its weights cast per call), else moved to x's device and dtype."""
    key = (*x.shape[-2:], x.dtype, x.device)
    if key not in c.features:
        net = c.net
        assert isinstance(net, T2IAdapterModel)
        f = net.cfg.unshuffle
        width, height = (-(-n * 8 // f) * f for n in (x.shape[-1], x.shape[-2]))
        hint = comfy_hint(c.image.to(x.device, torch.float32), width, height)
        if net.cfg.hint_channels == 1:
            hint = hint.mean(dim=1, keepdim=True)
        if not follow(net, unet):
            net.to(x.device, x.dtype)
        with torch.no_grad():
            c.features.clear()
            c.features[key] = net(hint.to(x.dtype), pooling="comfyui")
    return c.features[key]


def controls_to_uncond(
    positive: Sequence[Conditioning], negative: Sequence[Conditioning]
) -> tuple[Conditioning, ...]:
    """The negative entries after ComfyUI's `apply_empty_x_to_equal_area` for ControlNetApply: unless a
    negative entry without an area has a ControlNet, the k-th positive entry without an area whose chain
    is marked `control_apply_to_uncond` gives it to the (k mod n)-th of the n negative ones without."""
    chains = [c.control for c in positive if c.control_apply_to_uncond and c.area is None and c.control]
    plain = [i for i, c in enumerate(negative) if c.area is None and not c.control]
    out = list(negative)
    if any(c.area is None and c.control for c in negative) or not plain:
        return tuple(out)
    for k, chain in enumerate(chains):
        i = plain[k % len(plain)]
        out[i] = replace(negative[i], control=chain)
    return tuple(out)
