"""LoRA formats beyond kohya LoRA/LoCon: diffusers/PEFT (diffusers itself as the oracle), old diffusers
attention processors, LyCORIS LoHa and LoKr (Tucker included), DoRA (LyCORIS `dora_scale` on either axis,
PEFT `lora_magnitude_vector` with peft as the oracle), on tiny SD1 and SDXL; and refusals that name the
file and key and leave the model untouched."""

from __future__ import annotations

import json
import os

import pytest
import torch
from reference import diffusers_unet, max_diff, randomize
from tiny import TINY

from sdlab import families, lora
from sdlab.checkpoints import keymaps
from sdlab.models.clip import CLIPTextModel
from sdlab.models.unet import UNetModel

torch.set_num_threads(1)
STRENGTH = 0.7
FAMILIES = ["sd1", "sdxl"]


def _models(name: str, seed: int = 0) -> tuple[UNetModel, list[CLIPTextModel], families.Family]:
    cfg = TINY[name]
    unet = randomize(UNetModel(cfg.unet), seed)
    texts = [randomize(CLIPTextModel(t), seed + 1 + i) for i, t in enumerate(cfg.text)]
    return unet, texts, families.get(cfg.family)


def _targets(unet, texts, fam) -> dict[str, torch.nn.Module]:
    """A few kohya-named layers of each kind: attention Linear, transformer proj_in (1x1 conv on SD1),
    ResBlock 3x3 conv and 1x1 skip, and attention / MLP Linears of every text encoder."""
    all_targets = lora.training_targets(unet, texts, fam, conv=True)
    wanted = (
        "attn1_to_q",
        "attn2_to_out_0",
        "proj_in",
        "in_layers_2",
        "skip_connection",
        "conv1",
        "conv_shortcut",
    )
    unet_names = [n for n in all_targets if n.startswith("lora_unet_") and n.endswith(wanted)]
    picked = {n: all_targets[n] for n in unet_names[:: max(1, len(unet_names) // 6)]}
    for spec in fam.text:
        for suffix in ("layers_0_self_attn_q_proj", "layers_1_mlp_fc1"):
            name = f"{spec.kohya_prefix}text_model_encoder_{suffix}"
            picked[name] = all_targets[name]
    kinds = {(type(m).__name__, tuple(m.weight.shape[2:])) for m in picked.values()}
    assert ("Conv2d", (3, 3)) in kinds and ("Linear", ()) in kinds, kinds
    return picked


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * 0.2


def _factor(n: int) -> int:
    return 4 if n % 4 == 0 else 2 if n % 2 == 0 else 1


# each builder: (layer, generator) -> (tensors by part, expected ΔW before strength)
def _loha(layer, g, tucker=False):
    w = layer.weight
    out, rank, alpha = w.shape[0], 3, 2.0
    if tucker and w.ndim == 4:
        kh, kw = w.shape[2:]
        t = {
            "hada_w1_a": _rand(g, rank, out),
            "hada_w1_b": _rand(g, rank, w.shape[1]),
            "hada_t1": _rand(g, rank, rank, kh, kw),
            "hada_w2_a": _rand(g, rank, out),
            "hada_w2_b": _rand(g, rank, w.shape[1]),
            "hada_t2": _rand(g, rank, rank, kh, kw),
        }

        def rebuild(core, a, b):  # Σ_ij core[i,j] a[i,p] b[j,r] written out with tensordot
            return torch.tensordot(torch.tensordot(core, b, dims=([1], [0])), a, dims=([0], [0])).permute(
                3, 2, 0, 1
            )

        m1 = rebuild(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        m2 = rebuild(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        return t | {"alpha": torch.tensor(alpha)}, m1 * m2 * alpha / rank
    inner = w[0].numel()
    t = {
        "hada_w1_a": _rand(g, out, rank),
        "hada_w1_b": _rand(g, rank, inner),
        "hada_w2_a": _rand(g, out, rank),
        "hada_w2_b": _rand(g, rank, inner),
    }
    delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * alpha / rank
    return t | {"alpha": torch.tensor(alpha)}, delta.reshape(w.shape)


def _lokr(layer, g, decomposed=False):
    w = layer.weight
    out, inp = w.shape[0], w.shape[1]
    a, b = _factor(out), _factor(inp)
    c, d = out // a, inp // b
    alpha, rank = 3.0, 2
    w1 = _rand(g, a, b)
    t: dict[str, torch.Tensor] = {"lokr_w1": w1, "alpha": torch.tensor(alpha)}
    if decomposed:
        w2a, w2b = _rand(g, c, rank), _rand(g, rank, d * w[0, 0].numel())
        t |= {"lokr_w2_a": w2a, "lokr_w2_b": w2b}
        w2 = (w2a @ w2b).reshape(c, d, *w.shape[2:])
        scale = alpha / rank
    else:
        w2 = _rand(g, c, d, *w.shape[2:])
        t["lokr_w2"] = w2
        scale = 1.0  # both factors full: alpha does not apply
    full = torch.zeros(out, inp, *w.shape[2:])
    for i in range(a):
        for j in range(b):
            full[i * c : (i + 1) * c, j * d : (j + 1) * d] = w1[i, j] * w2
    return t, full * scale  # kron by hand: block (i, j) is w1[i, j] · w2


def _lora_delta(layer, g, rank=4, alpha=2.0):
    w = layer.weight
    down, up = _rand(g, rank, *w.shape[1:]), _rand(g, w.shape[0], rank, *([1, 1] if w.ndim == 4 else []))
    return down, up, (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * alpha / rank


def _dora_lycoris(layer, g, axis):
    w = layer.weight.detach()
    down, up, delta = _lora_delta(layer, g)
    v = w + delta
    if axis == "out":
        m = v.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1)) * (
            1 + 0.3 * torch.rand(w.shape[0], generator=g)
        ).reshape(-1, *[1] * (w.ndim - 1))
        norm = v.flatten(1).norm(dim=1).reshape(m.shape)
    else:
        vt = v.transpose(0, 1)
        norm = vt.flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.ndim - 2))
        m = norm * (1 + 0.3 * torch.rand(norm.shape, generator=g))
    full = v * m / (norm + torch.finfo(torch.float32).eps)
    t = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0), "dora_scale": m}
    return t, full - w  # merged = W + strength·(W₁ − W), as A1111 and ComfyUI apply a strength


BUILDERS = {
    "loha": lambda layer, g: _loha(layer, g),
    "loha-tucker": lambda layer, g: _loha(layer, g, tucker=True),
    "lokr-full": lambda layer, g: _lokr(layer, g),
    "lokr-decomposed": lambda layer, g: _lokr(layer, g, decomposed=True),
    "dora-out": lambda layer, g: _dora_lycoris(layer, g, "out"),
    "dora-in": lambda layer, g: _dora_lycoris(layer, g, "in"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_lycoris_formats_merge_by_their_formulas(family: str, fmt: str) -> None:
    unet, texts, fam = _models(family)
    targets = _targets(unet, texts, fam)
    g = torch.Generator().manual_seed(3)
    sd, expected = {}, {}
    for name, layer in targets.items():
        tensors, delta = BUILDERS[fmt](layer, g)
        sd |= {f"{name}.{part}": v for part, v in tensors.items()}
        expected[name] = layer.weight.detach() + STRENGTH * delta
    before = {n: m.weight for n, m in targets.items()}
    merged = lora.merge_loras(unet, texts, fam, [(sd, STRENGTH)])
    assert sorted(merged.applied) == sorted(targets) and not merged.unmatched
    worst = max(max_diff(targets[n].weight, expected[n]) for n in targets)
    print(f"\n{family} {fmt}: max |W' - formula| {worst:.1e}")
    assert worst <= 1e-5
    merged.restore()
    assert all(targets[n].weight is before[n] for n in targets)


# ---------------------------------------------------------------------------------------------
# diffusers / PEFT, with diffusers and peft as oracles


def _diffusers_paths(unet: UNetModel) -> dict[str, torch.nn.Module]:
    """diffusers module path -> sdlab layer."""
    layers = dict(lora._layers(unet))
    renamed = keymaps.unet_ldm_to_diffusers({f"{p}.weight": p for p in layers}, unet.cfg)
    return {k.removesuffix(".weight"): layers[p] for k, p in renamed.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dora", [False, True])
def test_peft_unet_lora_matches_diffusers(family: str, dora: bool, tmp_path) -> None:
    """A PEFT adapter on diffusers' U-Net, saved with diffusers' own writer (alphas only in the
    `lora_adapter_metadata` header, one of them through alpha_pattern), merged by sdlab at 0.7 against
    diffusers loading the file (`load_lora_adapter`) and fusing it (`fuse_lora(lora_scale=0.7)`)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    os.environ["HF_HUB_OFFLINE"] = "1"
    unet, texts, fam = _models(family)
    by_path = _diffusers_paths(unet)
    attn = sorted(
        p for p in by_path if p.endswith(("attn1.to_q", "attn2.to_v", "attn1.to_out.0", "ff.net.2"))
    )
    convs = sorted(p for p in by_path if p.endswith(("resnets.0.conv1", "resnets.1.conv2", "conv_shortcut")))
    chosen = attn[:4] + convs[:3]
    assert any(by_path[p].weight.ndim == 4 and by_path[p].weight.shape[-1] == 3 for p in chosen)

    trainer = diffusers_unet(unet.state_dict(), unet.cfg)
    config = LoraConfig(
        r=4,
        lora_alpha=2,
        target_modules=chosen,
        alpha_pattern={chosen[0]: 8},
        init_lora_weights=False,
        use_dora=dora,
    )
    trainer.add_adapter(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    layers = get_peft_model_state_dict(trainer)
    meta = config.to_dict()
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=meta, weight_name="peft.safetensors"
    )
    path = tmp_path / "peft.safetensors"
    file_sd = lora.read_lora(path)
    assert all(k.startswith("unet.") for k in file_sd)
    assert any("lora_magnitude_vector" in k for k in file_sd) == dora

    oracle = diffusers_unet(unet.state_dict(), unet.cfg)
    oracle.load_lora_adapter(str(path), prefix="unet", adapter_name="x")
    oracle.set_adapters(["x"], [STRENGTH])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 5, unet.cfg.context_dim, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        expected_out = oracle(x, t, ctx).sample if family == "sd1" else None
    oracle.set_adapters(["x"], [1.0])  # the strength once, now through fuse_lora's scale
    oracle.fuse_lora(lora_scale=STRENGTH)
    fused = dict(oracle.named_modules())

    original = {p: by_path[p].weight for p in chosen}
    with lora.merge_loras(unet, texts, fam, [(file_sd, STRENGTH)]) as merged:
        assert (
            min(max_diff(by_path[p].weight.detach(), original[p].detach()) for p in chosen) > 1e-3
        )  # a real update
        assert sorted(merged.applied) == sorted(f"unet.{p}" for p in chosen)
        worst = max(
            max_diff(
                by_path[p].weight,
                fused[p].get_base_layer().weight if hasattr(fused[p], "get_base_layer") else fused[p].weight,
            )
            for p in chosen
        )
        kind = "PEFT DoRA" if dora else "PEFT"
        msg = f"\n{family} {kind} U-Net: max weight diff vs diffusers fuse_lora {worst:.1e}"
        if expected_out is not None:
            with torch.no_grad():
                d = max_diff(unet(x, t, ctx), expected_out)
            msg += f", U-Net output diff vs set_adapters {d:.1e}"
            assert d <= 1e-4
        print(msg)
        assert worst <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_text_encoder_names_and_metadata(family: str) -> None:
    """Text-encoder PEFT keys with (transformers 4) and without (transformers 5) `text_model.`, alphas
    from `.alpha` tensors or the header JSON, `lora_A.default.weight` variants."""
    unet, texts, fam = _models(family)
    g = torch.Generator().manual_seed(5)
    sd, expected, expect_layers = {}, [], []
    meta: dict = {}
    for i, (encoder, spec) in enumerate(zip(texts, fam.text, strict=True)):
        layers = dict(lora._layers(encoder))
        q = layers["text_model.encoder.layers.0.self_attn.q_proj"]
        fc1 = layers["text_model.encoder.layers.1.mlp.fc1"]
        folder = spec.diffusers_folder
        d1, u1, delta1 = _lora_delta(q, g, rank=4, alpha=4.0)  # the .alpha tensor says 3.0
        sd |= {
            f"{folder}.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": d1,
            f"{folder}.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": u1,
            f"{folder}.text_model.encoder.layers.0.self_attn.q_proj.alpha": torch.tensor(3.0),
        }
        d2, u2, delta2 = _lora_delta(fc1, g, rank=2, alpha=2.0)
        sd |= {
            f"{folder}.encoder.layers.1.mlp.fc1.lora_A.default.weight": d2,
            f"{folder}.encoder.layers.1.mlp.fc1.lora_B.default.weight": u2,
        }
        meta[folder] = {"r": 2, "lora_alpha": 1 + i, "alpha_pattern": {}, "rank_pattern": {}}
        expect_layers += [q, fc1]
        expected += [q.weight + STRENGTH * delta1 * 3 / 4, fc1.weight + STRENGTH * delta2 * (1 + i) / 2]
    metadata = {lora.METADATA_KEY: json.dumps(meta)}
    parsed = lora.parse_lora(sd, "x.safetensors", metadata)
    assert {u.scale for u in parsed.values()} == ({0.75, 0.5} if family == "sd1" else {0.75, 0.5, 1.0})
    # the metadata travels as .alpha tensors, as read_lora folds it in
    folded = dict(sd) | {f"{n}.alpha": torch.tensor(u.scale * u.rank) for n, u in parsed.items()}
    with lora.merge_loras(unet, texts, fam, [(folded, STRENGTH)]):
        for layer, want in zip(expect_layers, expected, strict=True):
            torch.testing.assert_close(layer.weight, want, rtol=1e-6, atol=1e-7)
    # without any alpha information PEFT's scale is 1
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    assert {u.scale for u in lora.parse_lora(no_alpha).values()} == {1.0}


@pytest.mark.parametrize("family", FAMILIES)
def test_old_diffusers_attention_processors(family: str) -> None:
    unet, texts, fam = _models(family)
    by_path = _diffusers_paths(unet)
    g = torch.Generator().manual_seed(7)
    sd, expected = {}, {}
    for path in sorted(p for p in by_path if p.endswith(("attn1.to_q", "attn2.to_out.0")))[:4]:
        layer = by_path[path]
        down, up, delta = _lora_delta(layer, g, rank=4, alpha=4.0)  # scale 1
        block, _, proj = path.removesuffix(".0").rpartition(".")
        sd |= {
            f"{block}.processor.{proj}_lora.down.weight": down,
            f"{block}.processor.{proj}_lora.up.weight": up,
        }
        expected[path] = layer.weight + STRENGTH * delta
    with lora.merge_loras(unet, texts, fam, [(sd, STRENGTH)]) as merged:
        assert len(merged.applied) == len(expected)
        for path, want in expected.items():
            torch.testing.assert_close(by_path[path].weight, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# refusals


def _snapshot(unet, texts):
    return [p.detach().clone() for m in (unet, *texts) for p in m.parameters()]


def test_unknown_and_misshaped_keys_are_refused_naming_file_and_key(tmp_path) -> None:
    from safetensors.torch import save_file

    unet, texts, fam = _models("sd1")
    targets = _targets(unet, texts, fam)
    good = {}
    g = torch.Generator().manual_seed(9)
    for name, layer in targets.items():
        tensors, _ = _loha(layer, g)
        good |= {f"{name}.{p}": v for p, v in tensors.items()}
    before, snap = {n: m.weight for n, m in targets.items()}, _snapshot(unet, texts)

    unknown = tmp_path / "unknown.safetensors"
    save_file(good | {"lora_unet_mid_block_attentions_0_proj_in.oft_blocks": torch.zeros(2)}, unknown)
    with pytest.raises(ValueError, match=r"unknown\.safetensors.*oft_blocks"):
        lora.read_lora(unknown)
    with pytest.raises(ValueError, match=r"unsupported LoRA tensor 'unet\.down_blocks\.0\.x\.lora_C"):
        lora.parse_lora({"unet.down_blocks.0.x.lora_C.weight": torch.zeros(1)})

    name = next(n for n, m in targets.items() if m.weight.ndim == 4 and m.weight.shape[-1] == 3)
    bad = dict(good)
    bad[f"{name}.hada_w2_b"] = bad[f"{name}.hada_w2_b"][:, :-1].contiguous()  # one column short
    path = tmp_path / "misshaped.safetensors"
    save_file(bad, path)
    with pytest.raises(ValueError, match=rf"misshaped\.safetensors: {name} \(.*{name}\.hada_w2_b"):
        lora.merge_loras(unet, texts, fam, [(good, 1.0), (lora.read_lora(path), 0.5)])
    assert all(m.weight is before[n] for n, m in targets.items())
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(unet, texts), snap, strict=True))

    with pytest.raises(ValueError, match="incomplete LoKr"):
        lora.parse_lora({f"{name}.lokr_w1": torch.zeros(2, 2)}, "f")
    dora = {f"{name}.lora_down.weight": torch.zeros(2, *before[name].shape[1:])}
    dora |= {
        f"{name}.lora_up.weight": torch.zeros(before[name].shape[0], 2, 1, 1),
        f"{name}.dora_scale": torch.ones(3, 1),
    }
    with pytest.raises(ValueError, match=rf"LoRA 0: {name}.*dora_scale of shape \(3, 1\)"):
        lora.merge_loras(unet, texts, fam, [(dora, 1.0)])
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(unet, texts), snap, strict=True))


def test_split_lora_by_network() -> None:
    sd = {
        "lora_unet_a.alpha": torch.zeros(()),
        "unet.down_blocks.0.x.lora_A.weight": torch.zeros(1),
        "down_blocks.0.attentions.0.processor.to_q_lora.up.weight": torch.zeros(1),
        "lora_te1_a.alpha": torch.zeros(()),
        "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1),
    }
    unet_part, text_part = lora.split_lora(sd)
    assert len(unet_part) == 3 and len(text_part) == 2


@pytest.mark.parametrize("family", ["sd1"])
def test_kohya_unet_lora_matches_diffusers(family: str) -> None:
    """A kohya LoRA/LoCon converted by diffusers' own `lora_state_dict` and fused into diffusers' U-Net,
    against sdlab's merge. SD1 only: diffusers' SDXL kohya converter assumes the full-size SDXL block
    layout (its LDM -> diffusers renaming of `input_blocks.N` is fixed), so it cannot read tiny SDXL files;
    tests/test_sdxl_everywhere.py covers kohya SDXL files."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    unet, texts, fam = _models(family)
    targets = {n: m for n, m in lora.training_targets(unet, texts, fam, conv=True).items() if "unet" in n}
    g = torch.Generator().manual_seed(11)
    sd = {}
    for name, layer in targets.items():
        down, up, _ = _lora_delta(layer, g, rank=4)
        sd |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(2.0),
        }
    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    converted, alphas = pipeline.lora_state_dict({k: v.clone() for k, v in sd.items()})
    oracle = diffusers_unet(unet.state_dict(), unet.cfg)
    oracle.load_lora_adapter(converted, network_alphas=alphas, prefix="unet", adapter_name="k")
    oracle.fuse_lora(lora_scale=STRENGTH)
    fused = dict(oracle.named_modules())
    by_path = _diffusers_paths(unet)
    with lora.merge_loras(unet, texts, fam, [(sd, STRENGTH)]):
        worst = max(
            max_diff(layer.weight.detach(), getattr(fused[p], "base_layer", fused[p]).weight.detach())
            for p, layer in by_path.items()
            if any(layer is t for t in targets.values())
        )
    print(f"\n{family} kohya LoRA/LoCon U-Net: max weight diff vs diffusers fuse_lora {worst:.1e}")
    assert worst <= 1e-5
