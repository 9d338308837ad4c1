"""Infer network configurations from key names and tensor shapes (as ComfyUI does).

Each function takes one component's state dict in the original layout with its prefix stripped, and
works on meta tensors too (only shapes are read). What shapes cannot tell (the number of attention
heads) follows the family conventions: conv `proj_in` (SD1 layout) means 8 heads, a linear one
(SD2/SDXL layout) 64 channels per head; CLIP has 64 channels per head.
"""

from __future__ import annotations

import re

from torch import Tensor

from sdlab import families
from sdlab.checkpoints.io import CheckpointError
from sdlab.config import (
    SD_VAE,
    ModelConfig,
    Prediction,
    TextConfig,
    UNetConfig,
    VAEConfig,
    per_level_depths,
)
from sdlab.families import Family
from sdlab.models.controlnet import ControlNetConfig

StateDict = dict[str, Tensor]


def _need(sd: StateDict, key: str, what: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"{what}: missing tensor {key!r}")
    return sd[key]


def _indices(sd: StateDict, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def _depth(sd: StateDict, prefix: str) -> int:
    """Number of transformer blocks of the SpatialTransformer at `prefix` (0 if none)."""
    return len(_indices(sd, re.escape(prefix) + r"transformer_blocks\.(\d+)\."))


def detect_unet(sd: StateDict, what: str = "U-Net") -> UNetConfig:
    """UNetConfig of an `openaimodel` state dict (keys like `input_blocks.1.0.in_layers.2.weight`)."""
    out_depths = [_depth(sd, f"output_blocks.{i}.1.") for i in _indices(sd, r"output_blocks\.(\d+)\.")]
    out_channels = _need(sd, "out.2.weight", what).shape[0]
    return _unet_config(sd, what, out_channels, tuple(out_depths))


def detect_controlnet(sd: StateDict, what: str = "ControlNet") -> ControlNetConfig:
    """ControlNetConfig of a cldm ControlNet state dict (`control_model.` stripped): the U-Net it copies
    (no output side: output depths mirror the input levels, out_channels = in_channels) and its hint
    embedding (convolutions at the even indices of `input_hint_block`, stages before each stride 2)."""
    convs = _indices(sd, r"input_hint_block\.(\d+)\.weight")
    if len(convs) < 2:
        raise CheckpointError(f"{what}: not a ControlNet (no input_hint_block convolutions)")
    stages = [convs[0], *convs[2:-1:2]]
    return ControlNetConfig(
        unet=_unet_config(sd, what, None, None),
        hint_channels=sd[f"input_hint_block.{convs[0]}.weight"].shape[1],
        hint_block_channels=tuple(sd[f"input_hint_block.{i}.weight"].shape[0] for i in stages),
    )


def _unet_config(
    sd: StateDict, what: str, out_channels: int | None, out_depths: tuple[int, ...] | None
) -> UNetConfig:
    """The config read off the input blocks, middle block and embeddings, with the given output side
    (None: a regular one mirroring the input levels, and out_channels = in_channels)."""
    conv_in = _need(sd, "input_blocks.0.0.weight", what)
    mc = conv_in.shape[0]
    channel_mult: list[int] = []
    num_res_blocks: list[int] = []
    depths: list[int] = []
    count = 0
    for i in _indices(sd, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:  # Downsample closes a level
            num_res_blocks.append(count)
            count = 0
            continue
        out = _need(sd, f"input_blocks.{i}.0.out_layers.3.weight", what).shape[0]
        if count == 0:
            channel_mult.append(out // mc)
        count += 1
        depths.append(_depth(sd, f"input_blocks.{i}.1."))
    num_res_blocks.append(count)
    if out_depths is None:
        starts = [sum(num_res_blocks[:level]) for level in range(len(num_res_blocks))]
        level_depths = tuple(
            max(depths[a : a + n], default=0) for a, n in zip(starts, num_res_blocks, strict=True)
        )
        out_depths = per_level_depths(tuple(num_res_blocks), level_depths)[1]
    linear = sd.get("middle_block.1.proj_in.weight")
    if linear is None:
        linear = next((v for k, v in sd.items() if k.endswith(".proj_in.weight")), None)
    use_linear = linear is not None and linear.ndim == 2
    ctx = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), 768)
    adm = sd.get("label_emb.0.0.weight")
    try:
        return UNetConfig(
            in_channels=conv_in.shape[1],
            out_channels=conv_in.shape[1] if out_channels is None else out_channels,
            model_channels=mc,
            channel_mult=tuple(channel_mult),
            num_res_blocks=tuple(num_res_blocks),
            transformer_depth=tuple(depths),
            transformer_depth_output=out_depths,
            transformer_depth_middle=_depth(sd, "middle_block.1."),
            num_heads=-1 if use_linear else 8,
            num_head_channels=64 if use_linear else -1,
            context_dim=ctx,
            use_linear_in_transformer=use_linear,
            adm_in_channels=None if adm is None else adm.shape[1],
        )
    except ValueError as e:
        raise CheckpointError(f"{what}: inconsistent block structure ({e})") from e


def detect_vae(sd: StateDict, what: str = "VAE", scale_factor: float | None = None) -> VAEConfig:
    """VAEConfig of an ldm `AutoencoderKL` state dict (keys like `encoder.down.0.block.0.conv1.weight`)."""
    ch = _need(sd, "encoder.conv_in.weight", what).shape[0]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise CheckpointError(f"{what}: no encoder.down.* blocks")
    mult = tuple(_need(sd, f"encoder.down.{i}.block.0.conv2.weight", what).shape[0] // ch for i in levels)
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_ch=_need(sd, "decoder.conv_out.weight", what).shape[0],
        ch=ch,
        ch_mult=mult,
        num_res_blocks=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
        z_channels=_need(sd, "decoder.conv_in.weight", what).shape[1],
        embed_dim=_need(sd, "post_quant_conv.weight", what).shape[1],
        scale_factor=SD_VAE.scale_factor if scale_factor is None else scale_factor,
    )


def detect_text(sd: StateDict, layout: str, what: str = "text encoder") -> TextConfig:
    """TextConfig of a CLIP text model in the transformers layout (`text_model.*`)."""
    tok = _need(sd, "text_model.embeddings.token_embedding.weight", what)
    pos = _need(sd, "text_model.embeddings.position_embedding.weight", what)
    width = tok.shape[1]
    proj = sd.get("text_projection.weight")
    openclip = layout == "openclip"
    return TextConfig(
        vocab_size=tok.shape[0],
        max_positions=pos.shape[0],
        width=width,
        layers=len(_indices(sd, r"text_model\.encoder\.layers\.(\d+)\.")),
        heads=max(1, width // 64),
        intermediate=_need(sd, "text_model.encoder.layers.0.mlp.fc1.weight", what).shape[0],
        act="gelu" if openclip else "quick_gelu",
        projection_dim=None if proj is None else proj.shape[0],
        layout="openclip" if openclip else "openai",
        pad_token=0 if openclip else 49407,
    )


# Keys outside the networks that mark a model sdlab would sample wrongly (ComfyUI's model_detection reads
# the same markers): refused with the reason rather than drawn with the wrong maths.
UNSUPPORTED_MARKERS = {
    "edm_mean": "Playground v2.5-style EDM latent format (edm_mean/edm_std)",
    "edm_std": "Playground v2.5-style EDM latent format (edm_mean/edm_std)",
    "edm_vpred.sigma_max": "EDM v-prediction (CosXL-style edm_vpred.sigma_max)",
    "edm_vpred.sigma_min": "EDM v-prediction (CosXL-style edm_vpred.sigma_min)",
    "ztsnr": "a zero-terminal-SNR schedule (ztsnr key)",
}


def guess_prediction(
    unet_sd: StateDict, cfg: UNetConfig, found: list[Family], full_sd: StateDict
) -> Prediction:
    """ε or v: an explicit `v_pred` key, else ComfyUI's SD2 heuristic on a LayerNorm bias spread for
    families that ask for it."""
    if "v_pred" in full_sd:
        return "v"
    if any(f.v_from_weights for f in found) and cfg.in_channels == 4:
        bias = unet_sd.get("output_blocks.11.1.transformer_blocks.0.norm1.bias")
        if bias is not None and bias.device.type != "meta" and float(bias.float().std(unbiased=False)) > 0.09:
            return "v"
    return "eps"


def detect_model(
    unet_sd: StateDict | None,
    vae_sd: StateDict | None,
    text_sds: list[tuple[str, StateDict]],
    full_sd: StateDict,
    what: str,
    prediction: Prediction | None = None,
    text_used_layers: int | None = None,
) -> ModelConfig:
    """The whole model's configuration, its family recognised by `sdlab.families`. `text_used_layers`:
    how many text layers the model conditions on when a diffusers config says so (SD2 folders cut the
    encoder after layer 23)."""
    if unet_sd is None:
        raise CheckpointError(f"{what}: no U-Net weights found (keys model.diffusion_model.* or unet/)")
    if vae_sd is None:
        raise CheckpointError(f"{what}: no VAE weights found (keys first_stage_model.* or vae/)")
    if not text_sds:
        raise CheckpointError(
            f"{what}: no text encoder weights found (keys cond_stage_model.* / conditioner.*)"
        )
    marked = sorted(UNSUPPORTED_MARKERS[k] for k in full_sd.keys() & UNSUPPORTED_MARKERS.keys())
    if marked:
        raise CheckpointError(f"{what}: sdlab does not support {marked[0]} yet")
    unet = detect_unet(unet_sd, f"{what} (U-Net)")
    text = tuple(
        detect_text(sd, layout, f"{what} (text encoder {i})") for i, (layout, sd) in enumerate(text_sds)
    )
    found = families.candidates(unet, text)
    if not found:
        raise CheckpointError(
            f"{what}: no known model family has {families.describe_structure(unet, text)}; "
            f"known: {', '.join(families.FAMILIES)}"
        )
    pred = prediction or guess_prediction(unet_sd, unet, found, full_sd)
    try:
        family = families.choose(found, pred)
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from e
    return ModelConfig(
        family=family.name,
        unet=unet,
        vae=detect_vae(vae_sd, f"{what} (VAE)", family.latent.scale_factor),
        text=text,
        prediction=pred,
        clip_skip_default=family.clip_skip_default(text, text_used_layers),
    )
