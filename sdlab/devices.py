"""Where and in what precision a model runs: `--device auto|cpu|cuda[:N]|mps`, `--dtype auto|fp32|fp16|bf16`,
`--offload none|model|sequential` and `--attention`, shared by `generate`, `serve`, `vae` and `train`.

`auto` picks CUDA, then MPS, then the CPU; in half precision on a GPU (bfloat16 where the GPU has it,
else float16), with the VAE in bfloat16 or float32 for families whose VAE overflows float16 (SDXL), and
float32 on the CPU with the weights kept in the file's dtype (fp16 files stay fp16 in memory and are
up-cast per layer, `sdlab.models.ops`).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from sdlab.families import Family
from sdlab.models.blocks import ATTENTION

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE_CHOICES = "auto|cpu|cuda[:N]|mps"
OFFLOADS = ("none", "model", "sequential")
Storage = torch.dtype | Literal["file"]


@dataclass(frozen=True)
class Precision:
    """The dtypes a model computes in (U-Net and text encoders, VAE) and holds its weights in
    ("file": each tensor as the file stores it)."""

    compute: torch.dtype
    vae: torch.dtype
    storage: Storage


def resolve_device(name: str | torch.device) -> torch.device:
    """A device from its name, `auto` being CUDA, then MPS, then the CPU; unavailable ones refused."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: {count} CUDA device(s) available")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"--device {name!r}: expected {DEVICE_CHOICES}")
    return device


def _gpu_prefers_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype `--dtype name` computes in on `device`: `auto` is float32 on the CPU, else bfloat16 where
    the GPU has it, else float16 (training's autocast dtype too)."""
    if name == "auto":
        half = torch.bfloat16 if _gpu_prefers_bf16(device) else torch.float16
        return torch.float32 if device.type == "cpu" else half
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_flag(dtype: torch.dtype) -> str:
    """The `--dtype` name of a dtype (fp32, fp16, bf16)."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def resolve_precision(name: str | torch.dtype, device: torch.device, family: Family) -> Precision:
    """The precision `--dtype name` means on `device` for a model of `family` (see the module doc).
    A named dtype holds the weights in it too on a GPU; on the CPU they stay as the file has them."""
    if isinstance(name, torch.dtype):
        return Precision(name, name, name)
    compute = resolve_dtype(name, device)
    vae = compute
    if compute == torch.float16 and family.vae_fp16_overflows and name == "auto":
        vae = torch.bfloat16 if _gpu_prefers_bf16(device) else torch.float32
    return Precision(compute, vae, "file" if device.type == "cpu" else compute)


def add_device_arguments(
    parser: argparse.ArgumentParser, offload: bool = True, attention: bool = True
) -> None:
    """--device, --dtype and, where they mean something, --offload (commands that sample) and --attention."""
    parser.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="compute precision")
    if offload:
        parser.add_argument(
            "--offload",
            default="none",
            choices=OFFLOADS,
            help="keep weights on the CPU: each network (model) or each layer (sequential) on the device "
            "only while it runs",
        )
    if attention:
        parser.add_argument(
            "--attention",
            default="sdpa",
            action=_AttentionChoice,
            help=f"attention implementation: {', '.join(ATTENTION)} (default sdpa; 'list' prints them)",
        )


class _AttentionChoice(argparse.Action):
    """`--attention NAME`, or `--attention list`: print the implementations, one a line, and exit."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: object, value: object, _: object = None
    ) -> None:
        if value == "list":
            print("\n".join(ATTENTION))
            parser.exit(0)
        if value not in ATTENTION:
            parser.error(f"--attention {value!r}: available are {', '.join(ATTENTION)}")
        setattr(namespace, self.dest, value)


# glibc's mallopt parameters, and its defaults for both (128 KiB)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _GLIBC_DEFAULT = -1, -3, 128 * 1024
_KEEP_BELOW = 1 << 30  # buffers up to 1 GiB come from (and go back to) the heap while sampling
_heap_lock, _heap_users = threading.Lock(), [0]


def _glibc() -> ctypes.CDLL | None:
    """glibc, when it is the allocator in use and the user has not tuned it (MALLOC_* / GLIBC_TUNABLES)."""
    tuned = any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ)
    if sys.platform != "linux" or tuned or "LD_PRELOAD" in os.environ:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_MADV_DONTNEED = 4
_PAGEMAP_SWAPPED, _PAGEMAP_FILE, _PAGEMAP_PRESENT = (np.uint64(1 << b) for b in (62, 61, 63))


def drop_file_pages(t: Tensor) -> bool:
    """Take the whole pages of a contiguous CPU tensor out of this process's memory when each is either
    unread or an unmodified page of a mapped file (a safetensors map), so that a copy made of it does
    not count twice; the data stays valid (those pages fault back in from the page cache if read).
    Checked page by page in /proc/self/pagemap: anything written to or anonymous is left alone.
    Returns whether pages were dropped (False off Linux or when a page fails the check)."""
    if sys.platform != "linux" or t.device.type != "cpu" or not t.is_contiguous():
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    begin = t.data_ptr()
    start, end = -(-begin // page) * page, (begin + t.numel() * t.element_size()) // page * page
    if end <= start:
        return False
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // page * 8)
            flags = np.frombuffer(f.read((end - start) // page * 8), dtype=np.uint64)
        madvise = _madvise()
    except OSError:
        return False
    written = ((flags & _PAGEMAP_PRESENT) != 0) & ((flags & _PAGEMAP_FILE) == 0)
    if ((flags & _PAGEMAP_SWAPPED) != 0).any() or written.any():
        return False
    return madvise(start, end - start, _MADV_DONTNEED) == 0


@cache
def _madvise() -> ctypes._CFuncPtr:
    """The C library's madvise(addr, length, advice)."""
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


@contextmanager
def large_buffers_kept(device: torch.device) -> Iterator[None]:
    """While sampling on the CPU, keep freed buffers of up to 1 GiB in the heap, then return the heap.

    glibc hands every buffer over 128 KiB back to the kernel when it is freed, so the fp32 copies of
    fp16-stored weights and oneDNN's reordered convolution weights (up to 118 MB at SD1.5's 1280 channels)
    are page-faulted in anew at every call: a 256-px SD1.5 step spends ~30 % of its time there. A step
    allocates the same buffers each time, so keeping them costs no more than its working set;
    `malloc_trim` gives the free heap back at the end (the VAE then runs with glibc's defaults). In a
    thread other than the main one, glibc's per-thread arenas still map buffers near their 64 MiB heap size.
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    with _heap_lock:
        _heap_users[0] += 1
        if _heap_users[0] == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW)
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users[0] -= 1
            if _heap_users[0] == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
                libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
                libc.malloc_trim(0)


@dataclass(frozen=True)
class Placement:
    """How models are loaded and run: the command-line options or server settings of this module."""

    device: str = "auto"
    dtype: str = "auto"
    offload: str = "none"
    attention: str = "sdpa"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Placement:
        """The options a command's arguments hold (those it has not: their defaults)."""
        fields = {"device": "auto", "dtype": "auto", "offload": "none", "attention": "sdpa"}
        return cls(**{name: getattr(args, name, default) for name, default in fields.items()})

    def validate(self) -> None:
        """ValueError naming the option when a value cannot be honoured here."""
        resolve_device(self.device)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: expected auto, {', '.join(DTYPES)}")
        if self.offload not in OFFLOADS:
            raise ValueError(f"--offload {self.offload!r}: expected {', '.join(OFFLOADS)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"--attention {self.attention!r}: available are {', '.join(ATTENTION)}")

    def load(self, source: object, **kwargs: object) -> object:
        """`load_model(source, **kwargs)` placed as these options say."""
        from sdlab.checkpoints.load import load_model

        return load_model(
            source,  # type: ignore[arg-type]
            device=self.device,
            dtype=self.dtype,
            offload=self.offload,
            attention=self.attention,
            **kwargs,  # type: ignore[arg-type]
        )
