"""The CLIP text transformer in the OpenAI/transformers layout (`text_model.*`).

SD1's `cond_stage_model.transformer.*` loads as is; OpenCLIP files (SD2, SDXL's second encoder) are
mapped onto this layout by `sdlab.checkpoints.keymaps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.config import TextConfig
from sdlab.models.blocks import attention


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.token_embedding(ids)
        return x + self.position_embedding.weight[: ids.shape[1]].to(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.act = quick_gelu if cfg.act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm causal self-attention and MLP, each residual."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


@dataclass
class TextOutput:
    """Hidden states of a CLIP text encoder for a batch of token ids."""

    hidden_states: list[Tensor]  # embeddings output, then each layer's output: (B, T, width)
    last: Tensor  # final layer after final_layer_norm
    pooled: Tensor  # last at the EOS position, through text_projection when the model has one

    def layer(self, clip_skip: int) -> Tensor:
        """Output of layer -clip_skip (1 = last, 2 = penultimate), before the final layer norm."""
        return self.hidden_states[-clip_skip]


class CLIPTextModel(nn.Module):
    """Token ids (B, T) -> hidden states of every layer, final-normed output and pooled vector."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = TextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, ids: Tensor) -> TextOutput:
        tm = self.text_model
        t = ids.shape[1]
        x = tm.embeddings(ids)
        mask = torch.full((t, t), float("-inf"), dtype=x.dtype, device=x.device).triu(1)  # causal
        hidden = [x]
        for layer in tm.encoder.layers:
            x = layer(x, mask)
            hidden.append(x)
        last = tm.final_layer_norm(x)
        eos = self._eos_positions(ids)
        pooled = last[torch.arange(ids.shape[0], device=ids.device), eos]
        if self.cfg.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return TextOutput(hidden_states=hidden, last=last, pooled=pooled)

    def encode(self, ids: Tensor, layer: int = 1, final_norm: bool = True) -> tuple[Tensor, Tensor]:
        """(hidden states of layer `layer` from the end (1 = last), pooled output).

        The layer's output goes through the final layer norm when `final_norm` (SD1/SD2 do; SDXL's
        encoders do not, even for the last layer, as ComfyUI); the pooled output always comes from the
        last layer, final-normed and projected."""
        out = self(ids)
        if layer <= 1 and final_norm:
            return out.last, out.pooled
        z = out.layer(max(layer, 1))
        return (self.text_model.final_layer_norm(z) if final_norm else z), out.pooled

    def _eos_positions(self, ids: Tensor) -> Tensor:
        """Index of the first EOS token of each row (the highest id when the vocab's EOS is last)."""
        is_eos = (ids == self.cfg.eos_token).int()
        return torch.where(is_eos.any(dim=1), is_eos.argmax(dim=1), ids.argmax(dim=1))
