"""LoRA: kohya names against kohya's own rule on the diffusers/transformers modules, file round trip,
exact and reversible merging (Linear, 1x1 and 3x3 conv), both U-Net namings, SVD extraction."""

from __future__ import annotations

import pytest
import torch
from reference import diffusers_unet, randomize, transformers_clip
from tiny import TINY

from sdlab import families, lora
from sdlab.checkpoints.io import read_metadata
from sdlab.models.clip import CLIPTextModel
from sdlab.models.unet import UNetModel

torch.set_num_threads(1)


def _models(name: str, seed: int = 0) -> tuple[UNetModel, list[CLIPTextModel], families.Family]:
    cfg = TINY[name]
    unet = randomize(UNetModel(cfg.unet), seed)
    texts = [randomize(CLIPTextModel(t), seed + 1 + i) for i, t in enumerate(cfg.text)]
    return unet, texts, families.get(cfg.family)


def _random_lora(targets: dict, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya state dict with non-zero up weights on every target."""
    net = lora.LoRANetwork(targets, rank, alpha, conv_rank=3, conv_alpha=1.5)
    net.remove()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _kohya_names(root: torch.nn.Module, prefix: str, classes: tuple[str, ...], conv3x3: bool) -> set[str]:
    """kohya sd-scripts' `create_modules` rule, applied to a reference module tree."""
    names = set()
    for name, module in root.named_modules():
        if type(module).__name__ in classes:
            for child_name, child in module.named_modules():
                conv = isinstance(child, torch.nn.Conv2d)
                if isinstance(child, torch.nn.Linear) or (conv and (conv3x3 or child.kernel_size == (1, 1))):
                    names.add(f"{prefix}.{name}.{child_name}".replace(".", "_"))
    return names


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("conv", [False, True])
def test_names_match_kohya_on_diffusers_modules(family: str, conv: bool) -> None:
    unet, texts, fam = _models(family)
    ref_unet = diffusers_unet(unet.state_dict(), unet.cfg)
    ref_text = transformers_clip(texts[0].state_dict(), texts[0].cfg)
    classes = ("Transformer2DModel",) + (("ResnetBlock2D", "Downsample2D", "Upsample2D") if conv else ())
    expected = _kohya_names(ref_unet, "lora_unet", classes, conv)
    root = getattr(ref_text, "text_model", ref_text)  # transformers 5 has no text_model level
    te = _kohya_names(root, "lora_te.text_model", ("CLIPAttention", "CLIPMLP"), False)
    targets = lora.training_targets(unet, texts, fam, conv=conv)
    assert set(targets) == expected | te
    ref_layers = dict(ref_unet.named_modules())
    for name, layer in targets.items():  # the same weights under both names
        if name.startswith("lora_unet_"):
            path = next(p for p in ref_layers if "lora_unet_" + p.replace(".", "_") == name)
            assert torch.equal(ref_layers[path].weight.reshape(layer.weight.shape), layer.weight)


def test_sdxl_uses_ldm_names_and_two_text_prefixes() -> None:
    unet, texts, fam = _models("sdxl")
    names = set(lora.training_targets(unet, texts, fam))
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2" in names
    assert not any("down_blocks" in n for n in names)


def test_save_and_read_round_trip(tmp_path) -> None:
    unet, texts, fam = _models("sd1")
    sd = _random_lora(lora.training_targets(unet, texts, fam, conv=True))
    path = lora.save_lora(sd, tmp_path / "x.safetensors")
    back = lora.read_lora(path)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert back["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"].ndim == 0
    assert read_metadata(path)["ss_network_dim"] == "4"


def _outputs(unet: UNetModel, texts: list[CLIPTextModel]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, unet.cfg.context_dim, generator=g)
    ids = torch.tensor([[49406, 320, 1125, 49407, 49407]])
    with torch.no_grad():
        return unet(x, torch.tensor([10.0, 500.0]), ctx), texts[0](ids).last


def test_merge_is_exact_and_reversible() -> None:
    unet, texts, fam = _models("sd1")
    targets = lora.training_targets(unet, texts, fam, conv=True)
    sd_a, sd_b = _random_lora(targets, seed=1), _random_lora(targets, seed=2)
    before = {n: layer.weight for n, layer in targets.items()}
    ref_out = _outputs(unet, texts)
    merged = lora.merge_loras(unet, texts, fam, [(sd_a, 0.7), (sd_b, -0.3)])
    assert not merged.unmatched and len(merged.applied) == 2 * len(targets)
    for name, layer in targets.items():
        w = before[name]
        expected = w.clone()
        for sd, strength in ((sd_a, 0.7), (sd_b, -0.3)):
            down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
            scale = float(sd[f"{name}.alpha"]) / down.shape[0]
            expected = expected + strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        torch.testing.assert_close(layer.weight, expected, rtol=1e-6, atol=1e-7)
    merged.restore()
    assert all(targets[n].weight is before[n] for n in targets)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(unet, texts), ref_out))


def test_merged_equals_hooked_forward() -> None:
    unet, texts, fam = _models("sd1")
    sd = _random_lora(lora.training_targets(unet, texts, fam, conv=True))
    with lora.merge_loras(unet, texts, fam, [(sd, 0.8)]):
        merged = _outputs(unet, texts)
    net = lora.LoRANetwork(
        lora.training_targets(unet, texts, fam, conv=True), 4, 2.0, conv_rank=3, conv_alpha=1.5
    )
    net.load_state_dict(sd)
    for m in net.children():
        m.multiplier = 0.8
    hooked = _outputs(unet, texts)
    net.remove()
    for a, b in zip(merged, hooked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ldm_and_diffusers_names_load_the_same() -> None:
    unet, texts, fam = _models("sd1")
    targets = lora.training_targets(unet, texts, fam, naming="diffusers")
    sd = _random_lora(targets)
    to_ldm = {v: lora.unet_names(unet, "ldm")[k] for k, v in lora.unet_names(unet, "diffusers").items()}
    ldm_sd = {
        (to_ldm.get(k.partition(".")[0], k.partition(".")[0]) + "." + k.partition(".")[2]): v
        for k, v in sd.items()
    }
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in ldm_sd)
    with lora.merge_loras(unet, texts, fam, [(sd, 1.0)]):
        a = _outputs(unet, texts)
    with lora.merge_loras(unet, texts, fam, [(ldm_sd, 1.0)]):
        b = _outputs(unet, texts)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_wrong_model_and_unsupported_formats_are_clear_errors() -> None:
    unet, texts, fam = _models("sd1")
    original = {n: m.weight for n, m in lora.training_targets(unet, texts, fam).items()}
    sdxl_lora = _random_lora(lora.training_targets(*_models("sdxl")))
    with pytest.raises(ValueError, match="does not fit"):  # same names, other shapes
        lora.merge_loras(unet, texts, fam, [(sdxl_lora, 1.0)])
    assert all(m.weight is original[n] for n, m in lora.training_targets(unet, texts, fam).items())
    with pytest.raises(ValueError, match="fits this model"):
        lora.merge_loras(
            unet, texts, fam, [({k: v for k, v in sdxl_lora.items() if "input_blocks_3" in k}, 1.0)]
        )
    with pytest.raises(ValueError, match="LoHa"):
        lora.parse_lora({"lora_unet_x.hada_w1_a": torch.zeros(1)})
    foreign = {
        "lora_unet_nowhere.lora_down.weight": torch.zeros(1, 2),
        "lora_unet_nowhere.lora_up.weight": torch.zeros(2, 1),
    }
    sd = _random_lora(lora.training_targets(unet, texts, fam)) | foreign
    with lora.merge_loras(unet, texts, fam, [(sd, 1.0)]) as merged:
        assert merged.unmatched == ["lora_unet_nowhere"]


def test_extract_recovers_a_low_rank_difference() -> None:
    base_unet, base_texts, fam = _models("sd1")
    tuned_unet, tuned_texts, fam = _models("sd1")
    sd = _random_lora(lora.training_targets(tuned_unet, tuned_texts, fam, conv=True), rank=3)
    lora.merge_loras(tuned_unet, tuned_texts, fam, [(sd, 1.0)])  # tuned = base + a rank-3 update
    base = lora.training_targets(base_unet, base_texts, fam, conv=True)
    extracted = lora.extract_lora(
        base, lora.training_targets(tuned_unet, tuned_texts, fam, conv=True), rank=3
    )
    assert extracted.keys() == sd.keys()
    with lora.merge_loras(base_unet, base_texts, fam, [(extracted, 1.0)]):
        for a, b in zip(_outputs(base_unet, base_texts), _outputs(tuned_unet, tuned_texts)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
