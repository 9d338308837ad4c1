"""IP-Adapter (Ye et al. 2023): an image prompt through a CLIP image encoder and a projection into a few
context tokens, which each U-Net cross-attention reads with its own keys and values (decoupled
cross-attention): out = attn(q, k_text, v_text) + weight · attn(q, k_ip, v_ip).

Files in the published layout: `image_proj.*` (ImageProjModel `proj`/`norm`, or the "plus" Resampler)
and `ip_adapter.N.to_k_ip/to_v_ip` with N = 1, 3, 5, … in diffusers' attention-processor order (down
blocks, up blocks, mid block): 16 layers on SD1.x, 70 on SDXL, whose `ip-adapter_sdxl` reads ViT-bigG's
image embedding and the `_vit-h` adapters ViT-H's. The negative side gets the projection of zero image
embeddings (plain) or of the encoder's features of all-zero (normalised) pixels ("plus"), as diffusers'
`prepare_ip_adapter_image_embeds`.

Each interface follows the tool it imitates (`IPAdapterSpec.convention`): "diffusers" (the Python API
and CLI: CLIPImageProcessor's resize and centre crop), "comfy" (ComfyUI_IPAdapter_plus: ComfyUI's
`clip_preprocess`, a black image's features as the "plus" negative, start/end as a σ range) and "a1111"
(sd-webui-controlnet: the image squashed to the encoder's size by OpenCV's INTER_AREA, start/end as a
share of the steps; "plus" adapters refused, the extension reads recorded negative features).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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
from sdlab.models.clip_vision import (
    CLIPVisionModel,
    VisionConfig,
    a1111_clip_pixels,
    comfy_clip_pixels,
    preprocess_image,
)
from sdlab.models.ops import compute_dtype, device_of
from sdlab.models.unet import UNetModel
from sdlab.offload import follow, home_device

StateDict = dict[str, Tensor]
IP_ADAPTER_FOLDERS = ("ipadapter", "ControlNet")  # ComfyUI's models/ipadapter; A1111's extension's folder
CLIP_VISION_FOLDERS = ("clip_vision",)
RESAMPLER_HEAD = 64  # channels per head of the "plus" Resampler's attention


IP_CONVENTIONS = ("diffusers", "comfy", "a1111")  # the tool whose image handling and start/end are followed
Picture = Image.Image | Tensor  # a PIL image, or ComfyUI's pixels (1, 3, H, W) in [0, 1] ("comfy")


@dataclass(frozen=True)
class IPAdapterSpec:
    """One image prompt of a request: the adapter (a path, a name in the ipadapter folders, or a loaded
    one), the image, its weight, the CLIP image encoder (a path, a name in clip_vision, a loaded one; None:
    the only one found next to the adapter or in the clip_vision folders), the share of the schedule it acts
    on, the convention followed (module docstring) and an optional negative image ("comfy")."""

    model: str | IPAdapterModel = field(compare=False)
    image: Picture | None = field(default=None, compare=False)
    weight: float = 1.0
    clip_vision: str | CLIPVisionModel | None = field(default=None, compare=False)
    start: float = 0.0
    end: float = 1.0
    convention: str = "diffusers"
    negative_image: Picture | None = field(default=None, compare=False)

    def validate(self, index: int) -> None:
        """Raise ValueError naming the adapter and its first bad field."""
        if self.image is None:
            raise ValueError(f"ip_adapters[{index}]: no image")
        if not np.isfinite(self.weight) or not -1.0 <= self.weight <= 5.0:
            raise ValueError(f"ip_adapters[{index}].weight must be in [-1, 5], got {self.weight}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"ip_adapters[{index}]: start and end must satisfy 0 <= start <= end <= 1")
        if self.convention not in IP_CONVENTIONS:
            raise ValueError(f"ip_adapters[{index}].convention must be one of {', '.join(IP_CONVENTIONS)}")
        if self.negative_image is not None and self.convention != "comfy":
            raise ValueError(f"ip_adapters[{index}].negative_image: only the ComfyUI nodes take one")


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
        x = self.proj_in(features)
        latents = self.latents.to(x).repeat(features.shape[0], 1, 1)
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
        self.source = "IP-Adapter"  # its file, for messages
        self.image_proj: nn.Module = Resampler(cfg) if cfg.resampler else ImageProjModel(cfg)
        self.ip_adapter = nn.ModuleDict({str(n): IPLayer(cfg.context_dim, inner) for n, inner in cfg.layers})

    def image_tokens(
        self, encoder: CLIPVisionModel, pixels: Tensor, negative: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(cond, uncond) tokens of the image: from its projected embedding and that of the negative image's
        (None: zeros; plain), or from the encoder's penultimate features of both ("plus")."""
        if self.cfg.resampler is None:
            embeds = encoder(pixels).image_embeds
            zeros = torch.zeros_like(embeds) if negative is None else encoder(negative).image_embeds
            return self.image_proj(embeds), self.image_proj(zeros)
        assert negative is not None, "a 'plus' adapter's negative side is an encoded image"
        both = encoder(torch.cat([pixels, negative])).hidden_states[-2]
        return self.image_proj(both).chunk(2)  # type: ignore[return-value]


@dataclass
class Gate:
    """When one adapter acts: over the share of the steps start..end (A1111's extension), or with `by_sigma`
    while σ lies in the range ComfyUI's percent_to_sigma gives them (IPAdapter_plus); `on` is set per call."""

    start: float = 0.0
    end: float = 1.0
    by_sigma: bool = False
    on: bool = True

    def update(self, fraction: float, sigma: float, sigma_at: Callable[[float], float]) -> None:
        if self.by_sigma:
            self.on = sigma_at(self.end) <= sigma <= sigma_at(self.start)
        else:
            self.on = self.start <= fraction <= self.end


@dataclass(frozen=True)
class IPAttention:
    """One adapter's part of one cross-attention: weight · attn(q, to_k_ip(tokens), to_v_ip(tokens)), or
    nothing while its gate is off."""

    layer: IPLayer
    tokens: int
    scale: float
    gate: Gate

    def __call__(self, q: Tensor, tokens: Tensor, heads: int, impl: str) -> Tensor:
        if not self.gate.on:
            return q.new_zeros(())
        k, v = self.layer.to_k_ip(tokens), self.layer.to_v_ip(tokens)
        return self.scale * attention(q, k, v, heads, impl=impl)


@dataclass
class PreparedIP:
    """A request's image prompts made ready once: each U-Net cross-attention's adapter parts, every
    adapter's tokens joined in order for the conditional and unconditional sides (1, N, context_dim), and
    the adapters' gates."""

    attentions: list[tuple[IPAttention, ...]]
    cond: Tensor
    uncond: Tensor
    gates: list[Gate] = field(default_factory=list)

    def update(self, fraction: float, sigma: float, sigma_at: Callable[[float], float]) -> None:
        """Switch each adapter on or off for the U-Net call at step share `fraction` and σ."""
        for gate in self.gates:
            gate.update(fraction, sigma, sigma_at)


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
    if isinstance(spec.clip_vision, str):
        return _find(spec.clip_vision, CLIP_VISION_FOLDERS, "CLIP vision model")
    found = [adapter.parent / "image_encoder"] if (adapter.parent / "image_encoder").is_dir() else []
    for folder in (root / sub for root in model_dirs() for sub in CLIP_VISION_FOLDERS):
        found += sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    if len(found) != 1:
        raise CheckpointError(
            f"{adapter}: {'several' if found else 'no'} CLIP vision models found; name one (--clip-vision)"
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
    adapter: IPAdapterModel = build_module(IPAdapterModel, cfg, sd, str(path), dtype, device)  # type: ignore[assignment]
    adapter.source = str(path)
    return adapter


def prepare_ip_adapters(specs: Sequence[IPAdapterSpec], unet: UNetModel) -> PreparedIP | None:
    """Load each adapter and its image encoder (unless given loaded), check the adapter fits the U-Net and
    encode its image once. When the U-Net is offloaded, the projection and the encoder are offloaded as it
    is (`sdlab.offload.follow`) and the adapter's key/value layers stay on the CPU, cast per call."""
    if not specs:
        return None
    dtype = compute_dtype(unet)
    attns = cross_attentions(unet)
    per_layer: list[list[IPAttention]] = [[] for _ in attns]
    conds, unconds, gates = [], [], []
    for spec in specs:
        adapter = _adapter(spec, dtype, unet)
        check_fit(adapter, unet)
        cond, uncond = adapter.image_tokens(*_encoder_inputs(spec, adapter, dtype, unet))
        conds.append(cond)
        unconds.append(uncond)
        gates.append(Gate(spec.start, spec.end, by_sigma=spec.convention == "comfy"))
        for parts, (number, _) in zip(per_layer, adapter.cfg.layers, strict=True):
            layer = adapter.ip_adapter[str(number)]
            parts.append(IPAttention(layer, cond.shape[1], spec.weight, gates[-1]))  # type: ignore[arg-type]
    cond, uncond = torch.cat(conds, dim=1), torch.cat(unconds, dim=1)
    return PreparedIP([tuple(p) for p in per_layer], cond, uncond, gates)


def _adapter(spec: IPAdapterSpec, dtype: torch.dtype, unet: UNetModel) -> IPAdapterModel:
    if isinstance(spec.model, IPAdapterModel):
        adapter = spec.model
    else:
        path = _find(spec.model, IP_ADAPTER_FOLDERS, "IP-Adapter file")
        adapter = load_ip_adapter(path, dtype, home_device(unet))
    if not follow(adapter.image_proj, unet):
        adapter.to(device_of(unet), dtype)
    return adapter


def check_fit(adapter: IPAdapterModel, unet: UNetModel) -> None:
    """The adapter's layers number the U-Net's cross-attentions 1, 3, 5, ... with their inner widths, at
    the U-Net's context width (an SD1.5 adapter on SDXL, or the reverse, is refused by name)."""
    layers = [(2 * i + 1, a.to_k.out_features) for i, a in enumerate(cross_attentions(unet))]
    if list(adapter.cfg.layers) != layers or adapter.cfg.context_dim != unet.cfg.context_dim:
        raise CheckpointError(
            f"{adapter.source}: this IP-Adapter's {len(adapter.cfg.layers)} cross-attention layers (context "
            f"width {adapter.cfg.context_dim}) do not fit the model's {len(layers)} ({unet.cfg.context_dim})"
        )


def _encoder_inputs(
    spec: IPAdapterSpec, adapter: IPAdapterModel, dtype: torch.dtype, unet: UNetModel
) -> tuple[CLIPVisionModel, Tensor, Tensor | None]:
    """The image encoder (on the U-Net's device, or offloaded as it is), the image's pixels and the negative
    side's (None: zero embeddings), as the spec's convention makes them."""
    device = device_of(unet)
    if isinstance(spec.clip_vision, CLIPVisionModel):
        encoder = spec.clip_vision
    else:
        encoder = load_clip_vision(_clip_vision_path(spec, Path(adapter.source)), dtype, home_device(unet))
    if not follow(encoder, unet):
        encoder.to(device, dtype)
    size, plus = encoder.cfg.image_size, adapter.cfg.resampler is not None
    given = encoder.cfg.width if plus else encoder.cfg.projection_dim
    if given != adapter.cfg.embed_dim:  # e.g. ip-adapter_sdxl (ViT-bigG's 1280) with ViT-H (1024)
        what = "hidden states" if plus else "image embeddings"
        raise CheckpointError(
            f"{adapter.source}: this IP-Adapter reads CLIP {what} of width {adapter.cfg.embed_dim}; the "
            f"CLIP vision model gives {given} (ViT-H: 1280 / 1024, ViT-bigG: 1664 / 1280, hidden / embedding)"
        )
    if spec.convention == "a1111" and plus:
        raise ValueError(
            f"{adapter.source}: 'plus' IP-Adapters through the A1111 API are not supported (the extension "
            "uses recorded negative image features that sdlab does not reproduce)"
        )
    assert spec.image is not None
    pixels, negative = _pixels(spec.image, size, spec.convention), None
    if spec.negative_image is not None:
        negative = _pixels(spec.negative_image, size, spec.convention)
    elif plus and spec.convention == "comfy":  # IPAdapter_plus: a black image's features
        negative = comfy_clip_pixels(torch.zeros(1, 3, size, size), size)
    elif plus:  # diffusers: the features of zero (normalised) pixels
        negative = torch.zeros_like(pixels)
    return encoder, pixels.to(device, dtype), None if negative is None else negative.to(device, dtype)


def _pixels(image: Picture, size: int, convention: str) -> Tensor:
    """The encoder's input pixels (1, 3, size, size) from an image by a convention's rules."""
    if convention == "comfy":
        assert isinstance(image, Tensor), "ComfyUI's IMAGE pixels"
        return comfy_clip_pixels(image, size)
    assert isinstance(image, Image.Image)
    return a1111_clip_pixels(image, size) if convention == "a1111" else preprocess_image(image, size)
