"""AUTOMATIC1111's extra networks in prompts: `<lora:NAME:WEIGHT>` tags, the folders they are found in,
and the short hashes A1111 writes for them (`Lora hashes` in the PNG parameters).

A tag is taken out of the prompt text before encoding (A1111's `extra_networks.parse_prompt`); NAME is a
file stem (or a path relative to a LoRA folder, without suffix), WEIGHT defaults to 1. Tags sdlab cannot
honour (other network kinds, separate text-encoder/U-Net weights, tags in a negative prompt) are errors
that name the tag, never ignored.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from sdlab.checkpoints.io import file_sha256
from sdlab.text.schedule import PromptError

TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")
LORA_KINDS = ("lora", "lyco")  # A1111 reads LyCORIS files through the same tag


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:…>` tags, and (name, weight) of each tag in order."""
    found: list[tuple[str, float]] = []

    def take(m: re.Match[str]) -> str:
        kind, args = m.group(1), m.group(2).split(":")
        if kind not in LORA_KINDS:
            raise PromptError(
                f"{m.group(0)}: sdlab has no '{kind}' extra networks (LoRA tags are <lora:NAME:W>)"
            )
        if len(args) > 2 or "=" in m.group(2):
            raise PromptError(
                f"{m.group(0)}: sdlab takes <lora:NAME> or <lora:NAME:WEIGHT>, one weight for all"
            )
        try:
            weight = float(args[1]) if len(args) == 2 else 1.0
        except ValueError:
            raise PromptError(f"{m.group(0)}: the weight {args[1]!r} is not a number") from None
        if not math.isfinite(weight):
            raise PromptError(f"{m.group(0)}: the weight must be a finite number")
        found.append((args[0].strip(), weight))
        return ""

    return TAG.sub(take, prompt), found


def no_tags(prompt: str, what: str) -> None:
    """Refuse extra-network tags where sdlab does not apply them (a negative prompt)."""
    if m := TAG.search(prompt):
        raise PromptError(f"{m.group(0)}: extra networks in the {what} are not applied; remove the tag")


def lora_dirs(extra: Sequence[str | Path] = ()) -> list[Path]:
    """Folders `<lora:…>` names are looked up in: the given ones, $SDLAB_MODELS_DIR/Lora, models/Lora."""
    env = [Path(p) / "Lora" for p in os.environ.get("SDLAB_MODELS_DIR", "").split(os.pathsep) if p]
    return [Path(p) for p in extra] + env + [Path("models") / "Lora"]


def find_lora(name: str, folders: Sequence[Path]) -> Path:
    """The LoRA file `name` names: a stem or a relative path without suffix, in the first folder that has
    it (subfolders searched); never a path outside the folders."""
    wanted = name.replace("\\", "/").strip("/")
    if not wanted or ".." in wanted.split("/"):
        raise ValueError(f"<lora:{name}>: not a LoRA name")
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in LORA_SUFFIXES or not path.is_file():
                continue
            rel = path.relative_to(folder).with_suffix("").as_posix()
            if wanted in (rel, path.stem):
                return path
    raise ValueError(
        f"<lora:{name}>: no LoRA file of that name ({'/'.join(LORA_SUFFIXES)}) in the {len(folders)} LoRA "
        "folders (--lora-dir or the server's models/Lora, $SDLAB_MODELS_DIR/Lora, ./models/Lora)"
    )


def lora_hash(path: str | Path) -> str:
    """The 12-digit short hash A1111 writes in `Lora hashes`: SHA-256 of a .safetensors file's tensor
    data (kohya's `addnet` hash, the header skipped), else of the whole file."""
    return file_sha256(path, tensors_only=Path(path).suffix.lower() == ".safetensors")[:12]
