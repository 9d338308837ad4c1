"""LoRA for the U-Net and text encoders: kohya-format files, training layers, exact reversible merging.

Names are kohya sd-scripts' (`networks/lora.py`), which AUTOMATIC1111 and ComfyUI read: `lora_unet_` + the
diffusers module path (SD1/SD2) or the original LDM path (SDXL, whose kohya U-Net keeps LDM names), and
the family's text prefix (`lora_te_`; `lora_te1_`/`lora_te2_` for SDXL's two encoders) + the
transformers CLIP path, dots as underscores; the family record (`sdlab.families`) says which.
Each module stores `lora_down.weight` (rank, in[, kh, kw]), `lora_up.weight` (out, rank[, 1,
1]) and `alpha`; its update is ΔW = alpha/rank · up @ down. Loading accepts both U-Net namings; saving uses
the one kohya writes for the family. The diffusers names come from `keymaps.unet_ldm_to_diffusers`, so
there is one U-Net key map in the project.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from sdlab.checkpoints import keymaps
from sdlab.checkpoints.io import read_state_dict, write_safetensors
from sdlab.families import Family, Naming
from sdlab.models.blocks import SpatialTransformer
from sdlab.models.clip import MLP, SelfAttention
from sdlab.models.unet import Downsample, ResBlock, Upsample

StateDict = dict[str, Tensor]
Layer = nn.Linear | nn.Conv2d
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


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
# files and merging


@dataclass(frozen=True)
class LoRAWeights:
    """One module's update as stored in a kohya file."""

    down: Tensor
    up: Tensor
    alpha: float

    def delta(self, shape: torch.Size) -> Tensor:
        """ΔW = alpha/rank · up @ down in float32, shaped like the layer weight (Linear, 1x1 or kxk conv)."""
        rank = self.down.shape[0]
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        if product.numel() != shape.numel():
            raise ValueError(f"update of shape {tuple(product.shape)} does not fit a weight {tuple(shape)}")
        return product.reshape(shape) * (self.alpha / rank)


def parse_lora(sd: Mapping[str, Tensor], what: str = "LoRA") -> dict[str, LoRAWeights]:
    """Group a kohya state dict by module name; alpha defaults to the rank (scale 1) as kohya does."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = value
    unsupported = sorted({p for g in groups.values() for p in g} - set(PARTS))
    if unsupported:
        raise ValueError(
            f"{what}: unsupported LoRA tensors {unsupported[:4]}; sdlab reads kohya LoRA/LoCon files "
            "(lora_down/lora_up/alpha), not LoHa, LoKr, Tucker, DoRA or diffusers/PEFT layouts"
        )
    incomplete = [n for n, g in groups.items() if not {"lora_down.weight", "lora_up.weight"} <= set(g)]
    if incomplete:
        raise ValueError(f"{what}: {incomplete[0]} lacks lora_down or lora_up")
    return {
        n: LoRAWeights(
            g["lora_down.weight"], g["lora_up.weight"], float(g.get("alpha", g["lora_down.weight"].shape[0]))
        )
        for n, g in groups.items()
    }


def read_lora(path: str | Path) -> StateDict:
    """The tensors of a kohya LoRA file (.safetensors, or a weights-only pickle)."""
    sd = read_state_dict(path)
    parse_lora(sd, str(path))
    return sd


def save_lora(sd: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a kohya LoRA .safetensors (never overwrites), with kohya's `ss_network_*` metadata."""
    lora = parse_lora(sd)
    ranks = sorted({w.down.shape[0] for w in lora.values()})
    alphas = sorted({w.alpha for w in lora.values()})
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1]),
        "ss_network_alpha": str(alphas[-1]),
        **(metadata or {}),
    }
    return write_safetensors(dict(sd), path, metadata=meta)


@dataclass
class MergedLoRAs:
    """LoRAs merged into a model's weights; `restore()` (or leaving the `with` block) puts back the
    original Parameter objects, so unmerging is exact."""

    originals: dict[Layer, nn.Parameter] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    def restore(self) -> None:
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
) -> MergedLoRAs:
    """Merge LoRAs, each with its strength: W' = W + Σ strength·alpha/rank·up@down (computed in float32).

    Names that fit no layer are reported in `unmatched`; a file where none fits is an error (a LoRA for
    another model family).
    """
    layers = layer_map(unet, encoders, family)
    merged = MergedLoRAs()
    for index, (sd, strength) in enumerate(loras):
        parsed = parse_lora(sd, f"LoRA {index}")
        found = [n for n in parsed if n in layers]
        if parsed and not found:
            raise ValueError(
                f"LoRA {index}: none of its {len(parsed)} modules fits this model, e.g. {next(iter(parsed))}"
            )
        for name in found:
            try:
                _merge_one(layers[name], parsed[name], strength, merged)
            except ValueError as e:
                merged.restore()  # all or nothing
                raise ValueError(f"LoRA {index}: {name}: {e} (a LoRA for another model?)") from e
        merged.applied += found
        merged.unmatched += [n for n in parsed if n not in layers]
    return merged


def _merge_one(layer: Layer, weights: LoRAWeights, strength: float, merged: MergedLoRAs) -> None:
    """Replace the layer's weight by a new Parameter holding W + strength·ΔW (the old one is kept)."""
    w = layer.weight
    merged.originals.setdefault(layer, w)
    new = w.detach().float() + strength * weights.delta(w.shape).to(w.device)
    layer.weight = nn.Parameter(new.to(w.dtype), requires_grad=False)


def apply_lora(model: object, lora: Mapping[str, Tensor] | str | Path, strength: float = 1.0) -> MergedLoRAs:
    """Merge one LoRA (state dict or file) into a loaded model (`StableDiffusion`); restore() undoes it."""
    return apply_loras(model, [(lora, strength)])


def apply_loras(
    model: object, loras: Sequence[tuple[Mapping[str, Tensor] | str | Path, float]]
) -> MergedLoRAs:
    """Merge several LoRAs, each at its own strength, into a `StableDiffusion`'s U-Net and text encoders."""
    sds = [(read_lora(x) if isinstance(x, str | Path) else x, s) for x, s in loras]
    return merge_loras(model.unet, model.text_encoders, model.family, sds)  # type: ignore[attr-defined]


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
