"""Key maps: exact round trips through the diffusers/transformers layouts on tiny seeded models built from
the configs `diffusers_configs` writes, cross-checked against diffusers' own single-file converters and
against the key sets and shapes of sdlab's modules."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from reference import ldm_original_config, max_diff, randomize
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdlab import families
from sdlab.checkpoints import keymaps
from sdlab.config import SD1, SD2, SDXL, ModelConfig, TextConfig, UNetConfig, VAEConfig, unet_config
from sdlab.models.clip import CLIPTextModel as OurCLIP
from sdlab.models.unet import UNetModel
from sdlab.models.vae import AutoencoderKL as OurVAE

StateDict = dict[str, torch.Tensor]

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_CLIP = TextConfig(width=32, layers=2, heads=4, intermediate=64)
TINY_OPENCLIP = TextConfig(
    width=32, layers=2, heads=4, intermediate=64, act="gelu", projection_dim=16,
    layout="openclip", pad_token=0,
)  # fmt: skip
TINY_UNETS = {
    "sd1": unet_config(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, depth_per_level=(1, 0), num_heads=4,
        context_dim=32,
    ),
    "sdxl": unet_config(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, depth_per_level=(0, 1, 2), num_heads=-1,
        num_head_channels=16, context_dim=32, use_linear_in_transformer=True, adm_in_channels=24,
        transformer_depth_middle=2,
    ),
    # per-ResBlock depths and ResBlock counts (community pruned U-Nets): diffusers' nested form
    "irregular": UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 2), transformer_depth=(1, 2, 1),
        transformer_depth_output=(1, 2, 1, 2, 1), transformer_depth_middle=2, num_heads=2, context_dim=32,
    ),
}  # fmt: skip
TINY_MODELS = {
    "sd1": ModelConfig(family="sd1", unet=TINY_UNETS["sd1"], vae=TINY_VAE, text=(TINY_CLIP,)),
    "sdxl": ModelConfig(
        family="sdxl", unet=TINY_UNETS["sdxl"], vae=TINY_VAE, text=(TINY_CLIP, TINY_OPENCLIP)
    ),
    "irregular": ModelConfig(family="sd1", unet=TINY_UNETS["irregular"], vae=TINY_VAE, text=(TINY_CLIP,)),
}


def assert_same(a: StateDict, b: StateDict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def assert_same_shapes(a: StateDict, b: StateDict) -> None:
    assert a.keys() == b.keys(), (sorted(a.keys() - b.keys())[:5], sorted(b.keys() - a.keys())[:5])
    assert all(a[k].shape == b[k].shape for k in a), [k for k in a if a[k].shape != b[k].shape][:5]


def meta_state_dict(module_cls: type[torch.nn.Module], cfg: object) -> StateDict:
    with torch.device("meta"):
        return module_cls(cfg).state_dict()


def diffusers_unet(model: ModelConfig, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**keymaps.diffusers_configs(model)["unet/config.json"])


def transformers_clip(model: ModelConfig, index: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = keymaps.diffusers_configs(model)[f"{keymaps.TEXT_FOLDERS[index]}/config.json"]
    projection = config["architectures"] == ["CLIPTextModelWithProjection"]
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))


def prefixed(prefix: str, sd: StateDict) -> StateDict:
    return {prefix + k: v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# U-Net


@pytest.mark.parametrize("name", TINY_MODELS)
def test_unet_round_trip_and_module_keys(name: str) -> None:
    model = TINY_MODELS[name]
    diffusers_sd = diffusers_unet(model).state_dict()
    ldm = keymaps.unet_diffusers_to_ldm(diffusers_sd)
    assert_same_shapes(ldm, meta_state_dict(UNetModel, model.unet))
    assert_same(keymaps.unet_ldm_to_diffusers(ldm, model.unet), diffusers_sd)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_unet_matches_diffusers_converter(name: str) -> None:
    model = TINY_MODELS[name]
    ldm = keymaps.unet_diffusers_to_ldm(diffusers_unet(model, seed=1).state_dict())
    config = keymaps.diffusers_configs(model)["unet/config.json"]
    theirs = sfu.convert_ldm_unet_checkpoint(prefixed(keymaps.UNET_PREFIX, ldm), config)
    assert_same(keymaps.unet_ldm_to_diffusers(ldm, model.unet), theirs)


@pytest.mark.parametrize("model", [SD1, SD2, SDXL], ids=["sd1", "sd2", "sdxl"])
def test_unet_real_shapes(model: ModelConfig) -> None:
    """Published architectures on the meta device: our module's keys mapped = diffusers' model = theirs."""
    ldm = meta_state_dict(UNetModel, model.unet)
    ours = keymaps.unet_ldm_to_diffusers(ldm, model.unet)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**keymaps.diffusers_configs(model)["unet/config.json"]).state_dict()
    assert_same_shapes(ours, reference)
    config = keymaps.diffusers_configs(model)["unet/config.json"]
    assert ours.keys() == sfu.convert_ldm_unet_checkpoint(prefixed(keymaps.UNET_PREFIX, ldm), config).keys()
    assert list(keymaps.unet_diffusers_to_ldm(ours)) == list(ldm)


def test_unet_without_mid_transformer() -> None:
    """A structure diffusers has no block for still maps both ways (middle_block.1 is then a ResBlock)."""
    cfg = replace(TINY_UNETS["sd1"], transformer_depth_middle=0)
    ldm = meta_state_dict(UNetModel, cfg)
    mapped = keymaps.unet_ldm_to_diffusers(ldm, cfg)
    assert "mid_block.resnets.1.conv1.weight" in mapped and not any(
        "mid_block.attentions" in k for k in mapped
    )
    assert list(keymaps.unet_diffusers_to_ldm(mapped)) == list(ldm)


def test_unet_unknown_key_is_an_error() -> None:
    ldm = meta_state_dict(UNetModel, TINY_UNETS["sd1"]) | {"input_blocks.1.0.bogus.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"1 keys fit no block.*bogus"):
        keymaps.unet_ldm_to_diffusers(ldm, TINY_UNETS["sd1"])


# ---------------------------------------------------------------------------------------------
# VAE


def test_vae_round_trip_module_keys_and_converter() -> None:
    torch.manual_seed(2)
    config = keymaps.diffusers_configs(TINY_MODELS["sd1"])["vae/config.json"]
    diffusers_sd = DiffusersVAE(**config).state_dict()
    ldm = keymaps.vae_diffusers_to_ldm(diffusers_sd)
    assert_same_shapes(ldm, meta_state_dict(OurVAE, TINY_VAE))
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    ours = keymaps.vae_ldm_to_diffusers(ldm, TINY_VAE)
    assert_same(ours, diffusers_sd)
    assert_same(ours, sfu.convert_ldm_vae_checkpoint(prefixed(keymaps.VAE_PREFIX, ldm), config))


def test_vae_reads_legacy_diffusers_attention_names() -> None:
    sd = DiffusersVAE(**keymaps.diffusers_configs(TINY_MODELS["sd1"])["vae/config.json"]).state_dict()
    old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    legacy = {}
    for key, value in sd.items():
        for new, was in old.items():
            key = key.replace(f"attentions.0.{new}", f"attentions.0.{was}")
        legacy[key] = value
    assert legacy.keys() != sd.keys()
    assert_same(keymaps.vae_diffusers_to_ldm(legacy), keymaps.vae_diffusers_to_ldm(sd))


# ---------------------------------------------------------------------------------------------
# text encoders


@pytest.mark.parametrize("index", [0, 1], ids=["clip-l", "openclip-projection"])
def test_text_round_trips_and_module_keys(index: int) -> None:
    model = TINY_MODELS["sdxl"]
    ref = transformers_clip(model, index, seed=3)
    ours = keymaps.text_from_transformers(ref.state_dict())  # transformers >= 5.6 drops `text_model.`
    assert_same_shapes(ours, meta_state_dict(OurCLIP, model.text[index]))
    assert ("text_projection.weight" in ours) == (index == 1)
    openclip = keymaps.text_openai_to_openclip(ours)
    assert "transformer.resblocks.1.attn.in_proj_weight" in openclip
    assert_same(keymaps.text_openclip_to_openai(openclip | {"logit_scale": torch.tensor(4.6)}), ours)
    assert_same(keymaps.text_openai_to_openclip(keymaps.text_openclip_to_openai(openclip)), openclip)


def test_openclip_matches_diffusers_converter() -> None:
    ref = transformers_clip(TINY_MODELS["sdxl"], 1, seed=4)
    openclip = keymaps.text_openai_to_openclip(keymaps.text_from_transformers(ref.state_dict()))
    prefix = "conditioner.embedders.1.model."
    theirs = sfu.convert_open_clip_checkpoint(ref, prefixed(prefix, openclip), prefix=prefix)
    assert_same(keymaps.text_openclip_to_openai(openclip), theirs)
    assert openclip["text_projection"].shape == (32, 16)  # (width, projection), used as x @ P


def test_text_from_transformers_normalizes_legacy_keys() -> None:
    w = torch.ones(2)
    sd = {
        "embeddings.token_embedding.weight": w,
        "embeddings.position_ids": torch.arange(2),
        "text_model.final_layer_norm.weight": w,
        "text_projection.weight": w,
    }
    assert keymaps.text_from_transformers(sd).keys() == {
        "text_model.embeddings.token_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_projection.weight",
    }


# ---------------------------------------------------------------------------------------------
# single files


def _components(model: ModelConfig) -> tuple[StateDict, StateDict, list[StateDict]]:
    torch.manual_seed(5)
    unet = {k: torch.randn(v.shape) for k, v in meta_state_dict(UNetModel, model.unet).items()}
    vae = {k: torch.randn(v.shape) for k, v in meta_state_dict(OurVAE, model.vae).items()}
    text = [{k: torch.randn(v.shape) for k, v in meta_state_dict(OurCLIP, t).items()} for t in model.text]
    return unet, vae, text


TINY_SD2 = ModelConfig(family="sd2", unet=TINY_UNETS["sd1"], vae=TINY_VAE, text=(TINY_OPENCLIP,))


@pytest.mark.parametrize(
    ("model", "prefixes"),
    [
        (TINY_MODELS["sd1"], ["cond_stage_model.transformer."]),
        (TINY_SD2, ["cond_stage_model.model."]),
        (TINY_MODELS["sdxl"], ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."]),
    ],
    ids=["sd1", "sd2", "sdxl"],
)
def test_split_and_join_single_file(model: ModelConfig, prefixes: list[str]) -> None:
    unet, vae, text = _components(model)
    layouts = [t.layout for t in model.text]
    original = [
        keymaps.text_openai_to_openclip(t) if layout == "openclip" else t
        for t, layout in zip(text, layouts, strict=True)
    ]
    full = keymaps.join_single_file(families.get(model.family), unet, vae, original)
    text_keys = [k for k in full if not k.startswith((keymaps.UNET_PREFIX, keymaps.VAE_PREFIX))]
    assert {next(p for p in prefixes if k.startswith(p)) for k in text_keys} == set(prefixes)
    training = {"model_ema.decay": torch.ones(()), "alphas_cumprod": torch.ones(3), "betas": torch.ones(3)}
    extras = {"v_pred": torch.tensor([])}
    position_ids = {
        p + "text_model.embeddings.position_ids": torch.arange(77) for p in prefixes if "transformer" in p
    }
    parts = keymaps.split_single_file(full | training | extras | position_ids)
    assert_same(parts.unet, unet)
    assert_same(parts.vae, vae)
    assert parts.text_layouts == layouts
    for got, want in zip(parts.text, original, strict=True):
        assert_same(got, want)
    assert_same(parts.extras, extras)
    assert_same(keymaps.join_single_file(families.get(model.family), parts.unet, parts.vae, parts.text), full)


def test_split_matches_diffusers_prefix_handling() -> None:
    """SD1's openai text encoder: what diffusers' `convert_ldm_clip_checkpoint` strips, we strip."""
    unet, vae, text = _components(TINY_MODELS["sd1"])
    full = keymaps.join_single_file(families.SD1, unet, vae, text)
    assert_same(keymaps.split_single_file(full).text[0], sfu.convert_ldm_clip_checkpoint(full))


# ---------------------------------------------------------------------------------------------
# diffusers configs


@pytest.mark.parametrize("model", [SD1, SD2, SDXL], ids=["sd1", "sd2", "sdxl"])
def test_configs_mirror_diffusers_single_file_configs(model: ModelConfig) -> None:
    ours = keymaps.diffusers_configs(model)
    original = ldm_original_config(model.unet, model.vae)
    unet = sfu.create_unet_diffusers_config_from_ldm(original, {})
    assert {k: ours["unet/config.json"].get(k) for k in unet if k != "sample_size"} == {
        k: v for k, v in unet.items() if k != "sample_size"
    }
    vae = sfu.create_vae_diffusers_config_from_ldm(original, {})
    assert {k: ours["vae/config.json"][k] for k in vae if k != "sample_size"} == {
        k: v for k, v in vae.items() if k != "sample_size"
    }
    size = {"sd1": 512, "sd2": 512, "sdxl": 1024}[model.family]
    assert ours["unet/config.json"]["sample_size"] * 8 == ours["vae/config.json"]["sample_size"] == size


def test_config_subtleties() -> None:
    sd2 = keymaps.diffusers_configs(replace(SD2, family="sd2-v", prediction="v"))
    assert sd2["unet/config.json"]["attention_head_dim"] == [5, 10, 20, 20]  # heads per level, not a width
    assert sd2["unet/config.json"]["sample_size"] == 96  # 768-v
    assert sd2["scheduler/scheduler_config.json"]["prediction_type"] == "v_prediction"
    assert sd2["text_encoder/config.json"]["num_hidden_layers"] == 23  # conditioning = last_hidden_state
    xl = keymaps.diffusers_configs(SDXL)
    assert xl["unet/config.json"]["transformer_layers_per_block"] == [0, 2, 10]
    assert xl["text_encoder/config.json"]["num_hidden_layers"] == 12
    assert xl["text_encoder_2/config.json"]["architectures"] == ["CLIPTextModelWithProjection"]
    assert xl["model_index.json"]["_class_name"] == "StableDiffusionXLPipeline"
    inpaint = keymaps.diffusers_configs(
        replace(SD1, family="sd1-inpaint", unet=replace(SD1.unet, in_channels=9))
    )
    assert inpaint["model_index.json"]["_class_name"] == "StableDiffusionInpaintPipeline"
    irregular = keymaps.diffusers_configs(TINY_MODELS["irregular"])["unet/config.json"]
    assert irregular["transformer_layers_per_block"] == [[1], [2, 1]]
    assert irregular["reverse_transformer_layers_per_block"] == [[1, 2, 1], [2, 1]]
    assert irregular["layers_per_block"] == [1, 2]


def test_configs_reject_what_diffusers_cannot_hold() -> None:
    mixed = replace(
        TINY_MODELS["sd1"], unet=replace(TINY_UNETS["sd1"], transformer_depth_output=(0, 1, 0, 0))
    )
    with pytest.raises(ValueError, match="some ResBlocks only"):
        keymaps.diffusers_configs(mixed)
    odd_vae = replace(TINY_MODELS["sd1"], vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, embed_dim=3))
    with pytest.raises(ValueError, match="embed_dim"):
        keymaps.diffusers_configs(odd_vae)


def _write_folder(model: ModelConfig, folder: Path) -> tuple[StateDict, StateDict, list[StateDict]]:
    """A tiny diffusers folder written through the key maps, as `sdlab convert` writes one."""
    from sdlab.text.tokenizer import CLIPTokenizer

    unet, vae, text = _components(model)
    for rel, content in keymaps.diffusers_configs(model).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(content))
    weights = "diffusion_pytorch_model.safetensors"
    save_file(keymaps.unet_ldm_to_diffusers(unet, model.unet), folder / "unet" / weights)
    save_file(keymaps.vae_ldm_to_diffusers(vae, model.vae), folder / "vae" / weights)
    for spec, sd, cfg in zip(families.get(model.family).text, text, model.text, strict=True):
        save_file(sd, folder / spec.diffusers_folder / "model.safetensors")
        tokenizer = folder / spec.tokenizer_folder
        CLIPTokenizer.default().save_folder(tokenizer, pad_token=cfg.pad_token)
    return unet, vae, text


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_diffusers_pipeline_loads_written_folder(name: str, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    model = TINY_MODELS[name]
    unet, vae, text = _write_folder(model, tmp_path)
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    assert type(pipe).__name__ == keymaps.diffusers_configs(model)["model_index.json"]["_class_name"]
    assert_same(keymaps.unet_diffusers_to_ldm(pipe.unet.state_dict()), unet)
    assert_same(keymaps.vae_diffusers_to_ldm(pipe.vae.state_dict()), vae)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if len(text) == 2 else [])
    for encoder, sd in zip(encoders, text, strict=True):
        assert_same(keymaps.text_from_transformers(encoder.state_dict()), sd)
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_sd2_text_encoder_loads_in_diffusers_as_the_penultimate_layer(tmp_path: Path) -> None:
    """diffusers' SD2 converter drops `resblocks.23` and reads our 23-layer config: its last_hidden_state
    is our penultimate layer after the final layer norm, SD2's conditioning."""
    text_cfg = replace(TINY_OPENCLIP, layers=24)
    model = replace(SD2, text=(text_cfg,))
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder/config.json").write_text(
        json.dumps(keymaps.diffusers_configs(model)["text_encoder/config.json"])
    )
    ours = randomize(OurCLIP(text_cfg), seed=6)
    single = prefixed("cond_stage_model.model.", keymaps.text_openai_to_openclip(ours.state_dict()))
    ref = sfu.create_diffusers_clip_model_from_ldm(
        CLIPTextModel, single, subfolder="text_encoder", config=str(tmp_path)
    )
    ids = torch.tensor([[49406, 320, 1125, 49407, 0, 0]])
    with torch.no_grad():
        out = ours(ids)
        penultimate = ours.text_model.final_layer_norm(out.layer(2))
        expected = ref(ids).last_hidden_state
    assert max_diff(penultimate, expected) <= 1e-5
    assert max_diff(out.last, expected) > 1e-2  # the last layer is not what diffusers conditions on
