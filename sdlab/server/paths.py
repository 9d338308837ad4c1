"""Folders the server reads and writes, and names from requests confined to them.

A name from a request never reaches the file system unchecked: it must be a plain relative path
(no `..`, no absolute or drive paths, no NUL) and, once symlinks are resolved, still lie inside
its folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")


class PathError(ValueError):
    """A file name or subfolder from a request that would leave its folder."""


@dataclass(frozen=True)
class Folders:
    """Where the server keeps things (see `sdlab serve --help`)."""

    models: Path | None  # checkpoints; VAE/, Lora/, embeddings/ inside (None: the shipped model only)
    outputs: Path  # saved images (ComfyUI type "output", A1111 save_images)
    inputs: Path  # uploads and the images of queued jobs (ComfyUI type "input")
    state: Path  # the job database and temp/ (previews, API results not saved)

    @property
    def temp(self) -> Path:
        """Previews and A1111 results not saved."""
        return self.state / "temp"

    @property
    def database(self) -> Path:
        """The job queue."""
        return self.state / "jobs.sqlite3"

    def by_type(self, kind: str) -> Path:
        """The folder of a ComfyUI file type: output, input or temp."""
        folders = {"output": self.outputs, "input": self.inputs, "temp": self.temp}
        if kind not in folders:
            raise PathError(f"unknown file type {kind!r}; expected output, input or temp")
        return folders[kind]

    def create(self) -> None:
        """Create the folders the server writes to."""
        for folder in (self.outputs, self.inputs, self.temp):
            folder.mkdir(parents=True, exist_ok=True)


def relative_parts(name: str, what: str = "path") -> tuple[str, ...]:
    """The components of a request's relative path, refusing absolute paths, `..` and odd characters."""
    if "\0" in name or "\\" in name:
        raise PathError(f"{what} {name!r}: invalid character")
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise PathError(f"{what} {name!r}: must be relative")
    parts = tuple(p for p in path.parts if p != ".")
    if ".." in parts:
        raise PathError(f"{what} {name!r}: must not contain '..'")
    return parts


def confined(root: Path, subfolder: str, filename: str) -> Path:
    """root/subfolder/filename, refused when it would leave root (`..`, absolute paths, symlinks out)."""
    if not filename or relative_parts(filename, "filename") != (filename,):
        raise PathError(f"filename {filename!r}: must be a plain file name")
    path = root.joinpath(*relative_parts(subfolder, "subfolder"), filename)
    if not path.resolve().is_relative_to(root.resolve()):
        raise PathError(f"{subfolder}/{filename}: leaves its folder")
    return path


def split_name(name: str) -> tuple[str, str]:
    """`sub/dir/file.png` -> (`sub/dir`, `file.png`)."""
    parts = relative_parts(name, "name")
    if not parts:
        raise PathError(f"name {name!r}: empty")
    return "/".join(parts[:-1]), parts[-1]


def image_files(root: Path) -> list[str]:
    """The image files under root as `/`-separated relative names, hidden ones and links out skipped."""
    if not root.is_dir():
        return []
    inside = root.resolve()
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            path = Path(dirpath) / f
            if (
                f.lower().endswith(IMAGE_SUFFIXES)
                and not f.startswith(".")
                and path.resolve().is_relative_to(inside)
            ):
                names.append(path.relative_to(root).as_posix())
    return sorted(names)
