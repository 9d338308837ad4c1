"""Fast mode: opt-in approximations of the U-Net that trade exactness for speed, each measured in
`bench/fast_mode.py` (speed-up, PSNR/SSIM against the exact image; figures in bench/FAST_MODE.md).

- Feature caching across steps (DeepCache, Ma et al. 2023): every `cache_interval` steps the whole U-Net
  runs and the input of output block N-1-`cache_branch` (the deep features) is kept; the steps between
  run only the shallow branch (input blocks 0..branch, the last branch+1 output blocks) on those features.
- Token merging (ToMe for SD, Bolya & Hoffman 2023): in the self-attention of the transformer blocks at
  the highest resolution that has attention, a share `tome_ratio` of the tokens is merged into similar
  ones (bipartite soft matching, one destination per 2x2 cell picked at random), attention runs on the
  rest, and its output is copied back to the merged tokens.

Both wrap the loaded U-Net for the span of `fast_mode(...)` and leave its modules and weights unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from sdlab.config import UNetConfig
from sdlab.models.blocks import CrossAttention
from sdlab.models.unet import UNetModel, embed, run_output_blocks

TokenMap = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class FastMode:
    """What fast mode approximates; the defaults change nothing (interval 1, ratio 0)."""

    cache_interval: int = 1  # DeepCache: the whole U-Net every N steps, its shallow branch in between
    cache_branch: int = 1  # the skip level that stays computed: input blocks 0..branch, as many output
    tome_ratio: float = 0.0  # ToMe: share of the highest-resolution self-attention's tokens merged away

    def validate(self, cfg: UNetConfig | None = None) -> None:
        """Raise ValueError naming the first bad field (`cfg`: the U-Net whose blocks the branch counts)."""
        if self.cache_interval < 1:
            raise ValueError(f"fast.cache_interval must be >= 1, got {self.cache_interval}")
        blocks = None if cfg is None else sum(cfg.num_res_blocks) + len(cfg.channel_mult)
        if self.cache_branch < 0 or (blocks is not None and self.cache_branch >= blocks):
            raise ValueError(f"fast.cache_branch must be in 0..{'' if blocks is None else blocks - 1}")
        if not 0.0 <= self.tome_ratio < 1.0:
            raise ValueError(f"fast.tome_ratio must be in [0, 1), got {self.tome_ratio}")

    @property
    def exact(self) -> bool:
        """True when nothing is approximated."""
        return self.cache_interval == 1 and self.tome_ratio == 0

    @property
    def label(self) -> str:
        """The infotext value, e.g. `deepcache 3/1, tome 0.5` (interval/branch)."""
        parts = [f"deepcache {self.cache_interval}/{self.cache_branch}"] if self.cache_interval > 1 else []
        return ", ".join(parts + ([f"tome {self.tome_ratio:g}"] if self.tome_ratio else []))


# `--fast`: the fastest trade that stays >= 30 dB from the exact image at SD1.5 shapes (bench/FAST_MODE.md)
FAST_PRESET = FastMode(cache_interval=2, cache_branch=0, tome_ratio=0.5)


class FeatureCache:
    """The U-Net's forward with DeepCache: a new step begins when the timesteps change; on steps
    0, N, 2N, ... (and whenever nothing fits the call) the whole network runs and keeps its deep
    features per call of the step, on the others only the shallow branch runs on them."""

    def __init__(self, unet: UNetModel, interval: int, branch: int) -> None:
        self.unet, self.interval, self.branch = unet, interval, branch
        self.at = len(unet.output_blocks) - 1 - branch  # the first output block of the shallow branch
        self.step, self.call, self.last_t = -1, 0, None
        self.saved: dict[int, tuple[torch.Size, Tensor]] = {}

    def __call__(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor | None = None,
        control: Sequence[Tensor] | None = None,
        adapter: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        if self.last_t is None or not torch.equal(self.last_t, timesteps):
            self.step, self.call, self.last_t = self.step + 1, 0, timesteps
        key, self.call = self.call, self.call + 1
        saved = self.saved.get(key)
        if self.step % self.interval and saved is not None and saved[0] == x.shape:
            return self._shallow(saved[1], x, timesteps, context, y, control, adapter)
        return self._full(key, x, timesteps, context, y, control, *([] if adapter is None else [adapter]))

    def _full(self, key: int, x: Tensor, *args: object) -> Tensor:
        def keep(_module: object, inputs: tuple[Tensor, ...]) -> None:
            self.saved[key] = (x.shape, inputs[0])  # (B, deep + skip channels, h, w)

        hook = self.unet.output_blocks[self.at].register_forward_pre_hook(keep)
        try:
            return type(self.unet).forward(self.unet, x, *args)
        finally:
            hook.remove()

    def _shallow(
        self,
        joined: Tensor,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor | None,
        control: Sequence[Tensor] | None,
        adapter: Sequence[Tensor | None] | None,
    ) -> Tensor:
        unet = self.unet
        emb = embed(unet, unet.cfg, timesteps, y, x.dtype)
        skips, h = [], x
        for i, module in enumerate(unet.input_blocks[: self.branch + 1]):
            h = module(h, emb, context)
            if adapter is not None and adapter[i] is not None:  # T2I-Adapter features, as the forward adds
                h = h + adapter[i]
            skips.append(h)
        if control is not None:  # the ControlNet residuals of the blocks that still run
            skips = [s + c for s, c in zip(skips, control, strict=False)]
        deep = joined[:, : joined.shape[1] - skips[-1].shape[1]]
        h = run_output_blocks(unet.output_blocks[self.at :], deep, skips, emb, context)
        return unet.out(h)


def bipartite_merge(
    x: Tensor, h: int, w: int, r: int, generator: torch.Generator
) -> tuple[TokenMap, TokenMap]:
    """ToMe-SD's bipartite soft matching of tokens x (B, h*w, C) on an h x w grid: one destination
    token per 2x2 cell (picked at random), the `r` source tokens most similar (cosine) to a destination
    merged into it by mean. Returns (merge, unmerge): (B, N, C) -> (B, N - r, C) and back."""
    b, n, _ = x.shape
    hs, ws = h // 2, w // 2
    pick = torch.randint(4, (hs, ws, 1), generator=generator).to(x.device)
    cells = torch.zeros(hs, ws, 4, dtype=torch.int64, device=x.device).scatter_(2, pick, -1)
    grid = torch.zeros(h, w, dtype=torch.int64, device=x.device)  # -1: destination
    grid[: hs * 2, : ws * 2] = cells.view(hs, ws, 2, 2).transpose(1, 2).reshape(hs * 2, ws * 2)
    order = grid.reshape(1, n, 1).argsort(dim=1, stable=True)  # destinations first
    dst_of, src_of = order[:, : hs * ws], order[:, hs * ws :]  # (1, Nd, 1), (1, Ns, 1) token indices
    r = min(r, src_of.shape[1])
    metric = x / x.norm(dim=-1, keepdim=True)
    src, dst = _take(metric, src_of), _take(metric, dst_of)
    best, best_dst = (src @ dst.transpose(-1, -2)).max(dim=-1)  # (B, Ns)
    ranked = best.argsort(dim=-1, descending=True)[..., None]
    kept, merged = ranked[:, r:], ranked[:, :r]  # (B, Ns - r, 1), (B, r, 1) source positions
    into = best_dst[..., None].gather(1, merged)  # (B, r, 1) destination positions

    def merge(t: Tensor) -> Tensor:
        s, d = _take(t, src_of), _take(t, dst_of)
        d = d.scatter_reduce(1, _wide(into, t), _take(s, merged), reduce="mean")
        return torch.cat([_take(s, kept), d], dim=1)

    def unmerge(t: Tensor) -> Tensor:
        k = kept.shape[1]
        unm, d = t[:, :k], t[:, k:]
        out = t.new_empty(t.shape[0], n, t.shape[2])
        out.scatter_(1, _wide(dst_of.expand(b, -1, -1), t), d)
        out.scatter_(1, _wide(src_of.expand(b, -1, -1).gather(1, kept), t), unm)
        out.scatter_(1, _wide(src_of.expand(b, -1, -1).gather(1, merged), t), _take(d, into))
        return out

    return merge, unmerge


def _wide(index: Tensor, like: Tensor) -> Tensor:
    """(B or 1, k, 1) token indices expanded over the batch and channels of `like`."""
    return index.expand(like.shape[0], -1, like.shape[2])


def _take(t: Tensor, index: Tensor) -> Tensor:
    """The tokens of t (B, N, C) at `index` (B or 1, k, 1)."""
    return t.gather(1, _wide(index, t))


def _level_sizes(h: int, w: int, levels: int) -> list[tuple[int, int]]:
    """The latent size at each U-Net level (stride-2 convolutions with padding 1: ceil halves)."""
    sizes = [(h, w)]
    for _ in range(levels - 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


def top_attention_level(cfg: UNetConfig) -> int | None:
    """The highest-resolution level with a transformer on the down or up path (None: no attention)."""
    levels, block, found = cfg.num_res_blocks, 0, []
    for level, n in enumerate(levels):
        found += [level] if any(cfg.transformer_depth[block : block + n]) else []
        block += n
    block = 0
    for level in reversed(range(len(levels))):
        found += [level] if any(cfg.transformer_depth_output[block : block + levels[level] + 1]) else []
        block += levels[level] + 1
    return min(found, default=None)


class TokenMerging:
    """Self-attention with ToMe on the blocks whose token count is the top attention level's grid."""

    def __init__(self, unet: UNetModel, ratio: float) -> None:
        self.ratio, self.level = ratio, top_attention_level(unet.cfg)
        self.levels = len(unet.cfg.channel_mult)
        self.grid: tuple[int, int] | None = None  # set from each call's latents
        self.generator = torch.Generator().manual_seed(0)  # the same cells for the same request

    def attend(self, attn: CrossAttention, x: Tensor, context: Tensor | None = None) -> Tensor:
        """`attn`'s forward, with merged tokens when x (B, N, C) is at the top attention level."""
        h, w = self.grid or (0, 0)
        r = int(x.shape[1] * self.ratio)
        if context is not None or h * w != x.shape[1] or r == 0:
            return CrossAttention.forward(attn, x, context)
        merge, unmerge = bipartite_merge(x, h, w, r, self.generator)
        return unmerge(CrossAttention.forward(attn, merge(x)))

    def see(self, x: Tensor) -> None:
        """Note the grid of the top attention level for latents x (B, C, H, W)."""
        if self.level is not None:
            self.grid = _level_sizes(x.shape[-2], x.shape[-1], self.levels)[self.level]


@contextmanager
def fast_mode(unet: UNetModel, fast: FastMode | None) -> Iterator[None]:
    """Within the block, `unet(...)` runs with `fast`'s approximations (nothing changes when it is None
    or exact); a new block starts with an empty cache and the same random cells."""
    if fast is None or fast.exact:
        yield
        return
    fast.validate(unet.cfg)
    cache = FeatureCache(unet, fast.cache_interval, fast.cache_branch)
    tome = TokenMerging(unet, fast.tome_ratio) if fast.tome_ratio else None
    attns = [m.attn1 for m in unet.modules() if hasattr(m, "attn1")] if tome else []

    def forward(x: Tensor, *args: object, **kwargs: object) -> Tensor:
        if tome is not None:
            tome.see(x)
        return cache(x, *args, **kwargs)

    unet.forward = forward  # type: ignore[method-assign]
    for attn in attns:
        attn.forward = lambda x, context=None, attn=attn: tome.attend(attn, x, context)  # type: ignore
    try:
        yield
    finally:
        del unet.forward
        for attn in attns:
            del attn.forward
