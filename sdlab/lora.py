"""LoRA for the U-Net and text encoders: kohya-format files, training layers, exact reversible merging.

Names are kohya sd-scripts' (`networks/lora.py`), which AUTOMATIC1111 and ComfyUI read: `lora_unet_` + the
diffusers module path (SD1/SD2) or the original LDM path (SDXL, whose kohya U-Net keeps LDM names), and
the family's text prefix (`lora_te_`; `lora_te1_`/`lora_te2_` for SDXL's two encoders) + the
transformers CLIP path, dots as underscores; the family record (`sdlab.families`) says which.
Each module stores `lora_down.weight` (rank, in[, kh, kw]), `lora_up.weight` (out, rank[, 1,
1]) and `alpha`; its update is ΔW = alpha/rank · up @ down. Loading accepts both U-Net namings; saving uses
the one kohya writes for the family. The diffusers names come from `keymaps.unet_ldm_to_diffusers`, so
there is one U-Net key map in the project.

Files in other formats are read too, into one representation (`Update`, one per module): LyCORIS LoHa,
LoKr and LoCon-Tucker, DoRA (`dora_scale`, PEFT `lora_magnitude_vector`), diffusers/PEFT `lora_A`/`lora_B`
under dotted module paths (`unet.down_blocks...`, `text_encoder[_2].[text_model.]encoder...`) with alphas
from `.alpha` tensors or the `lora_adapter_metadata` header, and the old diffusers attention-processor
layout. Formulas follow LyCORIS (`lycoris/functional`, `modules/*.apply_weight_decompose`), ComfyUI
(`comfy/weight_adapter/{lora,loha,lokr,base}.py`) and PEFT (`tuners/lora/layer.py`, `dora.py`); see
`Update`.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from sdlab.checkpoints import keymaps
from sdlab.checkpoints.io import read_metadata, read_state_dict, write_safetensors
from sdlab.families import Family, Naming
from sdlab.finite import check_finite
from sdlab.models.blocks import SpatialTransformer
from sdlab.models.clip import MLP, SelfAttention
from sdlab.models.unet import Downsample, ResBlock, Upsample
from sdlab.offload import at_home

if TYPE_CHECKING:
    from sdlab.checkpoints.load import StableDiffusion

StateDict = dict[str, Tensor]
Layer = nn.Linear | nn.Conv2d
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
NON_FINITE_MERGE = "the LoRA's tensors hold NaN/Inf, or the merged weight overflowed its dtype"


class LoRAError(ValueError):
    """A LoRA file sdlab cannot read or merge; the message names the file and the key."""


def _layers(module: nn.Module) -> dict[str, Layer]:
    """Every Linear and Conv2d below `module`, by module path."""
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def unet_names(unet: nn.Module, naming: Naming) -> dict[str, str]:
    """Module path of every U-Net Linear/Conv2d -> its kohya name in `naming`."""
    paths = _layers(unet)
    if naming == "ldm":
        return {p: "lora_unet_" + p.replace(".", "_") for p in paths}
    # the key map renames keys and carries values along untouched: carry each LDM path as the value
    renamed = keymaps.unet_ldm_to_diffusers({f"{p}.weight": p for p in paths}, unet.cfg)  # type: ignore[arg-type]
    return {p: "lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k, p in renamed.items()}


def layer_map(unet: nn.Module, encoders: Sequence[nn.Module], family: Family) -> dict[str, Layer]:
    """Every kohya name a file may use for these networks (both U-Net namings) -> its layer."""
    out: dict[str, Layer] = {}
    unet_layers = _layers(unet)
    for naming in ("diffusers", "ldm"):
        out |= {name: unet_layers[p] for p, name in unet_names(unet, naming).items()}
    for encoder, spec in zip(encoders, family.text, strict=True):
        for path, layer in _layers(encoder).items():
            out[spec.kohya_prefix + path.replace(".", "_")] = layer
            if len(encoders) == 1:  # some files say lora_te1_ for a model's only encoder
                out["lora_te1_" + path.replace(".", "_")] = layer
    return out


def training_targets(
    unet: nn.Module,
    encoders: Sequence[nn.Module],
    family: Family,
    *,
    conv: bool = False,
    naming: Naming | None = None,
) -> dict[str, Layer]:
    """kohya's default LoRA targets by name: Linear and 1x1 convs of the U-Net's transformers, the text
    encoders' attention and MLP Linears, and with `conv` (LoCon) every layer of ResBlocks and resamplers.
    Names follow the family's kohya naming unless `naming` says otherwise."""
    names = unet_names(unet, naming or family.kohya_unet)
    kinds = (SpatialTransformer, ResBlock, Downsample, Upsample) if conv else (SpatialTransformer,)
    out = {names[p]: m for p, m in _targets_in(unet, kinds).items()}
    for encoder, spec in zip(encoders, family.text, strict=False):
        prefix = spec.kohya_prefix
        out |= {
            prefix + p.replace(".", "_"): m for p, m in _targets_in(encoder, (SelfAttention, MLP)).items()
        }
    return out


def _targets_in(root: nn.Module, kinds: tuple[type[nn.Module], ...]) -> dict[str, Layer]:
    """Linear/Conv2d layers inside modules of the given kinds, by path from `root`."""
    out: dict[str, Layer] = {}
    for name, module in root.named_modules():
        if isinstance(module, kinds):
            out |= {f"{name}.{p}": m for p, m in _layers(module).items()}
    return out


def _is_conv3x3(layer: Layer) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)


# ---------------------------------------------------------------------------------------------
# training layers


class LoRAModule(nn.Module):
    """The low-rank update of one layer: `lora_down` (the layer's own kernel/stride) then 1x1 `lora_up`."""

    def __init__(self, base: Layer, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.lora_down: Layer = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False
            )
            self.lora_up: Layer = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_up.weight)  # a zero update at first; down keeps nn default init
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / rank
        self.multiplier = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return self.lora_up(self.lora_down(x)) * (self.scale * self.multiplier)


class LoRANetwork(nn.Module):
    """LoRA modules named by their kohya names, added to their layers' outputs by forward hooks.

    `state_dict()` is a kohya LoRA file's content; the base layers are never modified.
    """

    def __init__(
        self,
        targets: Mapping[str, Layer],
        rank: int,
        alpha: float,
        conv_rank: int | None = None,
        conv_alpha: float | None = None,
    ) -> None:
        super().__init__()
        self._hooks = []
        for name, layer in targets.items():
            r, a = (conv_rank, conv_alpha) if _is_conv3x3(layer) and conv_rank else (rank, alpha)
            lora = LoRAModule(layer, r, r if a is None else a)
            self.add_module(name, lora)
            self._hooks.append(
                layer.register_forward_hook(lambda m, args, out, lora=lora: out + lora(args[0]))
            )

    def remove(self) -> None:
        """Detach from the base layers (they compute without LoRA again)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


# ---------------------------------------------------------------------------------------------
# files: every common format, parsed into one representation (`Update`)

# kohya / LyCORIS tensors of one module (the module name has no dots: `lora_unet_...`, `lora_te1_...`)
_KOHYA_NAME = re.compile(r"^((?:lora|lycoris)_(?:unet|te\d*)_[^.]+)\.(.+)$")
_KOHYA_PARTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    **{p: p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{p: p for p in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}
_OLD_ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TEXT_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# diffusers / PEFT and old diffusers tensors (dotted module paths): pattern -> (module, part)
_DOTTED: list[tuple[re.Pattern[str], object]] = [
    # PEFT: lora_A / lora_B, with or without the adapter name PEFT keeps inside a model ("default")
    (
        re.compile(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$"),
        lambda m: (m[1], "down" if m[2] == "A" else "up"),
    ),
    (re.compile(r"^(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"), lambda m: (m[1], "magnitude")),
    # diffusers attention processors (<= 0.20): attn1.processor.to_q_lora.down.weight
    (
        re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"),
        lambda m: (f"{m[1]}.{_OLD_ATTN[m[2]]}", m[3]),
    ),
    (
        re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(?:network_)?alpha$"),
        lambda m: (f"{m[1]}.{_OLD_ATTN[m[2]]}", "alpha"),
    ),
    # diffusers text-encoder LoRA (0.14-0.16): self_attn.to_q_lora.down.weight
    (
        re.compile(r"^(.+\.self_attn)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"),
        lambda m: (f"{m[1]}.{_OLD_TEXT_ATTN[m[2]]}", m[3]),
    ),
    # diffusers LoRACompatible layers (0.17-0.24): to_q.lora.down.weight, q_proj.lora_linear_layer.up.weight
    (re.compile(r"^(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$"), lambda m: (m[1], m[2])),
    (re.compile(r"^(.+)\.(?:network_)?alpha$"), lambda m: (m[1], "alpha")),
]
UNET_FOLDER = "unet"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry: the LoraConfig(s) as JSON
DoRAMode = Literal["lycoris", "peft"]


@dataclass(frozen=True)
class Update:
    """One module's update, whatever format it came in. `kind` says how `tensors` combine:

    - "lora" (kohya LoRA/LoCon, PEFT, old diffusers): ΔW = up @ down, or with `mid` (LoCon Tucker)
      einsum("m n ..., i m, n j -> i j ...", mid, up, down) (ComfyUI `tucker_weight_from_conv`);
    - "loha": ΔW = (w1a @ w1b) ⊙ (w2a @ w2b), with Tucker cores t1/t2
      einsum("i j k l, j r, i p -> p r k l", t, wb, wa) per factor (LyCORIS `functional/loha.py`, ComfyUI
      `comfy/weight_adapter/loha.py`); rank = w1b.shape[0];
    - "lokr": ΔW = kron(w1, w2), each factor full or a product w_a @ w_b (w2 possibly Tucker as above);
      rank = the decomposed factor's inner dimension (w2's when both are), none when both are full
      (ComfyUI `comfy/weight_adapter/lokr.py`).

    All are multiplied by `scale` (alpha/rank; 1 without alpha or rank; alpha/√r for rsLoRA). `magnitude`
    is a DoRA magnitude: `dora="lycoris"` for kohya/LyCORIS `dora_scale`, "peft" for PEFT's
    `lora_magnitude_vector` (see `merged`). `keys` are the file's keys for this module, for errors.
    """

    kind: str
    tensors: dict[str, Tensor]
    scale: float
    rank: int | None = None
    alpha: float | None = None
    magnitude: Tensor | None = None
    dora: DoRAMode | None = None
    keys: tuple[str, ...] = ()

    # kohya LoRA views, as before
    @property
    def down(self) -> Tensor:
        return self.tensors["down"]

    @property
    def up(self) -> Tensor:
        return self.tensors["up"]

    def delta(self, shape: torch.Size) -> Tensor:
        """scale · ΔW in float32, shaped like the layer weight (Linear, 1x1 or kxk conv). The product's
        shape is worked out on meta tensors first: factors of a hostile file (a LoKr kron of two 300²
        factors is 90000²) are refused before anything of that size is allocated."""
        _check_fits(self._product({k: v.to("meta") for k, v in self.tensors.items()}).shape, shape)
        return self._product(self.tensors).reshape(shape) * self.scale

    def _product(self, tensors: dict[str, Tensor]) -> Tensor:
        """ΔW unscaled, in float32, in the shape the factors give."""
        t = {k: v.float() for k, v in tensors.items()}
        if self.kind == "lora":
            if "mid" in t:
                product = torch.einsum(
                    "m n ..., i m, n j -> i j ...", t["mid"], t["up"].flatten(1), t["down"].flatten(1)
                )
            else:
                product = _mm(t["up"].flatten(1), t["down"].flatten(1))
        elif self.kind == "loha":
            product = _factor(t, "hada_w1_a", "hada_w1_b", "hada_t1") * _factor(
                t, "hada_w2_a", "hada_w2_b", "hada_t2"
            )
        else:  # lokr
            w1 = t["lokr_w1"] if "lokr_w1" in t else _mm(t["lokr_w1_a"], t["lokr_w1_b"])
            w2 = t["lokr_w2"] if "lokr_w2" in t else _factor(t, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
            while w1.ndim < w2.ndim:
                w1 = w1.unsqueeze(-1)
            product = _kron(w1, w2)
        return product

    def merged(self, weight: Tensor, strength: float) -> Tensor:
        """The new weight for `weight` at `strength`, in float32.

        Without DoRA: W + strength·ΔW. With a LyCORIS/kohya `dora_scale` m: V = W + ΔW, normed per output
        channel when m has shape (out, 1, ...) and per input channel when (1, in, ...) (LyCORIS
        `apply_weight_decompose`, `wd_on_out`), W₁ = m·V/(‖V‖ + eps), then W + strength·(W₁ − W) as A1111
        and ComfyUI apply a strength (`weight_decompose`; LyCORIS' own multiplier keeps (1−s)·ΔW on top,
        the same at strength 1; ComfyUI's output-axis branch norms W instead of V, we follow LyCORIS).
        With a PEFT magnitude m (out,): V = W + strength·ΔW, m·V/‖V‖ normed per output channel, as PEFT's
        `DoraLinearLayer`/`DoraConv2dLayer` merge once the strength is folded into the scaling (diffusers'
        `set_adapters`/`fuse_lora(lora_scale)`).
        """
        w = weight.float()
        if self.magnitude is None:
            return w + strength * self.delta(w.shape)
        m = self.magnitude.float()
        if self.dora == "peft":
            if m.numel() != w.shape[0]:
                raise ValueError(
                    f"DoRA magnitude of shape {tuple(m.shape)} does not fit a weight {tuple(w.shape)}"
                )
            v = w + strength * self.delta(w.shape)
            norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.ndim)), keepdim=True)
            return m.reshape(norm.shape) * v / norm
        v = w + self.delta(w.shape)
        if m.shape[0] == w.shape[0] and m.numel() == w.shape[0]:
            dims = tuple(range(1, v.ndim))  # per output channel
        elif m.shape[0] == 1 and m.ndim > 1 and m.numel() == w.shape[1] and m.shape[1] == w.shape[1]:
            dims = (0, *range(2, v.ndim))  # per input channel
        else:
            raise ValueError(f"dora_scale of shape {tuple(m.shape)} does not fit a weight {tuple(w.shape)}")
        norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True) + torch.finfo(torch.float32).eps
        full = v * (m.reshape(norm.shape) / norm)
        return w + strength * (full - w)


def _check_fits(update: torch.Size, shape: torch.Size) -> None:
    """Refuse an update that is not the layer weight's shape (a Linear's or 1x1 conv's may be flat)."""
    if update[0] != shape[0] or update.numel() != shape.numel() or (len(update) > 2 and update != shape):
        raise ValueError(f"update of shape {tuple(update)} does not fit a weight {tuple(shape)}")


def _kron(a: Tensor, b: Tensor) -> Tensor:
    """torch.kron; on meta tensors only the shape (torch's meta kron takes seconds on a large product)."""
    if not a.is_meta:
        return torch.kron(a, b)
    n = max(a.ndim, b.ndim)
    sizes = zip((1,) * (n - a.ndim) + tuple(a.shape), (1,) * (n - b.ndim) + tuple(b.shape), strict=True)
    return torch.empty([x * y for x, y in sizes], device="meta")


def _mm(a: Tensor, b: Tensor) -> Tensor:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"factors of shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    return a @ b


def _factor(t: dict[str, Tensor], a: str, b: str, core: str) -> Tensor:
    """w_a @ w_b, or with a Tucker core einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a) (ComfyUI)."""
    if core in t:
        return torch.einsum("i j k l, j r, i p -> p r k l", t[core], t[b].flatten(1), t[a].flatten(1))
    return _mm(t[a].flatten(1), t[b].flatten(1))


def _split_key(key: str) -> tuple[str, str, str] | None:
    """key -> (module name, part, style) where style is "kohya", "peft" or "diffusers"; None: unknown."""
    m = _KOHYA_NAME.match(key)
    if m:
        part = _KOHYA_PARTS.get(m[2])
        return (m[1], part, "kohya") if part else None
    for pattern, result in _DOTTED:
        m = pattern.match(key)
        if m:
            module, part = result(m)  # type: ignore[operator]
            style = (
                "peft"
                if ".lora_A" in key or ".lora_B" in key or "lora_magnitude_vector" in key
                else "diffusers"
            )
            return module, part, style
    return None


_LORA_PARTS = {"down", "up", "mid"}
_LOHA_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
_LOKR_PARTS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


def parse_lora(
    sd: Mapping[str, Tensor], what: str = "LoRA", metadata: Mapping[str, str] | None = None
) -> dict[str, Update]:
    """Group a LoRA state dict of any supported format by module name, one `Update` each.

    Formats: kohya LoRA/LoCon (+ LoCon Tucker `lora_mid`), LyCORIS LoHa and LoKr (Tucker included), DoRA
    (`dora_scale` beside any of those, PEFT `lora_magnitude_vector`), diffusers/PEFT `lora_A`/`lora_B`
    (alpha from `.alpha` tensors, else from the `lora_adapter_metadata` header JSON in `metadata`:
    `lora_alpha`, `r`, `alpha_pattern`, `rank_pattern`, `use_rslora`, else scale 1), and the old diffusers
    attention-processor layout (`processor.to_q_lora.down.weight`). kohya alpha defaults to the rank
    (scale 1) as kohya does. Unknown tensors, incomplete modules and mixed formats are a LoRAError naming
    `what` (the file) and the key.
    """
    groups: dict[str, dict[str, Tensor]] = {}
    keys: dict[str, list[str]] = {}
    styles: dict[str, str] = {}
    for key, value in sd.items():
        split = _split_key(key)
        if split is None:
            raise LoRAError(
                f"{what}: unsupported LoRA tensor {key!r}; sdlab reads kohya LoRA/LoCon, LyCORIS LoHa/LoKr, "
                "DoRA and diffusers/PEFT layouts"
            )
        name, part, style = split
        group = groups.setdefault(name, {})
        if part in group:
            raise LoRAError(f"{what}: {key!r} repeats the {part} tensor of {name}")
        group[part] = value
        keys.setdefault(name, []).append(key)
        if style != "diffusers" or name not in styles:
            styles[name] = style
    config = _adapter_config(metadata, what)
    return {n: _update(n, g, tuple(keys[n]), styles[n], config, what) for n, g in groups.items()}


def _update(
    name: str, g: dict[str, Tensor], keys: tuple[str, ...], style: str, config: dict | None, what: str
) -> Update:
    def fail(problem: str) -> LoRAError:
        return LoRAError(f"{what}: {name} ({', '.join(keys)}): {problem}")

    parts = set(g) - {"alpha", "dora_scale", "magnitude"}
    kinds = [
        k for k, ps in (("lora", _LORA_PARTS), ("loha", _LOHA_PARTS), ("lokr", _LOKR_PARTS)) if parts & ps
    ]
    if len(kinds) != 1:
        raise fail(
            "mixes LoRA, LoHa and LoKr tensors" if kinds else "holds no update (an alpha or DoRA scale alone)"
        )
    kind = kinds[0]
    _check_shapes(g, parts, kind, fail)
    alpha = float(g["alpha"]) if "alpha" in g else None
    tensors = {k: v for k, v in g.items() if k in parts}
    if kind == "lora":
        if not {"down", "up"} <= parts:
            raise fail("incomplete LoRA (lacks lora_down/lora_up, lora_A/lora_B or down/up)")
        rank = tensors["down"].shape[0]
        if tensors["up"].flatten(1).shape[1] != rank:
            raise fail(
                f"up {tuple(tensors['up'].shape)} and down {tuple(tensors['down'].shape)} ranks differ"
            )
        if alpha is None and style == "kohya":
            alpha = float(rank)  # kohya: no alpha means scale 1
        elif alpha is None and style == "peft" and config is not None:
            alpha, rank = _config_alpha(name, config, rank, fail)
    elif kind == "loha":
        needed = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        if not needed <= parts or len(parts & {"hada_t1", "hada_t2"}) == 1:
            raise fail(f"incomplete LoHa (has {sorted(parts)})")
        rank = tensors["hada_w1_b"].shape[0]
    else:
        w1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
        w2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
        if not (w1 and w2):
            raise fail(f"incomplete LoKr (has {sorted(parts)})")
        rank = None  # ComfyUI: the last decomposed factor's inner dimension, none when both are full
        if "lokr_w1" not in parts:
            rank = tensors["lokr_w1_b"].shape[0]
        if "lokr_w2" not in parts:
            rank = tensors["lokr_w2_b"].shape[0]
    scale = alpha / rank if alpha is not None and rank else 1.0
    magnitude, dora = None, None
    if "dora_scale" in g and "magnitude" in g:
        raise fail("has both dora_scale and lora_magnitude_vector")
    if "dora_scale" in g:
        magnitude, dora = g["dora_scale"], "lycoris"
    elif "magnitude" in g:
        magnitude, dora = g["magnitude"], "peft"
    return Update(kind, tensors, scale, rank, alpha, magnitude, dora, keys)


def _check_shapes(g: dict[str, Tensor], parts: set[str], kind: str, fail: Callable[[str], LoRAError]) -> None:
    """Factors are matrices or kernels, an alpha one number, a DoRA scale a vector or more (else the
    formulas fail on them in other ways)."""
    label = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[kind]
    for part in sorted(parts):
        if g[part].ndim < 2:
            raise fail(f"{part} has shape {tuple(g[part].shape)}; {label} factors have 2 or more dimensions")
    if "alpha" in g and g["alpha"].numel() != 1:
        raise fail(f"alpha has shape {tuple(g['alpha'].shape)}; it is one number")
    for part in ("dora_scale", "magnitude"):
        if part in g and g[part].ndim == 0:
            raise fail(f"{part} is a scalar; a DoRA scale has one value per channel")


def _adapter_config(metadata: Mapping[str, str] | None, what: str) -> dict | None:
    """The `lora_adapter_metadata` JSON of a diffusers file, or None."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoRAError(f"{what}: unreadable {METADATA_KEY} metadata ({e})") from e
    return config if isinstance(config, dict) else None


def _config_alpha(
    name: str, config: dict, rank: int, fail: Callable[[str], ValueError]
) -> tuple[float | None, int]:
    """PEFT's scale for one module as (alpha, rank), scale = alpha/rank: lora_alpha or its alpha_pattern
    entry over r or its rank_pattern entry (alpha/√r with use_rslora), the patterns matched as PEFT's
    `get_pattern_key` does against the module path inside its component; (None, rank) without alpha."""
    component, _, inner = name.partition(".")
    if component in config and isinstance(config[component], dict):  # diffusers: {"unet": {...}, ...}
        cfg = config[component]
    elif "lora_alpha" in config or "r" in config:  # one LoraConfig for the whole file
        cfg, inner = config, name
    else:
        return None, rank
    if cfg is None:
        return None, rank
    r = int(_pattern(cfg.get("rank_pattern") or {}, inner, cfg.get("r", rank)))
    if r != rank:
        raise fail(f"holds rank {rank} but its LoRA config says r={r}")
    alpha = _pattern(cfg.get("alpha_pattern") or {}, inner, cfg.get("lora_alpha"))
    if alpha is None:
        return None, rank
    if cfg.get("use_rslora"):  # scale alpha/√r, written as an alpha over the rank: (alpha·√r)/r
        return float(alpha) * math.sqrt(r), rank
    return float(alpha), rank


def _pattern(patterns: Mapping[str, object], path: str, default: object) -> object:
    """peft.utils.other.get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", path)."""
    for p, value in patterns.items():
        if re.match(rf"(.*\.)?({p})$", path):
            return value
    return default


def split_lora(sd: Mapping[str, Tensor]) -> tuple[StateDict, StateDict]:
    """(U-Net tensors, text-encoder tensors) of a LoRA of any supported format."""
    unet, text = {}, {}
    for key, value in sd.items():
        (unet if _is_unet_key(key) else text)[key] = value
    return unet, text


_UNET_ROOTS = (
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_in.",
    "conv_out.",
    "time_embedding.",
    "add_embedding.",
)


def _is_unet_key(key: str) -> bool:
    return key.startswith(("lora_unet_", "lycoris_unet_", f"{UNET_FOLDER}.", *_UNET_ROOTS))


class LoRAFile(dict):
    """A LoRA file's tensors (a plain dict to every reader) with `source` (the path) for messages."""

    source: str = "LoRA"


def read_lora(path: str | Path) -> StateDict:
    """The tensors of a LoRA file (.safetensors, or a weights-only pickle), checked by `parse_lora`.

    PEFT modules whose alpha only the header's `lora_adapter_metadata` holds get an `<module>.alpha`
    tensor (alpha for PEFT's scale alpha/r), so the state dict alone carries the scales."""
    sd = read_state_dict(path)
    metadata = read_metadata(path)
    parsed = parse_lora(sd, str(path), metadata)
    if _adapter_config(metadata, str(path)) is not None:
        for name, update in parsed.items():
            if update.kind == "lora" and not any(k.endswith("alpha") for k in update.keys) and update.rank:
                sd[f"{name}.alpha"] = torch.tensor(update.scale * update.rank)
    out = LoRAFile(sd)
    out.source = str(path)
    return out


def save_lora(sd: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a kohya LoRA .safetensors (never overwrites), with kohya's `ss_network_*` metadata."""
    lora = parse_lora(sd)
    ranks = sorted({w.rank for w in lora.values() if w.rank})
    alphas = sorted({w.alpha for w in lora.values() if w.alpha is not None})
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1]),
        "ss_network_alpha": str(alphas[-1]),
        **(metadata or {}),
    }
    return write_safetensors(dict(sd), path, metadata=meta)


# ---------------------------------------------------------------------------------------------
# merging


def dotted_layer_map(unet: nn.Module, encoders: Sequence[nn.Module], family: Family) -> dict[str, Layer]:
    """The dotted module paths diffusers/PEFT files use -> layer: `unet.<diffusers path>` (and the bare
    path, as `save_attn_procs` writes it), `<text folder>.<transformers path>` with and without the
    `text_model.` level (transformers 4 and 5 writers)."""
    out: dict[str, Layer] = {}
    unet_layers = _layers(unet)
    renamed = keymaps.unet_ldm_to_diffusers({f"{p}.weight": p for p in unet_layers}, unet.cfg)  # type: ignore[arg-type]
    for key, path in renamed.items():
        diffusers_path = key.removesuffix(".weight")
        out[diffusers_path] = out[f"{UNET_FOLDER}.{diffusers_path}"] = unet_layers[path]  # type: ignore[index]
    for encoder, spec in zip(encoders, family.text, strict=True):
        for path, layer in _layers(encoder).items():
            out[f"{spec.diffusers_folder}.{path}"] = layer
            out[f"{spec.diffusers_folder}.{path.removeprefix('text_model.')}"] = layer
    return out


def module_layers(unet: nn.Module, encoders: Sequence[nn.Module], family: Family) -> dict[str, Layer]:
    """Every module name a supported file may use (kohya names of both U-Net namings, dotted paths)."""
    return layer_map(unet, encoders, family) | dotted_layer_map(unet, encoders, family)


@dataclass
class MergedLoRAs:
    """LoRAs merged into a model's weights; `restore()` (or leaving the `with` block) puts back the
    original Parameter objects, so unmerging is exact."""

    originals: dict[Layer, nn.Parameter] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    def restore(self) -> None:
        at_home(self.originals)  # an offloaded network's CPU weights are the ones swapped (sdlab.offload)
        for layer, weight in self.originals.items():
            layer.weight = weight
        self.originals.clear()

    def __enter__(self) -> MergedLoRAs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def merge_loras(
    unet: nn.Module,
    encoders: Sequence[nn.Module],
    family: Family,
    loras: Sequence[tuple[Mapping[str, Tensor], float]],
    only: Sequence[nn.Module] | None = None,
) -> MergedLoRAs:
    """Merge LoRAs of any supported format, each with its strength, in order (computed in float32):
    W' = `Update.merged(W, strength)`, W + strength·ΔW without DoRA; `only`: merge into these networks
    alone (the U-Net, or the text encoders), the other modules left as they are.

    Names that fit no layer are reported in `unmatched`; a file where none fits is an error (a LoRA for
    another model family). Any error restores every weight already merged (all or nothing). A state dict
    from `read_lora` is named by its path in messages, others as "LoRA <index>".
    """
    layers = module_layers(unet, encoders, family)
    inside = None if only is None else {id(m) for net in only for m in net.modules()}
    at_home([unet, *encoders] if only is None else only)  # merged into the CPU weights (sdlab.offload)
    merged = MergedLoRAs()
    try:
        for index, (sd, strength) in enumerate(loras):
            what = getattr(sd, "source", None) or f"LoRA {index}"
            parsed = parse_lora(sd, what)
            found = [n for n in parsed if n in layers]
            if parsed and not found:
                raise LoRAError(
                    f"{what}: none of its {len(parsed)} modules fits this model, e.g. {next(iter(parsed))}"
                )
            chosen = [n for n in found if inside is None or id(layers[n]) in inside]
            for name in chosen:
                try:
                    _merge_one(layers[name], parsed[name], strength, merged)
                except (ValueError, RuntimeError) as e:
                    keys = ", ".join(parsed[name].keys)
                    raise LoRAError(f"{what}: {name} ({keys}): {e} (a LoRA for another model?)") from e
                check_finite(layers[name].weight, f"{what}: {name} merged at {strength}", NON_FINITE_MERGE)
            merged.applied += chosen
            merged.unmatched += [n for n in parsed if n not in layers]
    except BaseException:
        merged.restore()  # all or nothing
        raise
    return merged


def _merge_one(layer: Layer, update: Update, strength: float, merged: MergedLoRAs) -> None:
    """Replace the layer's weight by a new Parameter holding the merged weight (the old one is kept)."""
    w = layer.weight
    new = update.merged(w.detach(), strength)
    merged.originals.setdefault(layer, w)
    layer.weight = nn.Parameter(new.to(w.dtype), requires_grad=False)


def apply_lora(model: object, lora: Mapping[str, Tensor] | str | Path, strength: float = 1.0) -> MergedLoRAs:
    """Merge one LoRA (state dict or file) into a loaded model (`StableDiffusion`); restore() undoes it."""
    return apply_loras(model, [(lora, strength)])


def apply_loras(
    model: object, loras: Sequence[tuple[Mapping[str, Tensor] | str | Path, float]]
) -> MergedLoRAs:
    """Merge several LoRAs, each at its own strength, into a `StableDiffusion`'s U-Net and text encoders,
    on its base weights (a set `use_loras` keeps merged is taken out first)."""
    use_loras(model, ())  # type: ignore[arg-type]
    sds = [(read_lora(x) if isinstance(x, str | Path) else x, s) for x, s in loras]
    return merge_loras(model.unet, model.text_encoders, model.family, sds)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# the merged set a loaded model keeps between requests

LoRA = Mapping[str, Tensor] | str | Path  # a state dict, or a file
Part = Literal["unet", "text"]


@dataclass
class _Kept:
    """The LoRA set one part of a model carries: its key, the merge (with the original weights of the layers
    it touched) and the Parameters it installed (to notice weights someone else has changed since)."""

    key: tuple
    merged: MergedLoRAs
    installed: dict[Layer, nn.Parameter]
    sources: list[LoRA]  # held, so that the identity of a state dict in the key stays its own

    def intact(self) -> bool:
        return all(layer.weight is p for layer, p in self.installed.items())


_KEPT: weakref.WeakKeyDictionary[nn.Module, _Kept] = weakref.WeakKeyDictionary()


def use_loras(
    model: StableDiffusion, loras: Sequence[tuple[LoRA, float]], parts: Sequence[Part] = ("unet", "text")
) -> None:
    """Make a `StableDiffusion`'s U-Net and/or text encoders carry exactly these LoRAs, merged in order
    (none: its base weights), and keep them merged after: a part that carries this set already is left as
    it is (nothing read or merged again); otherwise its base weights come back bit-exactly (the original
    tensors of the layers the last merge touched, never a copy of the whole model) and the new set is merged.
    Files count as the same LoRA while their path, size and modification time are; state dicts by identity.
    Whatever runs a shared model's networks calls this first (the pipeline, ComfyUI's nodes)."""
    key = tuple((_identity(x), float(s)) for x, s in loras)
    files: dict[str, StateDict] = {}
    for part in parts:
        networks: list[nn.Module] = [model.unet] if part == "unet" else list(model.text_encoders)
        kept = _KEPT.get(networks[0]) if networks else None
        if kept is not None and kept.key == key and kept.intact():
            continue
        if kept is not None:
            if kept.intact():  # else the weights were changed (and are put back) by someone else
                kept.merged.restore()
            del _KEPT[networks[0]]
        if loras and networks:
            sds = [(_state_dict(x, files), s) for x, s in loras]
            merged = merge_loras(model.unet, model.text_encoders, model.family, sds, networks)
            installed = {layer: layer.weight for layer in merged.originals}
            _KEPT[networks[0]] = _Kept(key, merged, installed, [x for x, _ in loras])


def _identity(lora: LoRA) -> tuple:
    if isinstance(lora, str | Path):
        stat = Path(lora).stat()
        return (str(Path(lora).resolve()), stat.st_size, stat.st_mtime_ns)
    return ("state dict", id(lora))


def _state_dict(lora: LoRA, files: dict[str, StateDict]) -> Mapping[str, Tensor]:
    """A file read once per call (both parts of a model merge from it), or the state dict itself."""
    if not isinstance(lora, str | Path):
        return lora
    if str(lora) not in files:
        files[str(lora)] = read_lora(lora)
    return files[str(lora)]


def extract_lora(base: Mapping[str, Layer], tuned: Mapping[str, Layer], rank: int) -> StateDict:
    """A kohya LoRA approximating tuned − base on each named layer by a truncated SVD (alpha = rank).

    Exact when a layer's difference has rank <= `rank`; layers that did not change are left out.
    """
    out: StateDict = {}
    for name, layer in base.items():
        diff = (tuned[name].weight.detach().float() - layer.weight.detach().float()).flatten(1)
        if not bool(diff.any()):
            continue
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        r = min(rank, s.numel())
        up, down = u[:, :r] * s[:r], vh[:r]
        if isinstance(layer, nn.Conv2d):
            up, down = up[:, :, None, None], down.reshape(r, *layer.weight.shape[1:])
        out |= {f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous()}
        out[f"{name}.alpha"] = torch.tensor(float(r))
    return out
