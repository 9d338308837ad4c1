"""Reading and writing weight files safely.

`.safetensors` files are memory-mapped; pickled `.ckpt/.pt/.pth/.bin` files only ever go through
`torch.load(weights_only=True)`, which refuses any pickle that needs code beyond plain tensors and
containers. Nothing in a model file is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from functools import cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


class CheckpointError(Exception):
    """A model file that cannot be used; the message names the file and the problem."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a weight file, memory-mapped where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise CheckpointError(
        f"{path}: unknown weight file type {path.suffix!r} (expected one of {', '.join(WEIGHT_SUFFIXES)})"
    )


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a .safetensors header (empty for other formats)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _read_pickle(path: Path) -> dict[str, Tensor]:
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle needs code beyond plain tensors ({_first_line(e)}). "
            "sdlab never executes code from a model file; convert it to .safetensors with a tool you trust."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from e
    return _tensors_of(obj, path)


def _torch_load(path: Path) -> object:
    """torch.load restricted to tensors, memory-mapped when the file is in the zip format."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format


def _tensors_of(obj: object, path: Path) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint (top level or under `state_dict`)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def write_safetensors(
    tensors: dict[str, Tensor], path: str | Path, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors to a new .safetensors file atomically; an existing file is never replaced. The same
    tensors and metadata always give the same bytes (so the same file hash, which A1111 prints)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(contiguous, tmp, metadata=metadata)
        _sort_header(Path(tmp))
        _publish(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _sort_header(path: Path) -> None:
    """Rewrite a .safetensors header in place with its keys sorted: the safetensors writer emits them in
    hash-map order, which differs from one save to the next. Offsets are relative to the data, so only
    the order of the JSON changes; it is padded with spaces to its old length as the format allows."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # the same JSON, reordered; never longer than serde_json's compact form
            f.seek(8)
            f.write(text.ljust(size, b" "))


@cache
def _sha256(path: Path, size: int, mtime: float, skip_header: bool) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if skip_header:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path, tensors_only: bool = False) -> str:
    """SHA-256 hex digest of a file (cached per path, size and mtime); `tensors_only`: of a .safetensors
    file's data after its JSON header (kohya's `addnet` hash, which A1111 uses for LoRAs)."""
    path = Path(path).resolve()
    st = path.stat()
    return _sha256(path, st.st_size, st.st_mtime, tensors_only)


def write_json(obj: object, path: str | Path) -> Path:
    """Write JSON to a new file atomically; an existing file is never replaced."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        _publish(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _publish(tmp: Path, path: Path) -> None:
    """Move a finished temporary file to its name, failing if the name was taken meanwhile."""
    try:
        os.link(tmp, path)  # atomic and refuses to replace an existing file
    except FileExistsError as e:
        raise FileExistsError(f"{path}: already exists; not overwriting it") from e
