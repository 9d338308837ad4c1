"""Each network against the reference implementation on tiny configs with seeded random weights."""

from __future__ import annotations

import pytest
import torch
from reference import diffusers_unet, diffusers_vae, max_diff, randomize, transformers_clip

from sdlab.config import TextConfig, UNetConfig, VAEConfig, unet_config
from sdlab.models.clip import CLIPTextModel
from sdlab.models.unet import UNetModel
from sdlab.models.vae import AutoencoderKL

TOL = 1e-4  # fp32 parity

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_UNETS = {
    "sd1": unet_config(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        depth_per_level=(1, 0),
        num_heads=4,
        context_dim=24,
    ),
    "sd2": unet_config(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        depth_per_level=(1, 1, 0),
        num_heads=-1,
        num_head_channels=8,
        context_dim=24,
        use_linear_in_transformer=True,
    ),
    "adm": unet_config(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        depth_per_level=(0, 2, 3),
        num_heads=-1,
        num_head_channels=16,
        context_dim=24,
        use_linear_in_transformer=True,
        adm_in_channels=20,
        transformer_depth_middle=3,
    ),
    "inpaint": unet_config(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        depth_per_level=(1, 1),
        num_heads=2,
        context_dim=24,
        in_channels=9,
    ),
}


@pytest.mark.parametrize("name", TINY_UNETS)
def test_unet_matches_diffusers(name: str) -> None:
    cfg = TINY_UNETS[name]
    ours = randomize(UNetModel(cfg), seed=1)
    ref = diffusers_unet(ours.state_dict(), cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 16, 24, generator=g)
    t = torch.tensor([999.0, 17.0])
    ctx = torch.randn(2, 7, cfg.context_dim, generator=g)
    y = torch.randn(2, cfg.adm_in_channels, generator=g) if cfg.adm_in_channels else None
    with torch.no_grad():
        out = ours(x, t, ctx, y)
        expected = ref(x, t, encoder_hidden_states=ctx, class_labels=y).sample
    assert out.shape == (2, cfg.out_channels, 16, 24)
    assert expected.abs().max() > 0.1  # the comparison is not between near-zero outputs
    assert max_diff(out, expected) <= TOL


def test_unet_rejects_missing_vector_conditioning() -> None:
    cfg = TINY_UNETS["adm"]
    with pytest.raises(ValueError, match="vector conditioning"):
        UNetModel(cfg)(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 7, cfg.context_dim))


def test_unet_config_validation() -> None:
    with pytest.raises(ValueError, match="transformer_depth"):
        UNetConfig(
            channel_mult=(1, 2),
            num_res_blocks=(1, 1),
            transformer_depth=(1,),
            transformer_depth_output=(1,) * 4,
        )


def test_vae_matches_diffusers() -> None:
    ours = randomize(AutoencoderKL(TINY_VAE), seed=2)
    ref = diffusers_vae(ours.state_dict(), TINY_VAE, TINY_UNETS["sd1"])
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        post = ours.encode(x)
        ref_post = ref.encode(x).latent_dist
        assert max_diff(post.mean, ref_post.mean) <= TOL
        assert max_diff(post.logvar, ref_post.logvar) <= TOL
        z = post.mode()
        assert max_diff(ours.decode(z), ref.decode(z).sample) <= TOL
        assert max_diff(post.kl(), ref_post.kl()) <= TOL * max(1.0, float(ref_post.kl().abs().max()))


def test_posterior_sample_is_seeded() -> None:
    vae = randomize(AutoencoderKL(TINY_VAE), seed=2)
    x = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        post = vae.encode(x)
        a = post.sample(torch.Generator().manual_seed(5))
        b = post.sample(torch.Generator().manual_seed(5))
        c = post.sample(torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 4, 8, 8)


@pytest.mark.parametrize(
    "cfg",
    [
        TextConfig(width=64, layers=3, heads=4, intermediate=128),
        TextConfig(
            width=64,
            layers=3,
            heads=4,
            intermediate=128,
            act="gelu",
            projection_dim=48,
            layout="openclip",
            pad_token=0,
        ),
    ],
    ids=["openai", "openclip-projection"],
)
def test_clip_matches_transformers(cfg: TextConfig) -> None:
    ours = randomize(CLIPTextModel(cfg), seed=4)
    ref = transformers_clip(ours.state_dict(), cfg)
    ids = torch.tensor(
        [
            [49406, 320, 1125, 539, 320, 2368, 49407] + [cfg.pad_token] * 70,
            [49406, 2368, 49407] + [cfg.pad_token] * 74,
        ]
    )
    with torch.no_grad():
        out = ours(ids)
        r = ref(ids, output_hidden_states=True)
    assert max_diff(out.last, r.last_hidden_state) <= TOL
    assert max_diff(out.layer(2), r.hidden_states[-2]) <= TOL
    pooled = r.text_embeds if cfg.projection_dim else r.pooler_output
    assert max_diff(out.pooled, pooled) <= TOL
