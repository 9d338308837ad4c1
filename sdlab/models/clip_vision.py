"""The CLIP image encoder in transformers' `CLIPVisionModelWithProjection` layout (`vision_model.*`,
`visual_projection.weight`), as ComfyUI's `clip_vision` files and diffusers' image_encoder folders store it.

Its encoder layers are the text transformer's (`sdlab.models.clip`) without the causal mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sdlab.config import TextConfig
from sdlab.models.clip import Encoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (CLIPImageProcessor's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP ViT: ViT-L/14 (OpenAI, quick_gelu), ViT-H/14 and ViT-bigG/14 (OpenCLIP, gelu)."""

    width: int = 1280
    layers: int = 32
    heads: int = 16
    intermediate: int = 5120
    patch: int = 14
    image_size: int = 224
    projection_dim: int = 1024
    act: str = "gelu"

    @property
    def encoder(self) -> TextConfig:
        """The encoder layers' settings, which the text transformer's layers read."""
        sizes = {"width": self.width, "layers": self.layers, "heads": self.heads}
        return TextConfig(**sizes, intermediate=self.intermediate, act=self.act)  # type: ignore[arg-type]

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> VisionConfig:
        """The config from tensor shapes. Heads: 64 channels each up to ViT-L's width, 16 beyond (ViT-H,
        bigG); the activation is quick_gelu only for OpenAI's ViT-L (24 layers of 1024), as ComfyUI's."""
        patch = sd["vision_model.embeddings.patch_embedding.weight"]
        width = patch.shape[0]
        layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
        positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
        return cls(
            width=width,
            layers=layers,
            heads=max(1, width // 64) if width <= 1024 else 16,
            intermediate=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            patch=patch.shape[-1],
            image_size=patch.shape[-1] * math.isqrt(positions - 1),
            projection_dim=sd["visual_projection.weight"].shape[0],
            act="quick_gelu" if (width, layers) == (1024, 24) else "gelu",
        )


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch) ** 2 + 1, cfg.width)

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 1 + patches, width) in the pixels' dtype, on their device (an offloaded encoder's weights are
        cast there, `sdlab.offload`)."""
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width)  # (sic) transformers' key
        self.encoder = Encoder(cfg.encoder)
        self.post_layernorm = nn.LayerNorm(cfg.width)


@dataclass
class VisionOutput:
    hidden_states: list[Tensor]  # after pre_layrnorm, then each layer's output: (B, 1 + patches, width)
    image_embeds: Tensor  # the class token through post_layernorm and visual_projection: (B, projection_dim)


class CLIPVisionModel(nn.Module):
    """Normalised pixels (B, 3, S, S) -> every layer's hidden states and the projected image embedding."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, pixels: Tensor) -> VisionOutput:
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels))
        hidden = [x]
        for layer in vm.encoder.layers:
            x = layer(x, None)
            hidden.append(x)
        pooled = vm.post_layernorm(x[:, 0])
        return VisionOutput(hidden, self.visual_projection(pooled))


def preprocess_image(image: Image.Image, size: int) -> Tensor:
    """(1, 3, size, size) pixels as transformers' CLIPImageProcessor makes them: RGB, the shortest side
    resized to `size` (PIL bicubic, the long side truncated), centre crop, /255, CLIP mean and std."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    image = image.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
    top, left = (image.height - size) // 2, (image.width - size) // 2
    x = np.asarray(image)[top : top + size, left : left + size].astype(np.float64) * (1 / 255)
    x = (x.astype(np.float32) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def comfy_clip_pixels(image: Tensor, size: int) -> Tensor:
    """(B, 3, size, size) pixels as ComfyUI's `clip_preprocess` makes them from IMAGE pixels in [0, 1]
    (B, 3, H, W): the shorter side scaled to `size` (torch bicubic, antialiased, rounded sizes), centre crop,
    quantised to 8 bits, CLIP mean and std."""
    h, w = image.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        image = F.interpolate(
            image, size=(round(scale * h), round(scale * w)), mode="bicubic", antialias=True
        )
        top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
        image = image[..., top : top + size, left : left + size]
    image = torch.clip(255.0 * image, 0, 255).round() / 255.0
    mean, std = (torch.tensor(v, dtype=image.dtype).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (image - mean) / std


def a1111_clip_pixels(image: Image.Image, size: int) -> Tensor:
    """(1, 3, size, size) pixels as sd-webui-controlnet's ClipVisionDetector makes them: the RGB image
    squashed to size x size by OpenCV's INTER_AREA (needs opencv-python; not for an image of that size),
    then CLIPImageProcessor (which leaves that size as it is)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        try:
            import cv2
        except ImportError as e:
            raise ValueError(
                f"an IP-Adapter image of {image.width}x{image.height}: squashing it to {size}x{size} as the "
                "A1111 extension does needs OpenCV (pip install opencv-python-headless)"
            ) from e
        image = Image.fromarray(cv2.resize(np.asarray(image), (size, size), interpolation=cv2.INTER_AREA))
    return preprocess_image(image, size)
