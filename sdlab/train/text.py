"""Text-encoder recipe: CLIP-style contrastive training of the CLIP text transformer (BPE tokens, causal
mask, EOS pooling) against a small convolutional image tower; the text encoder alone is exported."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.checkpoints.detect import detect_text
from sdlab.checkpoints.io import read_state_dict, write_safetensors
from sdlab.checkpoints.load import read_checkpoint
from sdlab.config import TextConfig
from sdlab.models.blocks import group_norm
from sdlab.models.clip import CLIPTextModel
from sdlab.text.tokenizer import CLIPTokenizer
from sdlab.train.data import DataConfig, build_dataset
from sdlab.train.loop import Batch, LoopConfig, Loss, Ranks, Task, run
from sdlab.train.presets import MINI_TEXT

ARTEFACT = "text_encoder.safetensors"


@dataclass(frozen=True)
class TextTrainConfig:
    """The text encoder to train, its data, and the contrastive heads (dropped at export)."""

    text: TextConfig = MINI_TEXT
    data: DataConfig = DataConfig()
    loop: LoopConfig = LoopConfig()
    embed_dim: int = 128  # shared image/text embedding width
    image_width: int = 32  # channels of the image tower's first stage
    init: str | None = None  # start from this text encoder file instead of random weights


class Tokens:
    """Captions -> (B, max_length) CLIP token ids (BOS, tokens, EOS, padding), cached per caption."""

    def __init__(self, cfg: TextConfig, tokenizer: CLIPTokenizer | None = None) -> None:
        self.tokenizer = tokenizer or CLIPTokenizer.default()
        self.max_length, self.pad = cfg.max_positions, cfg.pad_token
        self.cache: dict[str, list[int]] = {}

    def __call__(self, captions: list[str], device: torch.device) -> Tensor:
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tokenizer.encode(c, max_length=self.max_length, pad_token=self.pad)
        return torch.tensor([self.cache[c] for c in captions], device=device)


class ImageTower(nn.Module):
    """Image (B, 3, S, S) -> (B, dim): four stride-2 conv stages (GroupNorm, SiLU; no bias before the norm),
    mean pool, Linear."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:], strict=False):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), group_norm(cout), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(chans[-1], dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.convs(x).mean(dim=(2, 3)))


class ContrastiveTrainer(nn.Module):
    """Symmetric InfoNCE over the global batch; captions that are identical count as matches."""

    def __init__(self, text: CLIPTextModel, cfg: TextTrainConfig) -> None:
        super().__init__()
        self.text = text
        self.text_proj = nn.Linear(text.cfg.width, cfg.embed_dim, bias=False)
        self.image = ImageTower(cfg.image_width, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.tokens = Tokens(text.cfg)

    def forward(self, batch: Batch) -> Loss:
        ids = self.tokens(batch["caption"], batch["image"].device)
        txt = F.normalize(self.text_proj(self.text(ids).pooled), dim=-1)
        img = F.normalize(self.image(batch["image"]), dim=-1)
        txt, img, ids = batch.gather(txt), batch.gather(img), batch.gather(ids)
        logits = self.logit_scale.exp().clamp(max=100) * img @ txt.T  # (N, N) over the global batch
        same = (ids[:, None] == ids[None]).all(dim=-1).float()
        targets = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        hits = same.gather(1, logits.argmax(dim=1, keepdim=True)).mean()
        return loss, {"accuracy": hits.detach()}


def read_text_encoder(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """A text encoder's tensors (transformers layout) and original layout, from a `text_encoder.safetensors`
    or the first encoder of any checkpoint."""
    sd = read_state_dict(path) if Path(path).is_file() else {}
    if any(k.startswith("text_model.") for k in sd):
        return sd, "openai"
    ckpt = read_checkpoint(path)
    if not ckpt.text:
        raise ValueError(f"{path}: holds no text encoder")
    return ckpt.text[0], ckpt.text_layouts[0]


def load_text_encoder(path: str | Path) -> tuple[CLIPTextModel, str]:
    """A CLIPTextModel with the weights of `path` (config detected from shapes), and its layout."""
    sd, layout = read_text_encoder(path)
    model = CLIPTextModel(detect_text(sd, layout, str(path)))
    model.load_state_dict(sd)
    return model, layout


def build(cfg: TextTrainConfig, ranks: Ranks) -> Task:
    """The contrastive task: text encoder (new or `init`), projection, image tower, temperature."""
    text = load_text_encoder(cfg.init)[0] if cfg.init else CLIPTextModel(cfg.text)
    trainer = ContrastiveTrainer(text, cfg)

    def export(path: Path) -> Path:
        sd = {k: v.detach().cpu() for k, v in text.state_dict().items()}
        return write_safetensors(sd, path, metadata={"format": "pt"})

    return Task(trainer, build_dataset(cfg.data, captions=True), export)


def train(cfg: TextTrainConfig, out_dir: str | Path, resume: bool = True) -> Path:
    """Train a text encoder contrastively; returns `out_dir/text_encoder.safetensors` (transformers keys)."""
    return run(lambda ranks: build(cfg, ranks), cfg, cfg.loop, out_dir, ARTEFACT, resume)
