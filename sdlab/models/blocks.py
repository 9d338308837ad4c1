"""Building blocks shared by the U-Net, the VAE and the text encoder.

Attribute names follow the original (ldm/sgm) checkpoints, so a state dict loads with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / √d + mask) v written out (diffusers' `AttnProcessor`), for devices without SDPA."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return (scores if mask is None else scores + mask).softmax(-1) @ v


SLICE_ELEMENTS = 2**26  # attention scores held at once by "sliced" (256 MiB in float32)


def _sliced(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """SDPA over slices of the queries, so the scores of a large image never exist whole."""
    rows = max(1, SLICE_ELEMENTS // (q.shape[0] * q.shape[1] * k.shape[-2]))
    out = [
        F.scaled_dot_product_attention(
            q[..., i : i + rows, :], k, v, None if mask is None else mask[i : i + rows]
        )
        for i in range(0, q.shape[-2], rows)
    ]
    return torch.cat(out, dim=-2)


ATTENTION = {"sdpa": F.scaled_dot_product_attention, "sliced": _sliced, "math": _math}
"""Attention implementations by name: PyTorch's fused SDPA (default), query-sliced SDPA for large images,
plain matrix products."""


def attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None, impl: str = "sdpa"
) -> Tensor:
    """Multi-head scaled dot-product attention over (B, T, heads*d) tensors."""
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
    out = ATTENTION[impl](q, k, v, mask)
    return out.transpose(1, 2).reshape(b, -1, inner)  # (B, T, heads*d)


def set_attention(module: nn.Module, impl: str) -> None:
    """Make every attention layer of `module` use the implementation `impl` (a key of ATTENTION)."""
    if impl not in ATTENTION:
        raise ValueError(f"attention {impl!r}: available are {', '.join(ATTENTION)}")
    for m in module.modules():
        if hasattr(m, "attention_impl"):
            m.attention_impl = impl


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as ldm's `GroupNorm32`)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def group_norm(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The 32-group normalisation used throughout Stable Diffusion."""
    return GroupNorm32(32, channels, eps=eps)


class CrossAttention(nn.Module):
    """Self- or cross-attention: `to_q/to_k/to_v` without bias, `to_out.0` with bias."""

    attention_impl = "sdpa"

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    ip: tuple = ()  # IP-Adapter attentions in use (sdlab.ip_adapter); their tokens end the context

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q = self.to_q(x)
        image_parts = []
        for ip in reversed(self.ip):  # decoupled cross-attention: text and each image prompt on its own
            context, tokens = context[:, : -ip.tokens], context[:, -ip.tokens :]
            image_parts.append(ip(q, tokens, self.heads, self.attention_impl))
        out = attention(q, self.to_k(context), self.to_v(context), self.heads, impl=self.attention_impl)
        for part in reversed(image_parts):
            out = out + part
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): one Linear gives value and gate."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width: keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image-to-token transformer of the U-Net; `proj_in/out` are 1x1 convs (SD1) or Linear (SD2+)."""

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)  # (B, C, H, W)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual
