"""Offloading for small GPUs, as diffusers' `enable_model_cpu_offload` / `enable_sequential_cpu_offload`.

The weights live on the CPU. "model": a forward pre-hook brings a whole network (a text encoder, the U-Net,
the VAE) to the device when it is called and sends the one that ran before back, so the text encoders
leave the GPU once the prompt is encoded. "sequential": each layer's weights are copied to the device only
while it runs (the casting layers of `sdlab.models.ops` do it per call; layers holding weights outside them
get hooks), so only activations and one layer at a time occupy the GPU.

A network's `execution_device` says where its inputs go. A weight sent back is not copied: its CPU tensor is
kept on the parameter (`_offload_home`) while a device copy is in use.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from sdlab.models import ops

HOME = "_offload_home"


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The parameters and buffers held by `module` itself (not its children)."""
    yield from (t for t in module._parameters.values() if t is not None)
    yield from (t for t in module._buffers.values() if t is not None)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device, non_blocking=True)


def bring(module: nn.Module, device: torch.device, recurse: bool = True) -> None:
    """Put `module`'s weights on `device`, keeping the CPU tensors to go back to."""
    for m in module.modules() if recurse else (module,):
        for t in _tensors(m):
            home = getattr(t, HOME, None)
            if home is None:
                home = t.data
                setattr(t, HOME, home)
            t.data = _to(home, device)


def send_back(module: nn.Module, recurse: bool = True) -> None:
    """Put `module`'s weights back on their CPU tensors (no copy)."""
    for m in module.modules() if recurse else (module,):
        for t in _tensors(m):
            home = getattr(t, HOME, None)
            if home is not None:
                t.data = home


def _networks(model: object) -> list[tuple[nn.Module, list[nn.Module]]]:
    """Each network with the modules whose calls mean it runs (the VAE runs through its parts)."""
    vae = model.vae  # type: ignore[attr-defined]
    return [
        *((t, [t]) for t in model.text_encoders),  # type: ignore[attr-defined]
        (model.unet, [model.unet]),  # type: ignore[attr-defined]
        (vae, list(vae.modules())[1:]),
    ]


def _model_offload(model: object, device: torch.device) -> None:
    on_device: list[nn.Module] = []

    def hook_for(net: nn.Module):  # noqa: ANN202
        def pre_hook(*_: object) -> None:
            if on_device and on_device[0] is net:
                return
            if on_device:
                send_back(on_device.pop())
            bring(net, device)
            on_device.append(net)

        return pre_hook

    for net, triggers in _networks(model):
        for trigger in triggers:
            trigger.register_forward_pre_hook(hook_for(net))


def _sequential_offload(model: object, device: torch.device) -> None:
    for net, _ in _networks(model):
        for m in net.modules():
            if isinstance(m, ops.CASTING_LAYERS) or next(_tensors(m), None) is None:
                continue
            m.register_forward_pre_hook(lambda m, _: bring(m, device, recurse=False))
            m.register_forward_hook(lambda m, _, __: send_back(m, recurse=False))


def enable_offload(model: object, mode: str, device: torch.device) -> None:
    """Run `model`'s networks on `device` with their weights kept on the CPU ("model" or "sequential";
    "none" does nothing: the weights are on the device already)."""
    if mode == "none":
        return
    offloads = {"model": _model_offload, "sequential": _sequential_offload}
    if mode not in offloads:
        raise ValueError(f"--offload {mode!r}: expected none, {', '.join(offloads)}")
    for net, _ in _networks(model):
        net.execution_device = device  # type: ignore[assignment]
    offloads[mode](model, device)
