"""Reading and writing weight files safely.

`.safetensors` files are memory-mapped; pickled `.ckpt/.pt/.pth/.bin` files only ever go through
`torch.load(weights_only=True)`, which refuses any pickle that needs code beyond plain tensors and
containers. Nothing in a model file is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header
_DTYPE_BYTES = {  # safetensors dtypes of whole bytes per element
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
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
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return dict(check_safetensors(path).get("__metadata__") or {})


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    check_safetensors(path)  # the structure, before safetensors maps or allocates anything
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _read_pickle(path: Path) -> dict[str, Tensor]:
    _check_pickle(path)
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


def check_safetensors(path: str | Path) -> dict:
    """The parsed JSON header of a .safetensors file after checking the whole file's structure the way
    the format's specification demands, reading only the header: an 8-byte little-endian header length
    within the file (and at most 100 MB), a JSON object starting with `{` (trailing spaces allowed) with
    no key twice, string-to-string `__metadata__`, and per tensor a known dtype, a shape of non-negative
    integers and `data_offsets` whose span is exactly dtype x shape bytes; the tensors must cover the
    data section exactly, without overlaps, holes or trailing bytes. Other files are named for what they
    are (an empty file, an HTML page, a Git LFS pointer, a ZIP or pickle checkpoint, plain text...)."""
    path = Path(path)

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file: {problem}")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(1024)
            n = int.from_bytes(head[:8], "little") if size >= 8 else -1
            # a sane header length rules out every other kind of file, so only sniff when it is not
            if not 0 <= n <= min(size - 8, MAX_HEADER_BYTES):
                what = _what_file_is(path, head, size)
                if what is None and head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
                    what = _zip_kind(path)
                if what is None and _is_pickle(head):
                    what = "a pickled PyTorch checkpoint, not safetensors (rename it to .ckpt)"
                if what is None and _looks_like_text(head):
                    what = f"a plain-text file (it starts {_snippet(head)})"
                if what is not None:
                    raise bad(f"this is {what}")
                if size < 8:
                    raise bad(f"only {size} bytes long, too short for the 8-byte header length")
                limit = "beyond the end of the file" if n > size - 8 else f"over the {MAX_HEADER_BYTES} limit"
                raise bad(f"header length {n} is {limit} (the file has {size} bytes)")
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from e
    if not raw.startswith(b"{"):
        raise bad("the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except _DuplicateKeyError as e:
        raise bad(f"the header lists {e.key!r} twice") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad(f"the header is not valid JSON ({_first_line(e)})") from e
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    _check_tensors(header, size - 8 - n, bad)
    return header


def _check_tensors(header: dict, data_len: int, bad: Callable[[str], CheckpointError]) -> None:
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ is not a map of strings to strings")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad(f"tensor {key!r}: its entry is not a JSON object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise bad(f"tensor {key!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise bad(f"tensor {key!r}: data_offsets {offsets!r} are not two non-negative integers")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise bad(f"tensor {key!r}: data_offsets {offsets} lie outside the {data_len}-byte data section")
        need = math.prod(shape) * _DTYPE_BYTES[dtype]
        if need != end - begin:
            raise bad(
                f"tensor {key!r}: {dtype} {shape} needs {need} bytes but data_offsets span {end - begin}"
            )
        spans.append((begin, end, key))
    pos, previous = 0, None
    for begin, end, key in sorted(spans):
        if begin < pos:
            raise bad(f"tensor {key!r} overlaps tensor {previous!r} in the data section")
        if begin > pos:
            raise bad(f"{begin - pos} bytes before tensor {key!r} belong to no tensor (a hole in the data)")
        pos, previous = end, key
    if pos != data_len:
        raise bad(f"{data_len - pos} bytes of trailing data after the last tensor")


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_pickle(path: Path) -> None:
    """Name files that are plainly no PyTorch checkpoint before torch.load (which would call a text file
    or an LFS pointer a pickle needing code)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(1024)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from e
    n = int.from_bytes(head[:8], "little") if size >= 10 else -1
    if head[8:9] == b"{" and 0 <= n <= size - 8:
        what = f"a safetensors file, not a pickle (rename it to {path.stem}.safetensors)"
    else:
        what = _what_file_is(path, head, size)
    if what is None and head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        kind = _zip_kind(path)
        what = None if kind.startswith("a PyTorch checkpoint") else kind
    elif what is None and _is_pickle(head):
        return
    elif what is None and _looks_like_text(head):
        what = f"a plain-text file (it starts {_snippet(head)})"
    if what is not None:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: this is {what}")


def _what_file_is(path: Path, head: bytes, size: int) -> str | None:
    """What a file plainly is when it is no weight file of any kind, from its first bytes."""
    if size == 0:
        return "an empty file"
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a download that failed?)"
    if text.startswith(b"version https://git-lfs.github.com/spec/"):
        return "a Git LFS pointer, not the model (run git lfs pull)"
    for magic, kind in _ARCHIVES:
        if head.startswith(magic):
            return f"a {kind} archive (unpack it first)"
    return None


_ARCHIVES = (
    (b"\x1f\x8b", "gzip"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip"),
    (b"Rar!\x1a\x07", "RAR"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return "a damaged ZIP archive"
    if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return "a PyTorch checkpoint in ZIP form, not safetensors (rename it to .ckpt)"
    return f"a ZIP archive that is not a PyTorch checkpoint ({len(names)} entries; unpack it?)"


def _is_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode, as torch.save writes


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    for cut in range(4):  # the 1024-byte read may split a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return all(c.isprintable() or c in "\t\n\r\f\v" for c in text)
    return False


def _snippet(head: bytes) -> str:
    text = head[:60].decode("utf-8", errors="replace").split("\n")[0]
    return repr(text)


def _torch_load(path: Path) -> object:
    """torch.load restricted to tensors, memory-mapped when the file is in the zip format."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format


def _tensors_of(obj: object, path: Path) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint (top level, or under `state_dict`, or under BasicSR's
    `params_ema` / `params` as Real-ESRGAN and SwinIR files have it)."""
    if isinstance(obj, dict):
        wrappers = [k for k in ("state_dict", "params_ema", "params") if isinstance(obj.get(k), dict)]
        obj = obj[wrappers[0]] if wrappers else obj
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:  # one level of named groups, as in IP-Adapter .bin files (image_proj, ip_adapter)
        tensors = {
            f"{k}.{k2}": v2
            for k, v in obj.items()
            if isinstance(k, str) and isinstance(v, dict)
            for k2, v2 in v.items()
            if isinstance(k2, str) and isinstance(v2, Tensor)
        }
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
