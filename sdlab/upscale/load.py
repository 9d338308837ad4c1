"""Upscaler files -> networks: sdlab's own for ESRGAN/RRDBNet, Real-ESRGAN compact and SwinIR, detected
from keys and shapes; spandrel (the optional `sdlab[upscale]` extra) for any other architecture.

Files are read by `sdlab.checkpoints.io` (safetensors, or pickles through `torch.load(weights_only=True)`),
so nothing in an upscaler file is ever executed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from sdlab.checkpoints.io import CheckpointError, read_state_dict
from sdlab.upscale import compact, rrdb, swinir
from sdlab.upscale.base import StateDict, Upscaler


@dataclass(frozen=True)
class Architecture:
    """One family sdlab implements: how it is recognised, renamed to its module's keys, configured and
    built."""

    name: str
    matches: Callable[[StateDict], bool]
    to_keys: Callable[[StateDict], StateDict]  # -> the module's key layout
    build: Callable[[StateDict], Upscaler]  # from the module-layout state dict (shapes only)


ARCHITECTURES = (
    Architecture("ESRGAN", rrdb.is_rrdb, rrdb.to_new_layout, lambda sd: rrdb.RRDBNet(rrdb.detect_rrdb(sd))),
    Architecture(
        "SwinIR", swinir.is_swinir, lambda sd: sd, lambda sd: swinir.SwinIR(swinir.detect_swinir(sd))
    ),
    Architecture(
        "RealESRGAN Compact",
        compact.is_compact,
        lambda sd: sd,
        lambda sd: compact.SRVGGNetCompact(compact.detect_compact(sd)),
    ),
)


def load_upscaler(path: Path) -> Upscaler:
    """The upscaler network stored in `path`, in float32 on the CPU, in eval mode."""
    path = Path(path)
    sd = _strip_module_prefix(read_state_dict(path))
    arch = next((a for a in ARCHITECTURES if a.matches(sd)), None)
    try:
        model = _build(arch, sd) if arch is not None else _spandrel(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if model.in_channels != 3:
        raise CheckpointError(
            f"{path}: a {model.in_channels}-channel {model.architecture} model; sdlab upscales RGB"
        )
    return model.float().eval().requires_grad_(False)


def _build(arch: Architecture, sd: StateDict) -> Upscaler:
    sd = arch.to_keys(sd)
    model = arch.build(sd)
    sd = swinir.drop_derived(sd) if isinstance(model, swinir.SwinIR) else sd
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # tensors of the detected names but other shapes
        raise CheckpointError(f"looks like {arch.name} but {str(e).splitlines()[-1].strip()}") from e
    if missing or unexpected:
        raise CheckpointError(
            f"looks like {arch.name} but its keys do not fit the detected configuration (missing: "
            f"{', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )
    return model


def _strip_module_prefix(sd: StateDict) -> StateDict:
    """Drop the `module.` prefix DataParallel training leaves on every key."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


class SpandrelUpscaler(Upscaler):
    """A network spandrel recognised (any architecture sdlab does not implement itself)."""

    def __init__(self, descriptor: object) -> None:
        super().__init__()
        self.net = descriptor.model
        self.descriptor = descriptor
        self.architecture = descriptor.architecture.name
        self.scale = descriptor.scale
        self.multiple = descriptor.size_requirements.multiple_of
        self.in_channels = descriptor.input_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.descriptor(x)  # spandrel pads to the sizes the network needs and crops back


def _spandrel(sd: StateDict) -> Upscaler:
    """Hand a state dict sdlab does not recognise to spandrel, when it is installed and imports."""
    keys = ", ".join(list(sd)[:4])
    try:
        import spandrel
    except Exception as e:  # ImportError, or torchvision's operators failing to register
        raise CheckpointError(
            f"not an upscaler sdlab implements (ESRGAN, Real-ESRGAN compact, SwinIR; keys start {keys}), "
            f"and the spandrel backend for other architectures is unavailable ({type(e).__name__}: {e}); "
            "install sdlab[upscale]"
        ) from e
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(sd)
    except Exception as e:  # spandrel's UnsupportedModelError and shape errors alike
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise CheckpointError(
            f"neither sdlab nor spandrel recognises this model ({reason}; keys start {keys})"
        ) from e
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise CheckpointError(f"a {descriptor.architecture.name} model is not a single-image upscaler")
    return SpandrelUpscaler(descriptor)
