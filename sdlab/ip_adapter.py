"""IP-Adapter (Ye et al. 2023): an image prompt through a CLIP image encoder and a projection into a few
context tokens, which each U-Net cross-attention reads with its own keys and values (decoupled
cross-attention): out = attn(q, k_text, v_text) + weight · attn(q, k_ip, v_ip).

Files in the published layout: `image_proj.*` (ImageProjModel `proj`/`norm`, or the "plus" Resampler)
and `ip_adapter.N.to_k_ip/to_v_ip` with N = 1, 3, 5, … in diffusers' attention-processor order (down
blocks, up blocks, mid block). The negative side gets the projection of zero image embeddings (plain) or
of the encoder's features of all-zero (normalised) pixels ("plus"), as diffusers'
`prepare_ip_adapter_image_embeds`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from sdlab.checkpoints.io import WEIGHT_SUFFIXES, CheckpointError, read_state_dict
from sdlab.checkpoints.load import build_module, folder_weights, model_dirs
from sdlab.models.blocks import BasicTransformerBlock, CrossAttention, attention
from sdlab.models.clip_vision import CLIPVisionModel, VisionConfig, preprocess_image
from sdlab.models.ops import compute_dtype, device_of
from sdlab.models.unet import UNetModel

StateDict = dict[str, Tensor]
IP_ADAPTER_FOLDERS = ("ipadapter", "ControlNet")  # ComfyUI's models/ipadapter; A1111's extension's folder
CLIP_VISION_FOLDERS = ("clip_vision",)
RESAMPLER_HEAD = 64  # channels per head of the "plus" Resampler's attention


@dataclass(frozen=True)
class IPAdapterSpec:
    """One image prompt of a request: the adapter (a path, or a name in the ipadapter folders), the
    image, its weight, and the CLIP image encoder (a path or a name in clip_vision; None: the only one
    found next to the adapter or in the clip_vision folders)."""

    model: str
    image: Image.Image | None = field(default=None, compare=False)
    weight: float = 1.0
    clip_vision: str | None = None

    def validate(self, index: int) -> None:
        """Raise ValueError naming the adapter and its first bad field."""
        if self.image is None:
            raise ValueError(f"ip_adapters[{index}]: no image")
        if not np.isfinite(self.weight) or not -1.0 <= self.weight <= 5.0:
            raise ValueError(f"ip_adapters[{index}].weight must be in [-1, 5], got {self.weight}")


@dataclass(frozen=True)
class IPAdapterConfig:
    """An adapter's shapes: its cross-attention layers (key number, inner width), the U-Net context width,
    the image features it reads, and its projection (plain: `tokens` tokens; "plus": a Resampler)."""

    layers: tuple[tuple[int, int], ...]
    context_dim: int
    embed_dim: int
    tokens: int
    resampler: tuple[int, int, int] | None = None  # (width, depth, heads) of the "plus" Resampler

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> IPAdapterConfig:
        numbers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("ip_adapter.")})
        layers = tuple((n, sd[f"ip_adapter.{n}.to_k_ip.weight"].shape[0]) for n in numbers)
        context_dim = sd[f"ip_adapter.{numbers[0]}.to_k_ip.weight"].shape[1]
        if "image_proj.proj.weight" in sd and "image_proj.norm.weight" in sd:
            proj = sd["image_proj.proj.weight"]
            return cls(layers, context_dim, proj.shape[1], proj.shape[0] // context_dim)
        if "image_proj.latents" in sd:
            latents = sd["image_proj.latents"]
            depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("image_proj.layers."))
            heads = sd["image_proj.layers.0.0.to_q.weight"].shape[0] // RESAMPLER_HEAD
            embed = sd["image_proj.proj_in.weight"].shape[1]
            return cls(layers, context_dim, embed, latents.shape[1], (latents.shape[2], depth, heads))
        raise CheckpointError(
            "not a supported IP-Adapter projection (plain `image_proj.proj` + `norm` or the 'plus' "
            "Resampler's `image_proj.latents`); full-face and FaceID adapters are not supported"
        )


class ImageProjModel(nn.Module):
    """The image embedding -> `tokens` context tokens (a Linear, reshaped, LayerNorm)."""

    def __init__(self, cfg: IPAdapterConfig) -> None:
        super().__init__()
        self.tokens = cfg.tokens
        self.proj = nn.Linear(cfg.embed_dim, cfg.tokens * cfg.context_dim)
        self.norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class PerceiverAttention(nn.Module):
    """Learned latents attend to the image features joined with themselves (keys `to_q`, `to_kv`)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * RESAMPLER_HEAD
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


def _resampler_ff(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * 4, bias=False), nn.GELU(), nn.Linear(dim * 4, dim, bias=False)
    )


class Resampler(nn.Module):
    """The "plus" projection: image encoder features (penultimate layer) -> `tokens` context tokens."""

    def __init__(self, cfg: IPAdapterConfig) -> None:
        super().__init__()
        assert cfg.resampler is not None
        dim, depth, heads = cfg.resampler
        self.latents = nn.Parameter(torch.zeros(1, cfg.tokens, dim))
        self.proj_in = nn.Linear(cfg.embed_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), _resampler_ff(dim)]) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, cfg.context_dim)
        self.norm_out = nn.LayerNorm(cfg.context_dim)

    def forward(self, features: Tensor) -> Tensor:
        latents = self.latents.repeat(features.shape[0], 1, 1)
        x = self.proj_in(features)
        for attn, ff in self.layers:  # type: ignore[misc]
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPLayer(nn.Module):
    """The image tokens' keys and values of one U-Net cross-attention."""

    def __init__(self, context_dim: int, inner: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=False)


class IPAdapterModel(nn.Module):
    """`image_proj` and `ip_adapter.N` as the published files name them."""

    def __init__(self, cfg: IPAdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_proj: nn.Module = Resampler(cfg) if cfg.resampler else ImageProjModel(cfg)
        self.ip_adapter = nn.ModuleDict({str(n): IPLayer(cfg.context_dim, inner) for n, inner in cfg.layers})

    def image_tokens(self, encoder: CLIPVisionModel, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(cond, uncond) tokens of the image: from its projected embedding and zeros (plain), or from the
        encoder's penultimate features of the image and of all-zero pixels ("plus"), as diffusers."""
        if self.cfg.resampler is None:
            embeds = encoder(pixels).image_embeds
            return self.image_proj(embeds), self.image_proj(torch.zeros_like(embeds))
        both = encoder(torch.cat([pixels, torch.zeros_like(pixels)])).hidden_states[-2]
        return self.image_proj(both).chunk(2)  # type: ignore[return-value]


@dataclass(frozen=True)
class IPAttention:
    """One adapter's part of one cross-attention: weight · attn(q, to_k_ip(tokens), to_v_ip(tokens))."""

    layer: IPLayer
    tokens: int
    scale: float

    def __call__(self, q: Tensor, tokens: Tensor, heads: int, impl: str) -> Tensor:
        k, v = self.layer.to_k_ip(tokens), self.layer.to_v_ip(tokens)
        return self.scale * attention(q, k, v, heads, impl=impl)


@dataclass
class PreparedIP:
    """A request's image prompts made ready once: each U-Net cross-attention's adapter parts, and every
    adapter's tokens joined in order for the conditional and unconditional sides (1, N, context_dim)."""

    attentions: list[tuple[IPAttention, ...]]
    cond: Tensor
    uncond: Tensor


def cross_attentions(unet: nn.Module) -> list[CrossAttention]:
    """The U-Net's cross-attentions in diffusers' processor order (down, up, mid), which numbers
    IP-Adapter layers: the i-th is `ip_adapter.{2i+1}`."""
    parts = (unet.input_blocks, unet.output_blocks, unet.middle_block)
    return [m.attn2 for part in parts for m in part.modules() if isinstance(m, BasicTransformerBlock)]


@contextmanager
def ip_adapters_applied(unet: nn.Module, prepared: PreparedIP | None) -> Iterator[None]:
    """Within the block the U-Net's cross-attentions read image tokens appended to their context."""
    if prepared is None:
        yield
        return
    attns = cross_attentions(unet)
    for attn, parts in zip(attns, prepared.attentions, strict=True):
        attn.ip = parts
    try:
        yield
    finally:
        for attn in attns:
            del attn.ip


# ---------------------------------------------------------------------------------------------
# files


def _find(name: str, folders: Sequence[str], what: str) -> Path:
    """A file or folder: a path, or a name (with or without suffix) in `folders` under the model roots."""
    path = Path(name)
    if path.exists():
        return path
    dirs = [root / sub for root in model_dirs() for sub in folders]
    for folder in dirs:
        for candidate in (folder / name, *(folder / f"{name}{s}" for s in WEIGHT_SUFFIXES)):
            if candidate.exists():
                return candidate
    raise CheckpointError(f"{name}: no such {what} (searched {', '.join(str(d) for d in dirs)})")


def _clip_vision_path(spec: IPAdapterSpec, adapter: Path) -> Path:
    """The spec's image encoder, else the only one in `image_encoder/` next to the adapter or in the
    clip_vision folders."""
    if spec.clip_vision:
        return _find(spec.clip_vision, CLIP_VISION_FOLDERS, "CLIP vision model")
    found = [adapter.parent / "image_encoder"] if (adapter.parent / "image_encoder").is_dir() else []
    for folder in (root / sub for root in model_dirs() for sub in CLIP_VISION_FOLDERS):
        found += sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    if len(found) != 1:
        raise CheckpointError(
            f"{spec.model}: {'several' if found else 'no'} CLIP vision models found; name one (--clip-vision)"
        )
    return found[0]


def load_clip_vision(path: Path, dtype: torch.dtype, device: torch.device | str) -> CLIPVisionModel:
    """A CLIP image encoder from a transformers/ComfyUI file or a diffusers `image_encoder` folder."""
    sd = folder_weights(path, "model") if path.is_dir() else read_state_dict(path)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    if "vision_model.embeddings.patch_embedding.weight" not in sd or "visual_projection.weight" not in sd:
        raise CheckpointError(
            f"{path}: not a CLIP vision model in the transformers layout (vision_model.*, visual_projection)"
        )
    cfg = VisionConfig.from_state_dict(sd)
    return build_module(CLIPVisionModel, cfg, sd, str(path), dtype, device)  # type: ignore[return-value]


def load_ip_adapter(path: Path, dtype: torch.dtype, device: torch.device | str) -> IPAdapterModel:
    """An IP-Adapter file (.safetensors flat, or the .bin's `image_proj`/`ip_adapter` groups)."""
    sd = read_state_dict(path)
    if not any(k.startswith("ip_adapter.") for k in sd):
        raise CheckpointError(f"{path}: not an IP-Adapter (no ip_adapter.N.to_k_ip tensors)")
    try:
        cfg = IPAdapterConfig.from_state_dict(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return build_module(IPAdapterModel, cfg, sd, str(path), dtype, device)  # type: ignore[return-value]


def prepare_ip_adapters(specs: Sequence[IPAdapterSpec], unet: UNetModel) -> PreparedIP | None:
    """Load each adapter and its image encoder, encode its image once, and check it fits the U-Net."""
    if not specs:
        return None
    dtype, device = compute_dtype(unet), device_of(unet)
    attns = cross_attentions(unet)
    per_layer: list[list[IPAttention]] = [[] for _ in attns]
    conds, unconds = [], []
    for spec in specs:
        path = _find(spec.model, IP_ADAPTER_FOLDERS, "IP-Adapter file")
        adapter = load_ip_adapter(path, dtype, device)
        numbers = [n for n, _ in adapter.cfg.layers]
        fits = numbers == [2 * i + 1 for i in range(len(attns))]
        if not fits or adapter.cfg.context_dim != unet.cfg.context_dim:
            raise CheckpointError(
                f"{path}: this IP-Adapter has {len(numbers)} cross-attention layers of context width "
                f"{adapter.cfg.context_dim}; the model has {len(attns)} of {unet.cfg.context_dim}"
            )
        encoder = load_clip_vision(_clip_vision_path(spec, path), dtype, device)
        assert spec.image is not None
        pixels = preprocess_image(spec.image, encoder.cfg.image_size).to(device, dtype)
        cond, uncond = adapter.image_tokens(encoder, pixels)
        conds.append(cond)
        unconds.append(uncond)
        for parts, number in zip(per_layer, numbers, strict=True):
            parts.append(IPAttention(adapter.ip_adapter[str(number)], cond.shape[1], spec.weight))  # type: ignore[arg-type]
    return PreparedIP([tuple(p) for p in per_layer], torch.cat(conds, dim=1), torch.cat(unconds, dim=1))
