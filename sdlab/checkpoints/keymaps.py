"""Every renaming of checkpoint keys, as pure functions over state dicts (no modules, no I/O).

Our modules use the original single-file names (`input_blocks.1.0.in_layers.2.weight`,
`encoder.down.0.block.0.conv1.weight`, `text_model.encoder.layers.0.self_attn.q_proj.weight`); this
module maps them to and from the diffusers/transformers layouts and the OpenCLIP text layout, splits a
single file into components by prefix, and writes the `config.json` files of a diffusers folder.

Each U-Net/VAE map is one table of key prefixes (`input_blocks.1.0.in_layers.0.` ->
`down_blocks.0.resnets.0.norm1.`) built from the block structure; its inverse is the same table
reversed, so the two directions cannot drift apart. A key that no prefix fits is an error, never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

import torch
from torch import Tensor

from sdlab import families
from sdlab.config import ModelConfig, UNetConfig, VAEConfig
from sdlab.families import Family

StateDict = dict[str, Tensor]
Prefixes = dict[str, str]

# ---------------------------------------------------------------------------------------------
# generic renaming


def _rename(sd: StateDict, prefixes: Prefixes, what: str) -> StateDict:
    """Rename each key by its exact entry or its longest dotted prefix in `prefixes`."""
    out: StateDict = {}
    unmatched = []
    for key, value in sd.items():
        new = _renamed(key, prefixes)
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value
    if unmatched:
        raise ValueError(
            f"{what}: {len(unmatched)} keys fit no block of this structure, e.g. {unmatched[:3]}"
        )
    return out


def _renamed(key: str, prefixes: Prefixes) -> str | None:
    if key in prefixes:
        return prefixes[key]
    cut = len(key)
    while (cut := key.rfind(".", 0, cut)) > 0:
        head = key[: cut + 1]
        if head in prefixes:
            return prefixes[head] + key[cut + 1 :]
    return None


def _inverse(prefixes: Prefixes) -> Prefixes:
    return {new: old for old, new in prefixes.items()}


def _nested(old: str, new: str, table: Prefixes) -> Prefixes:
    """Prefix pairs for one sub-module whose children are renamed by `table`."""
    return {old + a: new + b for a, b in table.items()}


def _count(sd: StateDict, prefix: str) -> int:
    """1 + the largest integer that directly follows `prefix` in a key (0 when none does)."""
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    return max((int(m.group(1)) + 1 for k in sd if (m := rx.match(k))), default=0)


def _has(sd: StateDict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


# ---------------------------------------------------------------------------------------------
# U-Net: openaimodel <-> diffusers UNet2DConditionModel

_UNET_FIXED = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "label_emb.0.0.": "add_embedding.linear_1.",  # SDXL: pooled text + size embeddings
    "label_emb.0.2.": "add_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "out.0.": "conv_norm_out.",
    "out.2.": "conv_out.",
}
_UNET_RESNET = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}


def _unet_prefixes(
    num_res_blocks: Sequence[int], mid_attention: bool, upsample_slots: Sequence[int]
) -> Prefixes:
    """LDM -> diffusers prefixes. `upsample_slots[level]` is the index of the Upsample inside the last
    output block of that level: 2 after a SpatialTransformer, else 1. SpatialTransformer keys are the
    same in both layouts below their block prefix (LDM attention entries exist for every ResBlock;
    only the keys present are renamed)."""
    p = dict(_UNET_FIXED)
    levels, n = len(num_res_blocks), 0
    for level, count in enumerate(num_res_blocks):
        for j in range(count):
            n += 1
            p |= _nested(f"input_blocks.{n}.0.", f"down_blocks.{level}.resnets.{j}.", _UNET_RESNET)
            p[f"input_blocks.{n}.1."] = f"down_blocks.{level}.attentions.{j}."
        if level != levels - 1:
            n += 1
            p[f"input_blocks.{n}.0.op."] = f"down_blocks.{level}.downsamplers.0.conv."
    p |= _nested("middle_block.0.", "mid_block.resnets.0.", _UNET_RESNET)
    if mid_attention:
        p["middle_block.1."] = "mid_block.attentions.0."
    p |= _nested(f"middle_block.{1 + mid_attention}.", "mid_block.resnets.1.", _UNET_RESNET)
    m = 0
    for up, level in enumerate(reversed(range(levels))):  # diffusers numbers up blocks from the bottom
        for j in range(num_res_blocks[level] + 1):
            p |= _nested(f"output_blocks.{m}.0.", f"up_blocks.{up}.resnets.{j}.", _UNET_RESNET)
            p[f"output_blocks.{m}.1."] = f"up_blocks.{up}.attentions.{j}."
            m += 1
        if level:
            p[f"output_blocks.{m - 1}.{upsample_slots[level]}.conv."] = f"up_blocks.{up}.upsamplers.0.conv."
    return p


def unet_ldm_to_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """U-Net keys `input_blocks/middle_block/output_blocks` -> diffusers `down_blocks/mid_block/up_blocks`."""
    slots, m = [], 0
    for n in cfg.num_res_blocks[::-1]:
        m += n + 1
        slots.append(2 if cfg.transformer_depth_output[m - 1] else 1)
    prefixes = _unet_prefixes(cfg.num_res_blocks, cfg.transformer_depth_middle > 0, slots[::-1])
    return _rename(sd, prefixes, "U-Net (ldm -> diffusers)")


def unet_diffusers_to_ldm(sd: StateDict) -> StateDict:
    """diffusers UNet2DConditionModel keys -> original keys; the block structure is read off the keys."""
    levels = _count(sd, "down_blocks.")
    nrb = [_count(sd, f"down_blocks.{level}.resnets.") for level in range(levels)]
    slots = [
        2 if _has(sd, f"up_blocks.{levels - 1 - lvl}.attentions.{n}.") else 1 for lvl, n in enumerate(nrb)
    ]
    prefixes = _inverse(_unet_prefixes(nrb, _has(sd, "mid_block.attentions.0."), slots))
    return _rename(sd, prefixes, "U-Net (diffusers -> ldm)")


# ---------------------------------------------------------------------------------------------
# ControlNet: cldm ControlNet (`control_model.*` without its prefix) <-> diffusers ControlNetModel


def _controlnet_prefixes(num_res_blocks: Sequence[int], mid_attention: bool, hint_convs: int) -> Prefixes:
    """LDM -> diffusers prefixes: the U-Net encoder's table, the hint embedding (convs at even indices of
    `input_hint_block`: conv_in, `hint_convs - 2` blocks, conv_out), one zero conv per input block."""
    p = _unet_prefixes(num_res_blocks, mid_attention, [1] * len(num_res_blocks))
    p = {k: v for k, v in p.items() if not k.startswith(("output_blocks.", "out."))}
    p["input_hint_block.0."] = "controlnet_cond_embedding.conv_in."
    p |= {
        f"input_hint_block.{2 * i}.": f"controlnet_cond_embedding.blocks.{i - 1}."
        for i in range(1, hint_convs - 1)
    }
    p[f"input_hint_block.{2 * hint_convs - 2}."] = "controlnet_cond_embedding.conv_out."
    inputs = 1 + sum(num_res_blocks) + len(num_res_blocks) - 1
    p |= {f"zero_convs.{i}.0.": f"controlnet_down_blocks.{i}." for i in range(inputs)}
    p["middle_block_out.0."] = "controlnet_mid_block."
    return p


def controlnet_ldm_to_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """ControlNet keys `input_hint_block/input_blocks/zero_convs/middle_block_out` -> diffusers names."""
    hint_convs = _count(sd, "input_hint_block.") // 2 + 1
    prefixes = _controlnet_prefixes(cfg.num_res_blocks, cfg.transformer_depth_middle > 0, hint_convs)
    return _rename(sd, prefixes, "ControlNet (ldm -> diffusers)")


def controlnet_diffusers_to_ldm(sd: StateDict) -> StateDict:
    """diffusers ControlNetModel keys -> cldm keys; the block structure is read off the keys."""
    levels = _count(sd, "down_blocks.")
    nrb = [_count(sd, f"down_blocks.{level}.resnets.") for level in range(levels)]
    hint_convs = _count(sd, "controlnet_cond_embedding.blocks.") + 2
    prefixes = _inverse(_controlnet_prefixes(nrb, _has(sd, "mid_block.attentions.0."), hint_convs))
    return _rename(sd, prefixes, "ControlNet (diffusers -> ldm)")


# ---------------------------------------------------------------------------------------------
# VAE: ldm AutoencoderKL <-> diffusers AutoencoderKL

_VAE_RESNET = {
    "norm1.": "norm1.",
    "conv1.": "conv1.",
    "norm2.": "norm2.",
    "conv2.": "conv2.",
    "nin_shortcut.": "conv_shortcut.",
}
_VAE_ATTENTION = {
    "norm.": "group_norm.",
    "q.": "to_q.",
    "k.": "to_k.",
    "v.": "to_v.",
    "proj_out.": "to_out.0.",
}
# diffusers < 0.14 wrote the mid attention as query/key/value/proj_attn; still found in VAE files
_VAE_ATTENTION_LEGACY = {
    "query.": "q.",
    "key.": "k.",
    "value.": "v.",
    "proj_attn.": "proj_out.",
}
_VAE_ATTENTION_WEIGHT = re.compile(r"(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def _vae_prefixes(levels: int, num_res_blocks: int) -> Prefixes:
    """LDM -> diffusers prefixes; decoder `up.i` is diffusers `up_blocks.{levels-1-i}`."""
    p = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for part in ("encoder", "decoder"):
        p |= {f"{part}.{name}.": f"{part}.{name}." for name in ("conv_in", "conv_out")}
        p[f"{part}.norm_out."] = f"{part}.conv_norm_out."
        p |= _nested(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _VAE_RESNET)
        p |= _nested(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _VAE_RESNET)
        p |= _nested(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _VAE_ATTENTION)
    for i in range(levels):
        up = levels - 1 - i
        for j in range(num_res_blocks):
            p |= _nested(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", _VAE_RESNET)
        for j in range(num_res_blocks + 1):
            p |= _nested(f"decoder.up.{i}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}.", _VAE_RESNET)
        p[f"encoder.down.{i}.downsample.conv."] = f"encoder.down_blocks.{i}.downsamplers.0.conv."
        p[f"decoder.up.{i}.upsample.conv."] = f"decoder.up_blocks.{up}.upsamplers.0.conv."
    return p


def vae_ldm_to_diffusers(sd: StateDict, cfg: VAEConfig) -> StateDict:
    """VAE keys `encoder.down.i.block.j` -> `encoder.down_blocks.i.resnets.j`; mid attention conv->linear."""
    linear = {
        k: v[:, :, 0, 0] if _VAE_ATTENTION_WEIGHT.fullmatch(k) and v.ndim == 4 else v for k, v in sd.items()
    }
    return _rename(linear, _vae_prefixes(len(cfg.ch_mult), cfg.num_res_blocks), "VAE (ldm -> diffusers)")


def vae_diffusers_to_ldm(sd: StateDict) -> StateDict:
    """diffusers AutoencoderKL keys (current or pre-0.14 attention names) -> original keys, with 1x1 convs."""
    levels, nrb = _count(sd, "encoder.down_blocks."), _count(sd, "encoder.down_blocks.0.resnets.")
    prefixes = _inverse(_vae_prefixes(levels, nrb))
    for part in ("encoder", "decoder"):
        prefixes |= _nested(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION_LEGACY)
    ldm = _rename(sd, prefixes, "VAE (diffusers -> ldm)")
    return {
        k: v[:, :, None, None] if _VAE_ATTENTION_WEIGHT.fullmatch(k) and v.ndim == 2 else v
        for k, v in ldm.items()
    }


# ---------------------------------------------------------------------------------------------
# text encoders: OpenCLIP <-> OpenAI/transformers layout

# Dropped when reading OpenCLIP: `logit_scale` (the image-text contrastive temperature, unused by text
# conditioning). `text_projection` is kept, as `text_projection.weight` (transposed), for SD2 as well.
OPENCLIP_DROPPED = ("logit_scale",)
_OPENCLIP_FIXED = {
    "token_embedding.": "text_model.embeddings.token_embedding.",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.": "text_model.final_layer_norm.",
}
_OPENCLIP_LAYER = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "attn.out_proj.": "self_attn.out_proj.",
}
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def _openclip_prefixes(layers: int) -> Prefixes:
    p = dict(_OPENCLIP_FIXED)
    for n in range(layers):
        p |= _nested(f"transformer.resblocks.{n}.", f"text_model.encoder.layers.{n}.", _OPENCLIP_LAYER)
    return p


def text_openclip_to_openai(sd: StateDict) -> StateDict:
    """OpenCLIP text keys -> transformers layout: fused `in_proj` split into q/k/v, `text_projection`
    (width, proj), used as `x @ P`, stored as the Linear weight P.T; `logit_scale` dropped."""
    out: StateDict = {}
    rest: StateDict = {}
    for key, value in sd.items():
        if key in OPENCLIP_DROPPED:
            continue
        if key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif m := _IN_PROJ.fullmatch(key):
            layer, kind = m.groups()
            for name, part in zip("qkv", value.chunk(3), strict=True):  # rows: q, then k, then v
                out[f"text_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
        else:
            rest[key] = value
    return out | _rename(
        rest, _openclip_prefixes(_count(sd, "transformer.resblocks.")), "OpenCLIP text encoder"
    )


def text_openai_to_openclip(sd: StateDict) -> StateDict:
    """Transformers-layout text keys -> OpenCLIP: q/k/v fused into `in_proj`, `text_projection` transposed."""
    out: StateDict = {}
    rest: StateDict = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := _QKV.fullmatch(key):
            layer, name, kind = m.groups()
            fused.setdefault(f"transformer.resblocks.{layer}.attn.in_proj_{kind}", {})[name] = value
        else:
            rest[key] = value
    out |= {key: torch.cat([parts[x] for x in "qkv"]) for key, parts in fused.items()}
    layers = _count(sd, "text_model.encoder.layers.")
    return out | _rename(rest, _inverse(_openclip_prefixes(layers)), "text encoder (openai -> openclip)")


def text_from_transformers(sd: StateDict) -> StateDict:
    """Transformers-layout keys as our module names them: `text_model.` prefixed (transformers >= 5.6
    and some early SD1 files omit it) and without the `position_ids` buffer of legacy files."""
    return {
        k if k.startswith("text_model.") or k == "text_projection.weight" else f"text_model.{k}": v
        for k, v in sd.items()
        if not k.endswith("embeddings.position_ids")
    }


# ---------------------------------------------------------------------------------------------
# single-file checkpoints

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# SD1 `cond_stage_model.transformer.` (openai), SD2 `cond_stage_model.model.` (openclip), SDXL
# `conditioner.embedders.0.transformer.` (openai) and `conditioner.embedders.1.model.` (openclip)
TEXT_PREFIX = re.compile(r"(?:cond_stage_model|conditioner\.embedders\.(\d+))\.(transformer|model)\.")
# Training state the networks do not use: EMA copies of the U-Net (flattened names) and the
# LatentDiffusion / SGM denoiser schedule buffers, which are recomputed from the schedule.
IGNORED_PREFIXES = ("model_ema.", "denoiser.")
IGNORED_KEYS = frozenset(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod"
    " log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance"
    " posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 logvar lvlb_weights".split()
)


@dataclass
class SingleFileParts:
    """A single-file checkpoint split by component, prefixes stripped, text in its original layout."""

    unet: StateDict | None
    vae: StateDict | None
    text: list[StateDict]  # in embedder order
    text_layouts: list[str]  # "openai" | "openclip", one per text encoder
    extras: StateDict  # keys of no component and not ignored, e.g. `v_pred`


def split_single_file(sd: StateDict) -> SingleFileParts:
    """Split a full single-file state dict into U-Net, VAE and text encoders (openai ones normalized by
    `text_from_transformers`); IGNORED_PREFIXES/IGNORED_KEYS are dropped."""
    unet, vae, extras = {}, {}, {}
    texts: dict[tuple[int, str], StateDict] = {}
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            unet[key.removeprefix(UNET_PREFIX)] = value
        elif key.startswith(VAE_PREFIX):
            vae[key.removeprefix(VAE_PREFIX)] = value
        elif m := TEXT_PREFIX.match(key):
            layout = "openai" if m.group(2) == "transformer" else "openclip"
            texts.setdefault((int(m.group(1) or 0), layout), {})[key[m.end() :]] = value
        elif key not in IGNORED_KEYS and not key.startswith(IGNORED_PREFIXES):
            extras[key] = value
    order = sorted(texts)
    return SingleFileParts(
        unet=unet or None,
        vae=vae or None,
        text=[text_from_transformers(texts[k]) if k[1] == "openai" else texts[k] for k in order],
        text_layouts=[layout for _, layout in order],
        extras=extras,
    )


def join_single_file(family: Family, unet: StateDict, vae: StateDict, text: Sequence[StateDict]) -> StateDict:
    """Inverse of `split_single_file`: the components (text in its original layout) under the family's
    prefixes."""
    if len(text) != len(family.text):
        raise ValueError(
            f"a {family.label} single file holds {len(family.text)} text encoders, not {len(text)}"
        )
    sd = {UNET_PREFIX + k: v for k, v in unet.items()} | {VAE_PREFIX + k: v for k, v in vae.items()}
    for part, spec in zip(text, family.text, strict=True):
        sd |= {spec.single_file_prefix + k: v for k, v in part.items()}
    return sd


# ---------------------------------------------------------------------------------------------
# diffusers folder configs

DIFFUSERS_VERSION = "0.42.1"  # the diffusers these configs are checked against
TEXT_FOLDERS = ("text_encoder", "text_encoder_2")  # every text folder a diffusers pipeline may have
SDXL_TIME_EMBED_DIM = 256  # SDXL's sinusoidal size/crop embedding width (6 of them in adm_in_channels)
BOS_TOKEN = 49406


def diffusers_configs(model: ModelConfig) -> dict[str, dict]:
    """The JSON files of a diffusers folder holding `model`, keyed by their path inside the folder."""
    family = families.get(model.family)
    files = {
        "model_index.json": _model_index(model, family),
        "unet/config.json": _unet_config(model, family),
        "vae/config.json": _vae_config(model, family),
        "scheduler/scheduler_config.json": _scheduler_config(model),
    }
    for i, spec in enumerate(family.text):
        files[f"{spec.diffusers_folder}/config.json"] = _clip_config(model, family, i)
    return files


def _clip_class(family: Family, index: int) -> str:
    return "CLIPTextModelWithProjection" if family.text[index].pooled else "CLIPTextModel"


def _model_index(model: ModelConfig, family: Family) -> dict:
    index: dict = {
        "_class_name": family.diffusers_pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }
    if family.vector:  # SDXL pipelines name both encoders, a refiner leaves the first empty
        index |= {
            name: [None, None] for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        }
    for i, spec in enumerate(family.text):
        index[spec.diffusers_folder] = ["transformers", _clip_class(family, i)]
        index[spec.tokenizer_folder] = ["transformers", "CLIPTokenizer"]
    if family.vector:
        index["force_zeros_for_empty_prompt"] = (
            family.zero_empty_negative and "aesthetic_score" not in family.vector
        )
        if "aesthetic_score" in family.vector:
            index["requires_aesthetics_score"] = True
    else:
        index |= {"safety_checker": [None, None], "requires_safety_checker": False}
    return index


def _per_level(flat: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    it = iter(flat)
    return [list(islice(it, n)) for n in sizes]


def _block_type(depths: Sequence[int], cross: str, plain: str) -> str:
    if all(depths):
        return cross
    if not any(depths):
        return plain
    raise ValueError(
        f"diffusers cannot hold a level with transformers on some ResBlocks only (depths {depths})"
    )


def _transformer_layers(u: UNetConfig, down: list[list[int]], up: list[list[int]]) -> dict:
    """`transformer_layers_per_block` as diffusers reads it: an int when one depth serves everywhere (SD1,
    SD2), one per level (SDXL [0, 2, 10]), else per ResBlock with `reverse_transformer_layers_per_block`.
    diffusers' mid block takes the last level's (first) entry."""
    mid = u.transformer_depth_middle
    if not mid:
        raise ValueError("diffusers' cross-attention mid block needs transformer_depth_middle > 0")
    if not any(down[-1]) and not any(up[0]):
        down = [*down[:-1], [mid] * len(down[-1])]  # a DownBlock2D ignores it; the mid block reads it
    used = {d for level in down + up for d in level if d} | {mid}
    if len(used) == 1:
        return {"transformer_layers_per_block": mid}
    per_level = [set(a + b) - {0} for a, b in zip(down, reversed(up), strict=True)]
    if all(len(s) <= 1 for s in per_level) and per_level[-1] == {mid}:
        return {"transformer_layers_per_block": [max(s, default=0) for s in per_level]}
    if down[-1][0] != mid:
        raise ValueError(
            f"diffusers' mid block takes its depth from the last level ({down[-1][0]}), not {mid}"
        )
    return {"transformer_layers_per_block": down, "reverse_transformer_layers_per_block": up}


def _unet_config(model: ModelConfig, family: Family) -> dict:
    """UNet2DConditionModel config; mirrors diffusers' `create_unet_diffusers_config_from_ldm`."""
    u = model.unet
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": family.native_size // model.vae.downscale,
        "out_channels": u.out_channels,
        "up_block_types": [_block_type(d, "CrossAttnUpBlock2D", "UpBlock2D") for d in _up_depths(u)],
        # SD2.1 overflows fp16 attention scores; its published config upcasts them
        "upcast_attention": family.upcast_attention,
        **_encoder_config(u),
    }


def _up_depths(u: UNetConfig) -> list[list[int]]:
    """The transformer depths of the output ResBlocks, per up block (diffusers' order)."""
    return _per_level(u.transformer_depth_output, [n + 1 for n in u.num_res_blocks[::-1]])


def _encoder_config(u: UNetConfig) -> dict:
    """The config entries a UNet2DConditionModel and a ControlNetModel share: input side, mid block,
    embeddings."""
    down = _per_level(u.transformer_depth, u.num_res_blocks)
    nrb = u.num_res_blocks
    config = {
        "in_channels": u.in_channels,
        "down_block_types": [_block_type(d, "CrossAttnDownBlock2D", "DownBlock2D") for d in down],
        "block_out_channels": [u.model_channels * m for m in u.channel_mult],
        "layers_per_block": nrb[0] if len(set(nrb)) == 1 else list(nrb),
        "cross_attention_dim": u.context_dim,
        # diffusers' misnomer: the number of heads, per level when heads follow from a head width
        "attention_head_dim": u.num_heads
        if u.num_head_channels == -1
        else [u.model_channels * m // u.num_head_channels for m in u.channel_mult],
        "use_linear_projection": u.use_linear_in_transformer,
        **_transformer_layers(u, down, _up_depths(u)),
    }
    if u.adm_in_channels is not None:
        config |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": u.adm_in_channels,
        }
    return config


def controlnet_diffusers_config(
    u: UNetConfig, hint_channels: int, hint_block_channels: Sequence[int]
) -> dict:
    """ControlNetModel config of a ControlNet copying the encoder of U-Net `u`, taking `hint_channels`
    image channels through a hint embedding with `hint_block_channels`."""
    config = {
        "_class_name": "ControlNetModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "conditioning_channels": hint_channels,
        "conditioning_embedding_out_channels": list(hint_block_channels),
        **_encoder_config(u),
    }
    config.pop("reverse_transformer_layers_per_block", None)  # a ControlNetModel has no up blocks
    return config


def _vae_config(model: ModelConfig, family: Family) -> dict:
    """AutoencoderKL config; mirrors diffusers' `create_vae_diffusers_config_from_ldm`."""
    v = model.vae
    if v.embed_dim != v.z_channels:
        raise ValueError(
            f"diffusers' AutoencoderKL needs embed_dim == z_channels, not {v.embed_dim} != {v.z_channels}"
        )
    levels = len(v.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": family.native_size,
        "in_channels": v.in_channels,
        "out_channels": v.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [v.ch * m for m in v.ch_mult],
        "layers_per_block": v.num_res_blocks,
        "latent_channels": v.z_channels,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "scaling_factor": v.scale_factor,
        "shift_factor": v.shift_factor or None,
    }


def _clip_config(model: ModelConfig, family: Family, index: int) -> dict:
    """CLIPTextConfig. Non-XL diffusers pipelines condition on `last_hidden_state`, so for a model whose
    default is a clip skip (SD2: penultimate layer) the config stops that many layers early, as diffusers'
    SD2 folders do; the file keeps the unused last layer and `text_projection`, which transformers skips."""
    t = model.text[index]
    skipped = model.clip_skip_default - 1 if family.diffusers_cuts_text else 0
    return {
        "architectures": [_clip_class(family, index)],
        "model_type": "clip_text_model",
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.max_positions,
        "hidden_size": t.width,
        "num_hidden_layers": t.layers - skipped,
        "num_attention_heads": t.heads,
        "intermediate_size": t.intermediate,
        "hidden_act": t.act,
        "layer_norm_eps": t.layer_norm_eps,
        "projection_dim": t.projection_dim or t.width,
        "bos_token_id": BOS_TOKEN,
        "eos_token_id": t.eos_token,
        "pad_token_id": t.pad_token,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }


def _scheduler_config(model: ModelConfig) -> dict:
    """EulerDiscreteScheduler over SD's DDPM schedule (scaled-linear betas 0.00085 -> 0.012, 1000 steps)."""
    return {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": "v_prediction" if model.prediction == "v" else "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "sample_max_value": 1.0,
    }
