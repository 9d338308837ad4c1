"""Layers that keep their weights in a storage dtype and device and compute in the input's (ComfyUI's
`comfy.ops.manual_cast`): fp16 weights stay fp16 in memory, or on the CPU, and are cast per layer as
each runs, so a model needs half the RAM in fp32 maths and the offload hooks need not copy it whole.

`adopt(module, dtype)` turns a built network's Linear/Conv2d/GroupNorm/LayerNorm/Embedding layers into
these subclasses in place (no new state: the state dict keys stay the checkpoint's) and records the
compute dtype; a layer whose weights already match its input casts nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.devices import drop_file_pages
from sdlab.models import winograd
from sdlab.models.blocks import GroupNorm32


def _cast(t: Tensor | None, like: Tensor, dtype: torch.dtype | None = None) -> Tensor | None:
    """`t` on `like`'s device in `dtype` (default `like`'s), copied only when it differs."""
    if t is None:
        return None
    return t.to(device=like.device, dtype=dtype or like.dtype, non_blocking=True)


class Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))


def conv_layout(device: torch.device) -> torch.memory_format:
    """The layout convolution weights get whenever they are copied (converted at load, cast per call):
    channels-last on the CPU, where oneDNN's NHWC convolutions are ~15 % faster (bench/compare.py) and
    the output follows the weight's layout; the source's elsewhere. One rule for both copies, so an fp16
    file kept fp16 computes the same bits as the same file converted to fp32."""
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


OFFLOAD_HOME = "_offload_home"  # where `sdlab.offload` keeps an offloaded weight's CPU tensor


class Conv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if w.device == x.device and w.element_size() < x.element_size() and x.device.type == "cpu":
            w = self._stored_in_layout(w, conv_layout(x.device))
        if w.device == x.device and winograd.applies(self, x):  # CPU float32 inference, 16×16 and up
            return winograd.conv3x3(x, winograd.kernel_transform(w), _cast(self.bias, x))
        if w.dtype != x.dtype or w.device != x.device:
            w = w.to(device=x.device, dtype=x.dtype, non_blocking=True, memory_format=conv_layout(x.device))
        return self._conv_forward(x, w, _cast(self.bias, x))

    def _stored_in_layout(self, w: Tensor, layout: torch.memory_format) -> Tensor:
        """The weight, kept from now on in the layout it is up-cast into at every call (CPU float32 maths
        on fp16 weights): casting an fp16 weight already channels-last costs ~45 % of casting one that is
        not (bench/compare.py's SD1.5 U-Net: 0.14 s against 0.31 s a call). Done at the first call rather
        than at load, where it would add ~1 s of copying before the first step; the file's pages of the
        old layout are dropped, so memory holds one copy. Only for up-casts: a weight used as it is (no
        cast) keeps the layout it was loaded in, so its results do not depend on what ran before."""
        if w.requires_grad or hasattr(w, OFFLOAD_HOME) or w.is_contiguous(memory_format=layout):
            return w  # (an offloaded weight's data is swapped by sdlab.offload)
        old = w.data
        with torch.inference_mode(False):  # a normal tensor, usable for training afterwards
            w.data = old.contiguous(memory_format=layout)  # the same Parameter: LoRA unmerging keeps it
        drop_file_pages(old)
        return w


class LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class GroupNorm(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class GroupNormFloat32(GroupNorm32):
    """`GroupNorm32` (float32 maths whatever the input dtype) with its weights cast to float32."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = _cast(self.weight, x, torch.float32), _cast(self.bias, x, torch.float32)
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class Embedding(nn.Embedding):
    """Looks up rows in the storage dtype and hands them on in the network's compute dtype."""

    compute_dtype: torch.dtype | None = None

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight.to(ids.device)).to(self.compute_dtype or self.weight.dtype)


# exact classes only: a layer of another subclass keeps its own forward
_CASTING = [
    (GroupNorm32, GroupNormFloat32),
    (nn.GroupNorm, GroupNorm),
    (nn.Linear, Linear),
    (nn.Conv2d, Conv2d),
    (nn.LayerNorm, LayerNorm),
    (nn.Embedding, Embedding),
]
CASTING_LAYERS = tuple(cast for _, cast in _CASTING)


def adopt(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make `module`'s layers cast their weights per call and set its compute dtype to `dtype`."""
    for m in module.modules():
        if type(m) in CASTING_LAYERS:
            continue
        cast = next((c for base, c in _CASTING if type(m) is base), None)
        if cast is not None:
            m.__class__ = cast
        if isinstance(m, Embedding):
            m.compute_dtype = dtype
    module.compute_dtype = dtype  # type: ignore[assignment]
    return module


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a network computes in: set by `adopt`, else its weights' dtype."""
    return getattr(module, "compute_dtype", None) or next(module.parameters()).dtype


def device_of(module: nn.Module) -> torch.device:
    """Where a network runs: its `execution_device` when offloaded (sdlab.offload), else its weights'."""
    return getattr(module, "execution_device", None) or next(module.parameters()).device
