"""Load a Stable Diffusion model from a single file or a diffusers folder, and write either format.

Reading goes: weight files (memory-mapped) -> per-component state dicts in the original layout
(`Checkpoint`) -> configs detected from shapes -> modules built on the meta device and given the
file's tensors with `load_state_dict(assign=True)`, so the weights are never held twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sdlab import devices, families
from sdlab.checkpoints import keymaps
from sdlab.checkpoints.detect import detect_model, detect_vae
from sdlab.checkpoints.io import (
    WEIGHT_SUFFIXES,
    CheckpointError,
    read_metadata,
    read_state_dict,
    write_json,
    write_safetensors,
)
from sdlab.config import ModelConfig, Prediction
from sdlab.devices import Storage
from sdlab.families import Family
from sdlab.finite import all_finite, dtype_name, first_non_finite
from sdlab.models import ops
from sdlab.models.blocks import set_attention
from sdlab.models.clip import CLIPTextModel
from sdlab.models.unet import UNetModel
from sdlab.models.vae import AutoencoderKL
from sdlab.offload import enable_offload, weights_home
from sdlab.text.tokenizer import CLIPTokenizer

StateDict = dict[str, Tensor]
TEXT_FOLDERS = keymaps.TEXT_FOLDERS


@dataclass
class Checkpoint:
    """A model's tensors per component, in the original layout with prefixes stripped.

    Text encoders are in the transformers layout (`text_model.*`) whatever the file used;
    `text_layouts` records the original layout of each.
    """

    source: Path
    unet: StateDict | None
    vae: StateDict | None
    text: list[StateDict]
    text_layouts: list[str]
    prediction: Prediction | None = None  # when the file says (diffusers scheduler, `v_pred` key)
    text_used_layers: int | None = None  # a diffusers text_encoder config's num_hidden_layers
    tokenizer_dir: Path | None = None
    extras: StateDict = field(default_factory=dict)  # keys outside the networks, e.g. `v_pred`
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata

    def detect(self, prediction: Prediction | None = None) -> ModelConfig:
        """The model configuration these tensors describe."""
        return detect_model(
            self.unet,
            self.vae,
            list(zip(self.text_layouts, self.text, strict=True)),
            self.extras,
            str(self.source),
            prediction or self.prediction,
            self.text_used_layers,
        )


def read_checkpoint(source: str | Path) -> Checkpoint:
    """Read a single-file checkpoint or a diffusers folder into per-component state dicts."""
    source = Path(source)
    if source.is_dir():
        return _read_diffusers(source)
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or folder")
    return _read_single_file(source)


def _read_single_file(path: Path) -> Checkpoint:
    sd = read_state_dict(path)
    parts = keymaps.split_single_file(sd)
    if parts.unet is None and parts.vae is None and not parts.text:
        sample = ", ".join(sorted(sd)[:5])
        raise CheckpointError(
            f"{path}: not a Stable Diffusion checkpoint: none of its {len(sd)} tensors has a known prefix "
            "(model.diffusion_model., first_stage_model., cond_stage_model., conditioner.); "
            f"first keys: {sample}"
        )
    text = [
        keymaps.text_openclip_to_openai(t) if layout == "openclip" else t
        for layout, t in zip(parts.text_layouts, parts.text, strict=True)
    ]
    return Checkpoint(
        source=path,
        unet=parts.unet,
        vae=parts.vae,
        text=text,
        text_layouts=list(parts.text_layouts),
        prediction="v" if "v_pred" in sd else None,
        extras=parts.extras,
        metadata=read_metadata(path),
    )


def folder_weights(folder: Path, stem: str) -> StateDict:
    """The weights of one diffusers component folder (`.safetensors` preferred, shards included)."""
    for name in (f"{stem}.safetensors", f"{stem}.bin", f"{stem}.fp16.safetensors", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    for index in sorted(folder.glob(f"{stem}*.index.json")):
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        sd: StateDict = {}
        for shard in shards:
            if Path(shard).name != shard:
                raise CheckpointError(f"{index}: shard name {shard!r} points outside the folder")
            sd.update(read_state_dict(folder / shard))
        return sd
    raise CheckpointError(f"{folder}: no {stem}.safetensors or {stem}.bin")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e


def _read_diffusers(folder: Path) -> Checkpoint:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: not a diffusers folder (no model_index.json)")
    for part in ("unet", "vae"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder}: diffusers folder without {part}/")
    text, layouts, used, tokenizer_dir = [], [], None, None
    for name, tokenizer in zip(TEXT_FOLDERS, ("tokenizer", "tokenizer_2"), strict=True):
        if not (folder / name).is_dir():
            continue
        sd = folder_weights(folder / name, "model" if _has_stem(folder / name, "model") else "pytorch_model")
        text.append(keymaps.text_from_transformers(sd))
        config = _read_json(folder / name / "config.json")
        layouts.append("openclip" if config.get("hidden_act") == "gelu" else "openai")
        if len(text) == 1:
            used = config.get("num_hidden_layers")
        if tokenizer_dir is None and (folder / tokenizer / "vocab.json").is_file():
            tokenizer_dir = folder / tokenizer
    if not text:
        raise CheckpointError(f"{folder}: diffusers folder without text_encoder/ or text_encoder_2/")
    prediction = None
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        prediction = "v" if _read_json(sched).get("prediction_type") == "v_prediction" else "eps"
    unet = keymaps.unet_diffusers_to_ldm(folder_weights(folder / "unet", "diffusion_pytorch_model"))
    vae = keymaps.vae_diffusers_to_ldm(folder_weights(folder / "vae", "diffusion_pytorch_model"))
    return Checkpoint(
        source=folder,
        unet=unet,
        vae=vae,
        text=text,
        text_layouts=layouts,
        prediction=prediction,  # type: ignore[arg-type]
        text_used_layers=used,
        tokenizer_dir=tokenizer_dir,
    )


def _has_stem(folder: Path, stem: str) -> bool:
    return (
        any(folder.glob(f"{stem}.*safetensors"))
        or any(folder.glob(f"{stem}.*bin"))
        or any(folder.glob(f"{stem}*.index.json"))
    )


# ---------------------------------------------------------------------------------------------
# modules


@dataclass
class StableDiffusion:
    """A loaded model: its configuration, the three networks and the tokenizer."""

    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel]
    tokenizer: CLIPTokenizer
    source: Path
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.source.stem if self.source.is_file() else self.source.name

    @property
    def family(self) -> Family:
        """The model family's record: conditioning, latent format, defaults, naming."""
        return families.get(self.config.family)

    @property
    def native_size(self) -> int:
        """The image side the model was trained at (file metadata `sdlab.native_size`, else the family's)."""
        size = self._setting("sdlab.native_size", self.family.native_size, int, 8, 4096)
        if size % 8:
            raise CheckpointError(f"{self.source}: metadata sdlab.native_size={size} is not a multiple of 8")
        return int(size)

    @property
    def default_steps(self) -> int:
        return int(self._setting("sdlab.steps", self.family.steps, int, 1, 1000))

    @property
    def default_cfg(self) -> float:
        return float(self._setting("sdlab.cfg", self.family.cfg, float, 0.0, 100.0))

    def _setting(self, key: str, default: float, kind: type, lo: float, hi: float) -> float:
        """A generation default from the file's metadata (input like any other: parsed and bounded)."""
        if key not in self.metadata:
            return default
        try:
            value = kind(self.metadata[key])
        except (TypeError, ValueError):
            raise CheckpointError(
                f"{self.source}: metadata {key}={self.metadata[key]!r} is not a number"
            ) from None
        if not lo <= value <= hi:  # also refuses NaN
            raise CheckpointError(f"{self.source}: metadata {key}={value} is outside [{lo}, {hi}]")
        return value

    def text_layer(self, clip_skip: int = 1) -> int:
        """The text layer (from the end) that A1111's clip skip selects: 1 = the family's own layer."""
        return self.config.clip_skip_default + clip_skip - 1


_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def empty_modules() -> Iterator[None]:
    """Build modules on the meta device without running their `torch.nn.init` initialisers: there is
    nothing to fill, and on meta tensors torch routes some of them (`normal_`) through its compiler
    stack, whose import alone costs a second of every `sdlab generate`."""
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_")]
    with _INIT_LOCK:
        saved = {n: getattr(init, n) for n in names}
        try:
            for n in names:
                setattr(init, n, lambda tensor, *args, **kwargs: tensor)
            with torch.device("meta"):
                yield
        finally:
            for n, f in saved.items():
                setattr(init, n, f)


def build_module(
    module_cls: type[torch.nn.Module],
    cfg: object,
    sd: StateDict,
    what: str,
    dtype: torch.dtype,
    device: torch.device | str,
    storage: Storage | None = None,
) -> torch.nn.Module:
    """Instantiate on the meta device and adopt the tensors (converted only when dtype/device differ).
    The network computes in `dtype`; its weights are held in `storage` (default `dtype`; "file": as the
    file has them, e.g. float16 kept memory-mapped) and cast per layer (`sdlab.models.ops`)."""
    storage = storage or dtype
    with empty_modules():
        module = module_cls(cfg)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: tensors do not fit the detected architecture; "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k, v in expected.items() if v.shape != sd[k].shape]
    if bad:
        raise CheckpointError(
            f"{what}: tensor {bad[0]!r} has shape {tuple(sd[bad[0]].shape)}, "
            f"expected {tuple(expected[bad[0]].shape)}"
        )
    held = {k: _held(sd[k], torch.device(device), storage) for k in expected}
    module.load_state_dict(held, strict=True, assign=True)
    ops.adopt(module, dtype)
    bad = first_non_finite(module.state_dict().items())  # a sum per tensor: ~1.4 s for SDXL's 3.5 G
    if bad is not None:
        overflow = all_finite(sd[bad]) and sd[bad].dtype != held[bad].dtype
        cause = f" after conversion to {dtype_name(held[bad].dtype)} (beyond its range)" if overflow else ""
        raise CheckpointError(f"{what}: tensor {bad!r} holds NaN or Inf values{cause}")
    return module.eval().requires_grad_(False)


def _held(t: Tensor, device: torch.device, storage: Storage) -> Tensor:
    """A tensor as the network holds it: in `storage` on `device`; convolution weights that are copied
    for that take the layout of `ops.conv_layout`, the others (kept as the file's map) stay as they are."""
    dtype = t.dtype if storage == "file" else storage
    if t.dim() == 4 and (dtype != t.dtype or device != t.device):
        return t.to(device=device, dtype=dtype, memory_format=ops.conv_layout(device))
    return t.to(device=device, dtype=dtype)


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    vae: str | Path | None = None,
    prediction: Prediction | None = None,
    storage_dtype: Storage | None = None,
    offload: str = "none",
    attention: str = "sdpa",
) -> StableDiffusion:
    """Load a whole model; `vae` swaps in a standalone VAE file, `prediction` overrides detection.
    `device`/`dtype` take torch values or the names of `sdlab.devices` ("auto", "cuda:1", "fp16"),
    `storage_dtype` the dtype weights are held in when it differs ("file": the file's own);
    `offload` "model"/"sequential" keeps the weights on the CPU (`sdlab.offload`)."""
    ckpt = read_checkpoint(source)
    if vae is not None:
        ckpt.vae = read_vae(vae)
    cfg = ckpt.detect(prediction)
    what = str(ckpt.source)
    if vae is not None:
        cfg = _with_vae(cfg, detect_vae(ckpt.vae, str(vae), cfg.vae.scale_factor))
    run_on = devices.resolve_device(device)
    precision = devices.resolve_precision(dtype, run_on, families.get(cfg.family))
    held_on = weights_home(offload, run_on)
    compute, storage = precision.compute, storage_dtype or precision.storage
    unet = build_module(UNetModel, cfg.unet, ckpt.unet, f"{what} (U-Net)", compute, held_on, storage)
    vae_module = build_module(
        AutoencoderKL, cfg.vae, ckpt.vae, f"{vae or what} (VAE)", precision.vae, held_on, storage
    )
    texts = [
        build_module(CLIPTextModel, tcfg, sd, f"{what} (text encoder {i})", compute, held_on, storage)
        for i, (tcfg, sd) in enumerate(zip(cfg.text, ckpt.text, strict=True))
    ]
    tokenizer = (
        CLIPTokenizer.from_folder(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else CLIPTokenizer.default()
    )
    model = StableDiffusion(cfg, unet, vae_module, texts, tokenizer, ckpt.source, ckpt.metadata)  # type: ignore[arg-type]
    set_attention(unet, attention)
    set_attention(vae_module, attention)
    enable_offload(model, offload, run_on)
    return model


def _with_vae(cfg: ModelConfig, vae_cfg: object) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, vae=vae_cfg)


def read_vae(path: str | Path) -> StateDict:
    """A standalone VAE file (ldm keys, with or without `first_stage_model.`, or diffusers keys)."""
    path = Path(path)
    sd = read_state_dict(path)
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = {
            k.removeprefix("first_stage_model."): v
            for k, v in sd.items()
            if k.startswith("first_stage_model.")
        }
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        sd = keymaps.vae_diffusers_to_ldm(sd)
    if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{path}: not a VAE (no encoder.conv_in / decoder.conv_in weights)")
    return {
        k: v
        for k, v in sd.items()
        if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
    }


# ---------------------------------------------------------------------------------------------
# description and conversion

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _summary(sd: StateDict) -> str:
    params = sum(v.numel() for v in sd.values())
    dtypes = sorted({_DTYPE_NAMES.get(v.dtype, str(v.dtype).removeprefix("torch.")) for v in sd.values()})
    return f"{params:>13,} parameters  {'/'.join(dtypes)}"


def describe(ckpt: Checkpoint) -> str:
    """A human-readable account of a checkpoint: family, prediction type, components."""
    cfg = ckpt.detect()
    u = cfg.unet
    lines = [
        f"model:       {ckpt.source}",
        f"family:      {cfg.family} ({families.get(cfg.family).label})",
        f"prediction:  {'v-prediction' if cfg.prediction == 'v' else 'epsilon'}"
        + ("" if ckpt.prediction else " (detected from weights)"),
        f"unet:        {_summary(ckpt.unet)}  channels {u.model_channels}x{list(u.channel_mult)}, "
        f"context {u.context_dim}, in {u.in_channels}",
        f"vae:         {_summary(ckpt.vae)}  latent {cfg.vae.embed_dim}ch /{cfg.vae.downscale}, "
        f"scale {cfg.vae.scale_factor}",
    ]
    for i, (t, sd) in enumerate(zip(cfg.text, ckpt.text, strict=True)):
        lines.append(f"text[{i}]:     {_summary(sd)}  {t.layout} width {t.width}, {t.layers} layers")
    total = sum(v.numel() for sd in (ckpt.unet, ckpt.vae, *ckpt.text) for v in sd.values())
    lines.append(f"total:       {total:>13,} parameters")
    return "\n".join(lines)


def _cast(sd: StateDict, dtype: torch.dtype | None) -> StateDict:
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def to_single_file(ckpt: Checkpoint, cfg: ModelConfig) -> StateDict:
    """All tensors under their original single-file keys."""
    text = [
        keymaps.text_openai_to_openclip(sd) if layout == "openclip" else sd
        for layout, sd in zip(ckpt.text_layouts, ckpt.text, strict=True)
    ]
    sd = keymaps.join_single_file(families.get(cfg.family), ckpt.unet, ckpt.vae, text)
    if cfg.prediction == "v":
        sd["v_pred"] = torch.tensor([])  # the marker ComfyUI and others read
    return sd


def save_single_file(ckpt: Checkpoint, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a single-file `.safetensors` checkpoint in the original layout."""
    cfg = ckpt.detect()
    meta = {**ckpt.metadata, "format": "pt", "sdlab.family": cfg.family, "sdlab.prediction": cfg.prediction}
    return write_safetensors(_cast(to_single_file(ckpt, cfg), dtype), path, metadata=meta)


def save_diffusers(ckpt: Checkpoint, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers folder (configs, safetensors weights, tokenizer files)."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder}: already exists; not overwriting it")
    cfg = ckpt.detect()
    configs = keymaps.diffusers_configs(cfg)
    weights = {
        "unet/diffusion_pytorch_model.safetensors": keymaps.unet_ldm_to_diffusers(ckpt.unet, cfg.unet),
        "vae/diffusion_pytorch_model.safetensors": keymaps.vae_ldm_to_diffusers(ckpt.vae, cfg.vae),
    }
    family = families.get(cfg.family)
    for spec, sd in zip(family.text, ckpt.text, strict=True):
        weights[f"{spec.diffusers_folder}/model.safetensors"] = sd
    tmp = folder.with_name(f".{folder.name}.partial")
    if tmp.exists():
        raise FileExistsError(f"{tmp}: left over from an interrupted conversion; remove it first")
    for rel, content in configs.items():
        write_json(content, tmp / rel)
    for rel, sd in weights.items():
        write_safetensors(_cast(sd, dtype), tmp / rel, metadata={"format": "pt"})
    tokenizer = (
        CLIPTokenizer.from_folder(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else CLIPTokenizer.default()
    )
    for spec, tcfg in zip(family.text, cfg.text, strict=True):
        tokenizer.save_folder(tmp / spec.tokenizer_folder, pad_token=tcfg.pad_token)
    tmp.rename(folder)
    return folder


def convert(source: str | Path, output: str | Path, dtype: str | None = None) -> Path:
    """`sdlab convert`: single file <-> diffusers folder, chosen by the output's suffix."""
    ckpt = read_checkpoint(source)
    torch_dtype = DTYPES[dtype] if dtype else None
    output = Path(output)
    if output.suffix.lower() in WEIGHT_SUFFIXES:
        if output.suffix.lower() != ".safetensors":
            raise ValueError(f"{output}: sdlab writes .safetensors only (never pickles)")
        return save_single_file(ckpt, output, torch_dtype)
    return save_diffusers(ckpt, output, torch_dtype)


# ---------------------------------------------------------------------------------------------
# finding models by name

SHIPPED_MODEL = "sdlab-mini"


def default_model_path() -> Path:
    """The model shipped inside the package (used when no model is named)."""
    return Path(__file__).resolve().parent.parent / "assets" / f"{SHIPPED_MODEL}.safetensors"


def model_dirs() -> list[Path]:
    """Folders searched for models given by bare name: $SDLAB_MODELS_DIR (os.pathsep-separated), ./models."""
    env = os.environ.get("SDLAB_MODELS_DIR", "")
    return [Path(p) for p in env.split(os.pathsep) if p] + [Path("models")]


def resolve_model(name: str | Path | None) -> Path:
    """A model file or folder from a path, an installed model's name, or None (the shipped model)."""
    if name is None or str(name) == SHIPPED_MODEL:
        path = default_model_path()
        if not path.is_file():
            raise CheckpointError(f"the shipped model is not installed ({path}); pass a model with -m")
        return path
    path = Path(name)
    if path.exists():
        return path
    if path.name == str(name):  # a bare name: look in the model folders
        for folder in model_dirs():
            for candidate in (folder / name, *(folder / f"{name}{s}" for s in WEIGHT_SUFFIXES)):
                if candidate.exists():
                    return candidate
    searched = ", ".join(str(d) for d in model_dirs())
    raise CheckpointError(f"{name}: no such model file or folder (also searched {searched})")
