"""Training data: the built-in sdlab-mini stream or an image folder with captions, and the step-indexed,
rank-sharded batch order that makes resuming and multi-process training reproduce a single run.

Image folders follow the AUTOMATIC1111/kohya convention: `name.png` with its caption in `name.txt`, in
the folder or its sub-folders; a sub-folder named `N_anything` repeats its images N times per epoch.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from sdlab.images import ImageError, open_image, probe_image, to_tensor
from sdlab.train.mini_data import CORE_OBJECTS, CaptionMix, MiniDataConfig, sample

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEATS = re.compile(r"^(\d+)_")
MAX_LISTED = 10  # problems named in one DataError


class DataError(ValueError):
    """Training data that cannot be used; the message names the files and the problem."""


@dataclass(frozen=True)
class DataConfig:
    """Where images come from: the sdlab-mini stream (`folder` None) or an image folder, at `resolution`.

    Caption dropout for guidance belongs to the U-Net recipe, so mini captions default to no empty ones.
    """

    folder: str | None = None
    resolution: int = 64
    caption_extension: str = ".txt"
    mini_seed: int = 0
    num_objects: int = len(CORE_OBJECTS)
    captions: CaptionMix = CaptionMix(empty=0.0)
    epoch_size: int = 100_000


Item = tuple[Tensor, str, Any]  # image (3, S, S) in [-1, 1], caption, a key naming the image's content


class MiniData(torch.utils.data.Dataset):
    """The sdlab-mini stream; the key is the scene, which alone determines the image."""

    def __init__(self, config: MiniDataConfig) -> None:
        self.config = config

    def __len__(self) -> int:
        return self.config.epoch_size

    def __getitem__(self, index: int) -> Item:
        image, text, scene = sample(index, self.config)
        return image, text, scene


class ImageFolder(torch.utils.data.Dataset):
    """Images of a folder tree, resized (shorter side) and centre-cropped to `resolution`, with captions."""

    def __init__(self, folder: str | Path, resolution: int, captions: bool, caption_extension: str = ".txt"):
        self.folder, self.resolution, self.caption_extension = Path(folder), resolution, caption_extension
        files = _scan(self.folder)
        _check(files, resolution, caption_extension if captions else None)
        self.files = [f for f in files for _ in range(_repeats(f, self.folder))]
        self.captions = captions

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Item:
        path = self.files[index]
        try:
            image = _fit(open_image(path, f"{path}: unreadable image"), self.resolution)
        except ImageError as e:
            raise DataError(str(e)) from e
        caption = path.with_suffix(self.caption_extension)
        text = caption.read_text(encoding="utf-8").strip() if self.captions else ""
        return to_tensor(image)[0], text, str(path)


def _scan(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder or its sub-folders")
    return files


def _check(files: list[Path], resolution: int, caption_extension: str | None) -> None:
    """Raise one DataError naming every unreadable, too small or uncaptioned image (up to MAX_LISTED)."""
    problems = []
    for path in files:
        try:
            w, h = probe_image(path, f"{path}: unreadable image")
        except ImageError as e:
            problems.append(str(e))
            continue
        if min(w, h) < resolution:
            problems.append(f"{path}: {w}x{h} is smaller than the training size {resolution}")
        if caption_extension and not path.with_suffix(caption_extension).is_file():
            problems.append(f"{path}: no caption file {path.with_suffix(caption_extension).name}")
    if problems:
        more = f"\n... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(
            f"{len(problems)} unusable training images:\n" + "\n".join(problems[:MAX_LISTED]) + more
        )


def _repeats(path: Path, root: Path) -> int:
    """kohya's `N_name` sub-folder convention: the nearest such folder above the image repeats it N times."""
    for parent in path.relative_to(root).parents:
        m = REPEATS.match(parent.name)
        if m:
            return max(1, int(m.group(1)))
    return 1


def _fit(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (Lanczos), then crop the centre square."""
    w, h = image.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def build_dataset(cfg: DataConfig, captions: bool) -> torch.utils.data.Dataset:
    """The dataset a DataConfig names; `captions` requires a caption file for every folder image."""
    if cfg.folder is None:
        return MiniData(
            MiniDataConfig(
                size=cfg.resolution,
                seed=cfg.mini_seed,
                num_objects=cfg.num_objects,
                captions=cfg.captions,
                epoch_size=cfg.epoch_size,
            )
        )
    return ImageFolder(cfg.folder, cfg.resolution, captions, cfg.caption_extension)


def collate(items: list[Item]) -> dict[str, Any]:
    """Stack images; keep captions and keys as lists."""
    images, texts, keys = zip(*items, strict=True)
    return {"image": torch.stack(images), "caption": list(texts), "key": list(keys)}


class StepBatches(torch.utils.data.Sampler[list[int]]):
    """Dataset indices of this rank's rows of each global batch, for steps [start, stop).

    Global batch s holds positions s·B … s·B + B − 1 of an endless stream of epochs, each a permutation
    seeded by (seed, epoch); rank r takes the r-th of `world` equal slices. The order depends only on the
    step, so a resumed run and any number of ranks see exactly the single-process batches.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1
    ):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} does not split evenly over {world} processes")
        self.size, self.batch, self.seed = size, batch_size, seed
        self.start, self.stop, self.rank, self.local = start, stop, rank, batch_size // world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            first = step * self.batch + self.rank * self.local
            yield [self._index(p) for p in range(first, first + self.local)]

    def _index(self, position: int) -> int:
        epoch, i = divmod(position, self.size)
        return int(_permutation(self.size, self.seed, epoch)[i])


@functools.lru_cache(maxsize=2)
def _permutation(size: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
