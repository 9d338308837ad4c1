"""The models folder: what can be named in requests, and the one loaded model.

Layout (AUTOMATIC1111's, rooted at `--models-dir`):

    models/
      *.safetensors, *.ckpt, diffusers folders   checkpoints (also under Stable-diffusion/, nested)
      Stable-diffusion/                          checkpoints, subfolders allowed ("sub/name.safetensors")
      VAE/                                       standalone VAEs (.safetensors, .ckpt, .pt)
      Lora/                                      LoRAs (.safetensors, .ckpt, .pt)
      embeddings/                                textual-inversion embeddings (.safetensors, .pt, .bin)
      ESRGAN/, RealESRGAN/, SwinIR/              upscaler models (A1111's folders; .pth, .pt, .safetensors)
      upscale_models/                            upscaler models (ComfyUI's folder)
      ControlNet/, controlnet/                   ControlNets (A1111's folder, then ComfyUI's); A1111's
                                                 extension keeps IP-Adapters here too
      ipadapter/                                 IP-Adapters (ComfyUI_IPAdapter_plus's folder)
      clip_vision/                               CLIP image encoders of IP-Adapters (A1111's and ComfyUI's)

ComfyUI's layout is read too: checkpoints/, vae/, loras/, embeddings/, upscale_models/, controlnet/,
clip_vision/, configs/ (and diffusion_models/ or unet/, text_encoders/ or clip/), so a ComfyUI models
folder works as `--models-dir`; `extra_model_paths.yaml` (ComfyUI's format: sections such as `a111` and
`comfyui`, each with an optional `base_path` and folder kinds mapped to paths) adds folders of each kind.

plus the shipped model as `sdlab-mini.safetensors` when it is installed. A request names a model by
its listed name (or, for checkpoints, its stem or A1111 title "name [hash]"); names are only ever
looked up in these listings, never joined onto a path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlab import families
from sdlab.checkpoints.io import WEIGHT_SUFFIXES
from sdlab.checkpoints.load import SHIPPED_MODEL, StableDiffusion, default_model_path
from sdlab.control import CONTROLNET_FOLDERS
from sdlab.devices import Placement, Precision, resolve_device, resolve_precision
from sdlab.infotext import model_hash
from sdlab.models.vae import AutoencoderKL

CHECKPOINT_DIR, VAE_DIR, LORA_DIR, EMBEDDING_DIR = "Stable-diffusion", "VAE", "Lora", "embeddings"
UPSCALER_DIRS = ("ESRGAN", "RealESRGAN", "SwinIR", "upscale_models")  # A1111's, then ComfyUI's
# each kind's folders under the models folder: A1111's names, then ComfyUI's (the first holding a name wins)
FOLDERS = {
    "checkpoints": (CHECKPOINT_DIR, "checkpoints"),
    "vae": (VAE_DIR, "vae"),
    "loras": (LORA_DIR, "loras"),
    "embeddings": (EMBEDDING_DIR,),
    "upscale_models": UPSCALER_DIRS,
    "controlnet": CONTROLNET_FOLDERS,
    "clip_vision": ("clip_vision",),
    "ipadapter": ("ipadapter",),
    "configs": ("configs",),
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
}
LEGACY_KINDS = {"unet": "diffusion_models", "clip": "text_encoders"}  # ComfyUI's old names for two kinds
EXTRA_MODEL_PATHS = "extra_model_paths.yaml"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
VAE_SUFFIXES = LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")


class UnknownName(LookupError):
    """A model, VAE or LoRA name that is not in the listing."""


@dataclass(frozen=True)
class Library:
    """Listings of the models folder, rescanned on every call (folders change while serving)."""

    root: Path | None
    extra: tuple[tuple[str, Path], ...] = ()  # (kind, folder) from extra_model_paths.yaml

    def dirs(self, kind: str) -> list[Path]:
        """The folders models of a kind (a `FOLDERS` key) are found in, in order."""
        own = [] if self.root is None else [self.root / sub for sub in FOLDERS[kind]]
        return own + [folder for k, folder in self.extra if k == kind]

    def listing(self, kind: str, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> dict[str, Path]:
        """Name (path relative to its folder) -> file of a kind; the first folder holding a name wins."""
        found: dict[str, Path] = {}
        for folder in self.dirs(kind):
            for name, path in _scan(folder, suffixes, recursive=True).items():
                found.setdefault(name, path)
        return found

    def checkpoints(self) -> dict[str, Path]:
        """Checkpoint name -> file or diffusers folder."""
        found: dict[str, Path] = {}
        shipped = default_model_path()
        if shipped.is_file():
            found[f"{SHIPPED_MODEL}.safetensors"] = shipped
        roots = [] if self.root is None else [(self.root, False)]
        for folder, recursive in roots + [(d, True) for d in self.dirs("checkpoints")]:
            for name, path in _scan(folder, CHECKPOINT_SUFFIXES, recursive, diffusers=True).items():
                found.setdefault(name, path)
        return found

    def configs(self) -> dict[str, Path]:
        """Model config name -> file (ComfyUI's CheckpointLoader lists them)."""
        return self.listing("configs", (".yaml",))

    def vaes(self) -> dict[str, Path]:
        """VAE name -> file."""
        return self.listing("vae", VAE_SUFFIXES)

    def loras(self) -> dict[str, Path]:
        """LoRA name -> file."""
        return self.listing("loras", LORA_SUFFIXES)

    def lora_folder(self) -> Path | None:
        """Where `<lora:NAME:W>` prompt tags are looked up."""
        return None if self.root is None else self.root / LORA_DIR

    def embedding_folder(self) -> Path | None:
        """Where embedding names in prompts are looked up."""
        return None if self.root is None else self.root / EMBEDDING_DIR

    def embeddings(self) -> dict[str, Path]:
        """Embedding name -> file."""
        return self.listing("embeddings", EMBEDDING_SUFFIXES)

    def upscaler_dirs(self) -> list[Path]:
        """The folders upscaler models are found in (A1111 names them by file stem: `sdlab.upscale`)."""
        return self.dirs("upscale_models")

    def upscale_models(self) -> dict[str, Path]:
        """ComfyUI's upscale model name (path relative to its folder) -> file; the first folder wins."""
        return self.listing("upscale_models")

    def controlnets(self) -> dict[str, Path]:
        """ControlNet name (path relative to its folder) -> file: models/ControlNet (A1111's), then
        models/controlnet (ComfyUI's), then extra_model_paths.yaml's; the first folder wins."""
        return self.listing("controlnet")

    def ipadapters(self) -> dict[str, Path]:
        """IP-Adapter name -> file in models/ipadapter (and extra_model_paths.yaml's `ipadapter`), as
        ComfyUI_IPAdapter_plus lists them (A1111's extension lists them with the ControlNets)."""
        return self.listing("ipadapter")

    def clip_visions(self) -> dict[str, Path]:
        """CLIP image encoder name -> file in models/clip_vision (and the yaml's `clip_vision`)."""
        return self.listing("clip_vision")

    def checkpoint(self, name: str) -> tuple[str, Path]:
        """(listed name, path) of a checkpoint given by name, stem or A1111 title."""
        listing = self.checkpoints()
        bare = _TITLE_HASH.sub("", name.strip())
        for key in (bare, *(k for k in listing if stem(k) == bare)):
            if key in listing:
                return key, listing[key]
        raise UnknownName(f"checkpoint {name!r} not found; available: {', '.join(listing) or 'none'}")

    def find(self, listing: dict[str, Path], name: str, what: str) -> Path:
        """The path of a listed VAE/LoRA/embedding, by name or stem."""
        for key, path in listing.items():
            if name in (key, stem(key)):
                return path
        raise UnknownName(f"{what} {name!r} not found; available: {', '.join(listing) or 'none'}")


class ModelPathsError(ValueError):
    """An extra_model_paths.yaml that cannot be read as ComfyUI reads it."""


def extra_model_paths(path: Path) -> tuple[tuple[str, Path], ...]:
    """(kind, folder) pairs of a ComfyUI `extra_model_paths.yaml` (ComfyUI's `load_extra_path_config`):
    each section's folders joined onto its `base_path` (relative to the file; `~` and `$VARS` expanded),
    a value may list several folders on separate lines; `unet`/`clip` are read as their new names. Kinds
    sdlab does not read (custom_nodes, hypernetworks, ...) are kept and never listed."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelPathsError(f"{path}: {' '.join(str(e).split())}") from e  # YAML's errors span lines
    if config is None:
        return ()
    if not isinstance(config, dict):
        raise ModelPathsError(f"{path}: expected sections of folder kinds, got {type(config).__name__}")
    here, found = path.resolve().parent, []
    for section, conf in config.items():
        if conf is None:
            continue
        if not isinstance(conf, dict):
            raise ModelPathsError(f"{path}: section {section!r} must map folder kinds to paths")
        conf = dict(conf)
        base = conf.pop("base_path", None)
        conf.pop("is_default", None)
        if base is not None:
            base = here / _expanded(path, section, "base_path", base)
        for kind, value in conf.items():
            for line in _expanded(path, section, kind, value).split("\n"):
                if line.strip():
                    folder = (base or here) / line.strip()
                    found.append((LEGACY_KINDS.get(str(kind), str(kind)), Path(os.path.normpath(folder))))
    return tuple(found)


def _expanded(path: Path, section: str, key: str, value: object) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise ModelPathsError(f"{path}: {section}.{key} must be a folder path (text), got {value!r}")
    return os.path.expandvars(os.path.expanduser(value))


def stem(name: str) -> str:
    """A listed name without its file suffix (`sub/model.safetensors` -> `sub/model`)."""
    return name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name


def _scan(
    folder: Path, suffixes: tuple[str, ...], recursive: bool, diffusers: bool = False
) -> dict[str, Path]:
    """Name (relative to folder, `/`-separated) -> path of the model files (and diffusers folders) in it."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        models = [d for d in dirnames if diffusers and (here / d / "model_index.json").is_file()]
        for name in models + [f for f in filenames if f.lower().endswith(suffixes)]:
            if not name.startswith("."):
                found[(here / name).relative_to(folder).as_posix()] = here / name
        dirnames[:] = [d for d in dirnames if recursive and not d.startswith(".") and d not in models]
    return dict(sorted(found.items()))


class ModelCache:
    """The loaded models, at most `keep` of them (a base model and its refiner), the least recently used
    dropped when a job names another checkpoint or VAE (worker thread only)."""

    def __init__(self, library: Library, keep: int = 2, placement: Placement | None = None) -> None:
        self.library = library
        self.keep = keep
        self.placement = placement or Placement()
        self._models: dict[tuple[Path, Path | None], StableDiffusion] = {}  # oldest first
        self.hashes: dict[Path, str] = {}  # short hashes of models loaded so far (A1111 titles)
        self._vaes: dict[Path, AutoencoderKL] = {}

    def model(self, checkpoint: str, vae: str | None = None) -> StableDiffusion:
        """The model of a listed checkpoint, optionally with a listed VAE instead of its own."""
        _, path = self.library.checkpoint(checkpoint)
        vae_path = self.library.find(self.library.vaes(), vae, "VAE") if vae else None
        key = (path, vae_path)
        model = self._models.pop(key, None)
        if model is None:
            while len(self._models) >= self.keep:  # drop old weights before loading new ones
                self._models.pop(next(iter(self._models)))
            model = self.placement.load(path, vae=vae_path)
            digest = model_hash(path)
            if digest is not None:
                self.hashes[path] = digest
        self._models[key] = model
        return model

    def device(self) -> torch.device:
        """The device the models run on (`sdlab serve --device`, `auto` resolved)."""
        return resolve_device(self.placement.device)

    def precision(self) -> Precision:
        """The precision models run in: `--dtype` for the family of the model used last (its VAE may stay
        out of float16), SD1/SD2's before a model is loaded."""
        loaded = list(self._models.values())  # a copy taken at once (routes read it while the worker loads)
        family = loaded[-1].family if loaded else families.get("sd1")
        return resolve_precision(self.placement.dtype, self.device(), family)

    def loaded(self) -> list[str]:
        """The listed names of the checkpoints loaded now (a shared queue's worker advertises them)."""
        paths = {path for path, _ in self._models}
        return [name for name, path in self.library.checkpoints().items() if path in paths]

    def vae(self, name: str) -> AutoencoderKL:
        """A listed standalone VAE (SD1/SD2 latent scale and precision rules), kept once loaded, placed as the
        server's models are (device, `--dtype`'s VAE precision, offload, attention)."""
        from sdlab.vae_tools import load_vae

        path = self.library.find(self.library.vaes(), name, "VAE")
        if path not in self._vaes:
            self._vaes = {}  # the old one's weights go before the new one's come
            self._vaes[path] = load_vae(vae=path, placement=self.placement)
        return self._vaes[path]
