"""Offloading for small GPUs, as diffusers' `enable_model_cpu_offload` / `enable_sequential_cpu_offload`.

The weights live on the CPU. "model": a forward pre-hook brings a whole network (a text encoder, the U-Net,
the VAE) to the device when it is called and sends back the network that was there, whichever model it
belongs to (one network per device at a time: a refiner or a second cached model never stays beside it).
The text encoders are sent back as soon as a prompt is encoded (`sdlab.conditioning`). "sequential": each
layer's weights are copied to the device only while it runs (the casting layers of `sdlab.models.ops` do it
per call; layers holding weights outside them get hooks), so only activations and one layer at a time
occupy the GPU. The networks that condition the U-Net (ControlNets, T2I-Adapters, IP-Adapters' projections
and image encoders) `follow` it: offloaded the same way (under "model" they take turns with it on the
device); an IP-Adapter's key/value layers, which run inside the U-Net's cross-attentions, stay on the CPU and
are cast per call. At the end of a generation the network left on a device goes back
(`devices_emptied_after`).

A network's `execution_device` says where its inputs go. A weight sent back is not copied: its CPU tensor is
kept on the parameter (`_offload_home`) while a device copy is in use. Code that replaces weights (LoRA
merging and unmerging, `sdlab.lora`) calls `at_home` first, so it works on the CPU tensors and the next call
brings the new weights: no device tensor is ever a weight's home.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sdlab.models import ops
from sdlab.models.vae import AutoencoderKL

HOME = ops.OFFLOAD_HOME
_ON_DEVICE: dict[str, weakref.ref[nn.Module]] = {}  # device -> the network whose weights are there ("model")
_LOCK = threading.Lock()


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


def _slot(device: torch.device) -> str:
    """One name per physical device ("cuda" is the current CUDA device)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _run_on(net: nn.Module, device: torch.device) -> None:
    """Make `net` the network whose weights are on `device`, sending back the one there before."""
    key = _slot(device)
    with _LOCK:
        ref = _ON_DEVICE.get(key)
        there = None if ref is None else ref()
        if there is net:
            return
        if there is not None:
            send_back(there)
        bring(net, device)
        _ON_DEVICE[key] = weakref.ref(net)


def on_device(device: torch.device) -> nn.Module | None:
    """The network whose weights `--offload model` has on `device` now (None: no network's)."""
    with _LOCK:
        ref = _ON_DEVICE.get(_slot(device))
    return None if ref is None else ref()


def _send_back_where(chosen: Callable[[nn.Module], bool]) -> None:
    """Send back each network `--offload model` has on a device that `chosen` picks (and forget dead ones)."""
    with _LOCK:
        for key, ref in list(_ON_DEVICE.items()):
            net = ref()
            if net is None or chosen(net):
                if net is not None:
                    send_back(net)
                del _ON_DEVICE[key]


def at_home(modules: Iterable[nn.Module]) -> None:
    """Send back the network `--offload model` has on a device when it holds any of `modules` (networks
    or layers), so that their weights are the CPU tensors; a no-op for networks that are not there."""
    wanted = {id(m) for m in modules}
    _send_back_where(lambda net: any(id(m) in wanted for m in net.modules()))


@contextmanager
def devices_emptied_after() -> Iterator[None]:
    """At the end of the block (a generation, however it ends) send back the network `--offload model` left
    on each device, as diffusers' `maybe_free_model_hooks` does: the devices hold no weights between
    requests (the next network to run would have sent it back, but only then)."""
    try:
        yield
    finally:
        _send_back_where(lambda net: True)


def _model_offload(net: nn.Module, device: torch.device) -> None:
    # a VAE runs through its parts (encode/decode), the other networks through their forward
    triggers = list(net.modules())[1:] if isinstance(net, AutoencoderKL) else [net]
    for trigger in triggers:
        trigger.register_forward_pre_hook(lambda *_: _run_on(net, device))


def _sequential_offload(net: nn.Module, device: torch.device) -> None:
    for m in net.modules():
        if isinstance(m, ops.CASTING_LAYERS) or next(_tensors(m), None) is None:
            continue
        m.register_forward_pre_hook(lambda m, _: bring(m, device, recurse=False))
        m.register_forward_hook(lambda m, _, __: send_back(m, recurse=False))


OFFLOADS = {"model": _model_offload, "sequential": _sequential_offload}


def offload_network(net: nn.Module, mode: str, device: torch.device) -> None:
    """Run one network (loaded on the CPU) on `device` with its weights kept on the CPU ("model" or
    "sequential"; "none" does nothing: the weights are on the device already)."""
    if mode == "none":
        return
    if mode not in OFFLOADS:
        raise ValueError(f"--offload {mode!r}: expected none, {', '.join(OFFLOADS)}")
    net.execution_device = device  # type: ignore[assignment]
    net.offload_mode = mode  # type: ignore[assignment]
    OFFLOADS[mode](net, device)


def home_device(like: nn.Module) -> torch.device:
    """Where a network that runs beside `like` (see `follow`) is loaded: the CPU when `like` is offloaded,
    else `like`'s device."""
    return torch.device("cpu") if getattr(like, "offload_mode", None) else ops.device_of(like)


def follow(net: nn.Module, like: nn.Module) -> bool:
    """Offload `net`, a network that conditions `like` (a ControlNet, T2I-Adapter, IP-Adapter projection or
    CLIP image encoder beside the U-Net), as `like` is offloaded: same mode, same device, once (later calls
    check and return). Its weights stay on the CPU in their stored dtype, cast per call by the casting
    layers, so under "model" it takes turns on the device with `like`. Returns whether `like` is offloaded;
    when it is not, nothing is done and placing `net` is the caller's."""
    mode = getattr(like, "offload_mode", None)
    if mode is None:
        return False
    device = like.execution_device
    with _LOCK:
        if getattr(net, "offload_mode", None) is None:
            offload_network(net, mode, device)  # type: ignore[arg-type]
        elif (net.offload_mode, net.execution_device) != (mode, device):
            raise ValueError(
                f"{type(net).__name__} is offloaded ({net.offload_mode}, to {net.execution_device}); it "
                f"cannot also run beside a network offloaded ({mode}, to {device})"
            )
    return True


def weights_home(mode: str, device: torch.device) -> torch.device:
    """Where a network that runs on `device` is loaded: there, or the CPU when it is offloaded."""
    return device if mode == "none" else torch.device("cpu")


def enable_offload(model: object, mode: str, device: torch.device) -> None:
    """Run `model`'s networks (text encoders, U-Net, VAE; those it has: a standalone part has some) on
    `device` as `offload_network` does."""
    for net in (*model.text_encoders, model.unet, model.vae):  # type: ignore[attr-defined]
        if net is not None:
            offload_network(net, mode, device)
