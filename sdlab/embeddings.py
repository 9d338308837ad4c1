"""Textual-inversion embeddings as AUTOMATIC1111 and ComfyUI use them.

A file holds n learned token vectors (n ≥ 1) per text encoder: A1111's `.pt` (`string_to_param`
{"*": (n, dim)}), `.safetensors` with `emb_params` (n, dim), diffusers' `learned_embeds` {token: (dim,)},
or SDXL's `clip_l` (n, 768) + `clip_g` (n, 1280). A1111 prompts name an embedding by its file stem (the
name stored inside the file does not matter), ComfyUI prompts by `embedding:NAME`. The name's tokens are
found in each prompt fragment's token stream (A1111's `find_embedding_at_position`: the names are
tokenized and matched as token sequences, the longest first) and become n placeholder positions whose
token embeddings are replaced by the vectors (`EmbeddingsWithFixes`); `sdlab.text.prompt` keeps them in
one 75-token chunk and weights them like any token. Pickled files only ever go through
`torch.load(weights_only=True)`: nothing in an embedding file is executed.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import Tensor

from sdlab.checkpoints.io import SAFETENSORS_SUFFIXES, CheckpointError, file_sha256, read_state_dict
from sdlab.text.prompt import CHUNK, Vectors

if TYPE_CHECKING:
    from sdlab.checkpoints.load import StableDiffusion
    from sdlab.config import TextConfig
    from sdlab.families import Family
    from sdlab.text.tokenizer import CLIPTokenizer

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # encoder folder -> key in SDXL files
COMFY_PREFIX = "embedding:"
_COMFY = re.compile(r"embedding:([^\s,:()\[\]]+)")


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, eq=False)
class Embedding:
    """One file's vectors: {"": (n, dim)} for single-encoder files, {"clip_l", "clip_g"} for SDXL."""

    name: str  # the file stem
    path: Path
    vectors: dict[str, Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def count(self) -> int:
        """Number of vectors (tokens) it stands for."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def shape(self) -> int:
        """A1111's `shape`: the width of the vectors, summed over encoders for SDXL files."""
        return sum(v.shape[-1] for v in self.vectors.values())

    def describe(self) -> str:
        return " + ".join(
            f"{k} {v.shape[-1]}" if k else f"width {v.shape[-1]}" for k, v in self.vectors.items()
        )

    def for_model(self, family: Family, texts: Sequence[TextConfig]) -> tuple[Tensor, ...]:
        """Its vectors for each of a model's text encoders; EmbeddingError when they do not fit."""
        return self.for_slots(model_slots(family, texts), f"this {family.label} model")

    def for_slots(
        self, slots: Sequence[tuple[str | None, int]], what: str = "this model"
    ) -> tuple[Tensor, ...]:
        """Its vectors for text encoders given as (SDXL key or None, width) (`model_slots`)."""
        keys, widths = [k for k, _ in slots], [w for _, w in slots]
        if "" in self.vectors:
            vec = self.vectors[""]
            if len(widths) == 1 and vec.shape[-1] == widths[0]:
                return (vec,)
        elif "clip_g" in keys and all(k in self.vectors for k in keys):  # SDXL base or refiner
            vecs = tuple(self.vectors[k] for k in keys)  # type: ignore[index]
            if all(v.shape[-1] == w for v, w in zip(vecs, widths, strict=True)):
                return vecs
        model = " + ".join(f"{k} {w}" if k else str(w) for k, w in slots)
        raise EmbeddingError(
            f"{self.path}: embedding vectors of {self.describe()} do not fit {what}, whose text encoder "
            f"width{'s are' if len(widths) > 1 else ' is'} {model}"
        )

    def fits(self, slots: Sequence[tuple[str | None, int]]) -> bool:
        try:
            self.for_slots(slots)
        except EmbeddingError:
            return False
        return True


def model_slots(family: Family, texts: Sequence[TextConfig]) -> list[tuple[str | None, int]]:
    """(key in SDXL embedding files or None, width) of each of a model's text encoders."""
    xl = any(s.diffusers_folder == "text_encoder_2" for s in family.text)
    return [
        (SDXL_KEYS.get(s.diffusers_folder) if xl else None, c.width)
        for s, c in zip(family.text, texts, strict=True)
    ]


@cache
def _checkpoint_slots(path: Path, size: int, mtime: float) -> tuple[tuple[str | None, int], ...]:
    if path.is_file() and path.suffix.lower() in SAFETENSORS_SUFFIXES:  # the header is enough
        with safe_open(str(path), framework="pt") as f:
            found = sorted(
                (k, f.get_slice(k).get_shape()[-1]) for k in f.keys() if k.endswith("token_embedding.weight")
            )
        if found and all(k.startswith("conditioner.embedders.") for k, _ in found):
            keys = ["clip_l", "clip_g"] if len(found) == 2 else ["clip_g"]
            return tuple(zip(keys, (w for _, w in found), strict=False))
        if len(found) == 1:
            return ((None, found[0][1]),)
    from sdlab import families
    from sdlab.checkpoints.load import read_checkpoint

    cfg = read_checkpoint(path).detect()
    return tuple(model_slots(families.get(cfg.family), cfg.text))


def checkpoint_slots(path: str | Path) -> tuple[tuple[str | None, int], ...]:
    """`model_slots` of a checkpoint file or diffusers folder without loading it (a safetensors header)."""
    path = Path(path).resolve()
    st = path.stat()
    return _checkpoint_slots(path, st.st_size, st.st_mtime)


def a1111_listing(files: Mapping[str, Path], slots: Sequence[tuple[str | None, int]] | None) -> dict:
    """A1111's `/sdapi/v1/embeddings`: {"loaded": {name: info}, "skipped": {...}}; skipped are files that
    do not fit the current model (`slots`; None: no model, all skipped). Unreadable files are left out."""
    out: dict[str, dict] = {"loaded": {}, "skipped": {}}
    for name, path in files.items():
        try:
            emb = read_embedding(path)
        except EmbeddingError:
            continue
        info = {
            "step": emb.step,
            "sd_checkpoint": emb.sd_checkpoint,
            "sd_checkpoint_name": emb.sd_checkpoint_name,
            "shape": emb.shape,
            "vectors": emb.count,
        }
        out["loaded" if slots is not None and emb.fits(slots) else "skipped"][name] = info
    return out


def read_embedding(path: str | Path) -> Embedding:
    """An embedding file's vectors (float32) and A1111's metadata; EmbeddingError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such embedding file")
    st = path.stat()
    return _read(path.resolve(), st.st_size, st.st_mtime)


@cache
def _read(path: Path, size: int, mtime: float) -> Embedding:
    data = _load(path)
    meta: dict[str, object] = {}
    if "string_to_param" in data:  # A1111 textual inversion
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: string_to_param must hold exactly one tensor")
        vectors = {"": next(iter(params.values()))}
        meta = {k: data.get(k) for k in ("step", "sd_checkpoint", "sd_checkpoint_name")}
    elif "clip_l" in data and "clip_g" in data:  # SDXL
        vectors = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    else:  # emb_params, diffusers' {token: vector}
        tensors = [v for v in data.values() if isinstance(v, Tensor)]
        if len(tensors) != 1 or len(data) != 1:
            raise EmbeddingError(
                f"{path}: not a textual-inversion embedding (expected string_to_param, emb_params, "
                f"clip_l + clip_g or one {{token: vector}}; found keys {sorted(map(str, data))[:8]})"
            )
        vectors = {"": tensors[0]}
    out: dict[str, Tensor] = {}
    for key, vec in vectors.items():
        if not isinstance(vec, Tensor) or not vec.is_floating_point() or vec.dim() not in (1, 2):
            raise EmbeddingError(f"{path}: {key or 'the embedding'} is not a (vectors, width) float tensor")
        out[key] = (vec[None] if vec.dim() == 1 else vec).detach().to("cpu", torch.float32)
    counts = {v.shape[0] for v in out.values()}
    if len(counts) != 1 or not 0 < counts.pop() <= CHUNK:
        raise EmbeddingError(f"{path}: {len(counts)} vector counts; need one count of 1 to {CHUNK}")
    return Embedding(
        path.stem,
        path,
        out,
        step=meta.get("step") if isinstance(meta.get("step"), int) else None,  # type: ignore[arg-type]
        sd_checkpoint=_str(meta.get("sd_checkpoint")),
        sd_checkpoint_name=_str(meta.get("sd_checkpoint_name")),
    )


def _str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _load(path: Path) -> dict:
    """The file's top-level dictionary: safetensors, or a pickle restricted to tensors and containers."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        try:
            return read_state_dict(path)
        except CheckpointError as e:
            raise EmbeddingError(str(e)) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmbeddingError(
            f"{path}: refused to load: the pickle needs code beyond plain tensors ({first}). sdlab never "
            "executes code from a model file; convert it to .safetensors with a tool you trust."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise EmbeddingError(f"{path}: not a readable PyTorch embedding file ({e})") from e
    if not isinstance(obj, dict):
        raise EmbeddingError(f"{path}: holds a {type(obj).__name__}, not an embedding dictionary")
    return obj


# ---------------------------------------------------------------------------------------------
# folders, names, hashes


def embedding_dirs(extra: Sequence[str | Path] = ()) -> list[Path]:
    """Folders embeddings are looked up in: the given ones, $SDLAB_MODELS_DIR/embeddings, ./embeddings."""
    env = [Path(p) / "embeddings" for p in os.environ.get("SDLAB_MODELS_DIR", "").split(os.pathsep) if p]
    return [Path(p) for p in extra] + env + [Path("embeddings")]


def list_embeddings(folders: Iterable[Path]) -> dict[str, Path]:
    """Stem -> file of every embedding file in the folders (subfolders searched; the first folder wins)."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file() and not path.name.startswith("."):
                found.setdefault(path.stem, path)
    return found


def find_embedding(name: str, folders: Sequence[Path]) -> Path:
    """ComfyUI's `embedding:NAME`: a stem, or a path relative to a folder with or without its suffix."""
    wanted = name.replace("\\", "/").strip("/")
    if not wanted or ".." in wanted.split("/"):
        raise EmbeddingError(f"{COMFY_PREFIX}{name}: not an embedding name")
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix.lower() not in EMBEDDING_SUFFIXES or not path.is_file():
                continue
            rel = path.relative_to(folder).as_posix()
            if wanted in (rel, rel[: -len(path.suffix)], path.stem, path.name):
                return path
    raise EmbeddingError(
        f"{COMFY_PREFIX}{name}: no embedding file of that name ({'/'.join(EMBEDDING_SUFFIXES)}) in the "
        f"{len(folders)} embedding folders"
    )


def embedding_hash(path: str | Path) -> str:
    """A1111's `TI hashes` short hash: the first 12 hex digits of the file's SHA-256."""
    return file_sha256(path)[:12]


# ---------------------------------------------------------------------------------------------
# matching names in prompts


class Embeddings:
    """The embeddings a model's prompts can name (A1111's `EmbeddingDatabase` for one model): names as
    token sequences, files read and checked against the model when a prompt first uses them."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        family: Family,
        texts: Sequence[TextConfig],
        names: Mapping[str, Path],
    ) -> None:
        self.family, self.texts = family, tuple(texts)
        self.used: dict[str, Embedding] = {}  # name -> embedding, in the order prompts used them
        self._vectors: dict[str, tuple[Vectors, ...]] = {}
        self._paths = dict(names)
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in names:
            ids = tuple(tokenizer.tokenize(name))
            if ids:
                self._by_first.setdefault(ids[0], []).append((ids, name))
        for matches in self._by_first.values():
            matches.sort(key=lambda m: len(m[0]), reverse=True)

    @classmethod
    def a1111(cls, model: StableDiffusion, folders: Sequence[Path]) -> Embeddings:
        """Every embedding file in the folders, named by its stem."""
        return cls(model.tokenizer, model.family, model.config.text, list_embeddings(folders))

    @classmethod
    def comfy(cls, model: StableDiffusion, texts: str | Sequence[str], folders: Sequence[Path]) -> Embeddings:
        """The `embedding:NAME` words of ComfyUI prompts, each resolved to its file (an error if missing)."""
        names: dict[str, Path] = {}
        for text in [texts] if isinstance(texts, str) else texts:
            for m in _COMFY.finditer(text):
                name = m.group(1)
                names.setdefault(COMFY_PREFIX + name, find_embedding(name, folders))
        return cls(model.tokenizer, model.family, model.config.text, names)

    def find(self, tokens: Sequence[int], position: int) -> tuple[str, int] | None:
        """(name, tokens it spans) of the longest name starting at `position`, if any."""
        for ids, name in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return name, len(ids)
        return None

    def vectors(self, name: str) -> tuple[Vectors, ...]:
        """The named embedding's vectors per encoder (read and checked on first use)."""
        if name not in self._vectors:
            emb = read_embedding(self._paths[name])
            per = emb.for_model(self.family, self.texts)
            self._vectors[name] = tuple(Vectors(emb.name, v) for v in per)
            self.used.setdefault(name, emb)
        return self._vectors[name]

    def encoder(self, index: int) -> EncoderEmbeddings:
        """What `sdlab.text.prompt.chunk_prompt` matches for text encoder `index`."""
        return EncoderEmbeddings(self, index)


@dataclass(frozen=True)
class EncoderEmbeddings:
    embeddings: Embeddings
    index: int

    def find(self, tokens: Sequence[int], position: int) -> tuple[Vectors, int] | None:
        found = self.embeddings.find(tokens, position)
        if found is None:
            return None
        name, length = found
        return self.embeddings.vectors(name)[self.index], length

    def named(self, name: str) -> Vectors | None:
        """The vectors `embedding:NAME` names (ComfyUI's syntax), None when no file was found for it."""
        key = COMFY_PREFIX + name
        return self.embeddings.vectors(key)[self.index] if key in self.embeddings._paths else None
