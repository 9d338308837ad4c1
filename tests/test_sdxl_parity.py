"""SDXL parity at reduced widths with seeded random weights: the U-Net's vector input y (pooled text ‖
size / crop / aesthetic-score embeddings), both text encoders and the pooled output, `sdlab generate`
end to end, and base + refiner hand-over, each against diffusers / transformers as oracles.

The end-to-end tests load diffusers' pipelines from the folders sdlab's own converter writes
(`convert(single_file, folder)` -> `from_pretrained(folder)`), so they also check that writer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import diffusers_unet, max_diff, psnr, randomize, transformers_clip
from tiny import write_tiny

from sdlab import families
from sdlab.checkpoints.load import StableDiffusion, convert, load_model, read_checkpoint
from sdlab.cli import main
from sdlab.conditioning import Conditioning, encode_prompt_pair, encode_text
from sdlab.config import unet_config
from sdlab.models.unet import UNetModel
from sdlab.pipeline import GenerationRequest, generate
from sdlab.text.tokenizer import CLIPTokenizer

TOL = 1e-4  # fp32 networks of these depths agree to ~1e-6; 1e-4 leaves room for summation order
MIN_PSNR = 40.0
PROMPT, NEGATIVE = "a red apple on a wooden table, soft light", "blurry, low quality"


def _karras(config: dict):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True, timestep_spacing="linspace")


# ---------------------------------------------------------------------------------------------
# 1. the U-Net with its vector input y


def _xl_like_unet(context_dim: int, pooled: int, fields: int):
    """SDXL's block structure (channel_mult (1, 2, 4), 2 ResBlocks per level, transformers on levels 1
    and 2 only, 64-channel heads, linear proj) with depths (0, 1, 2) for (0, 2, 10), a fifth of the width."""
    return unet_config(
        model_channels=64,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        depth_per_level=(0, 1, 2),
        num_heads=-1,
        num_head_channels=64,
        context_dim=context_dim,
        use_linear_in_transformer=True,
        adm_in_channels=pooled + 256 * fields,
        transformer_depth_middle=2,
    )


@pytest.mark.parametrize("family_name", ["sdxl", "sdxl-refiner"])
def test_unet_vector_input_matches_diffusers(family_name: str) -> None:
    """y from `Conditioning.model_inputs` against diffusers' `add_embedding` input built from
    `added_cond_kwargs={"text_embeds", "time_ids"}` as its SDXL pipelines build `add_time_ids`.
    The context widths are the real ones (2048, 1280): diffusers' single-file converter recognises
    an SDXL U-Net (`addition_embed_type="text_time"`) by them."""
    family = families.get(family_name)
    refiner = "aesthetic_score" in family.vector
    pooled_dim = 256
    cfg = _xl_like_unet(1280 if refiner else 2048, pooled_dim, 5 if refiner else 6)
    ours = randomize(UNetModel(cfg), seed=21)
    ref = diffusers_unet(ours.state_dict(), cfg)
    assert ref.config.addition_embed_type == "text_time" and ref.config.class_embed_type is None

    g = torch.Generator().manual_seed(0)
    height, width = 128, 96  # pixels; not square, so a swapped (height, width) would show
    x = torch.randn(2, 4, height // 8, width // 8, generator=g)
    t = torch.tensor([981.0, 101.0])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    pooled = torch.randn(2, pooled_dim, generator=g)
    # row 0: every field set explicitly; row 1: the defaults (the sampled image's size, no crop)
    explicit = Conditioning(ctx[:1], pooled[:1], (1024, 768), (64, 32), (896, 1152), aesthetic_score=7.5)
    default = Conditioning(ctx[1:], pooled[1:])
    y = torch.cat(
        [
            explicit.model_inputs(family, 1, height, width)["y"],
            default.model_inputs(family, 1, height, width, negative=True)["y"],
        ]
    )
    assert y.shape == (2, cfg.adm_in_channels)
    if refiner:  # original_size + crops_coords_top_left + (aesthetic_score,); negative rows get 2.5
        time_ids = [[1024, 768, 64, 32, 7.5], [height, width, 0, 0, 2.5]]
    else:  # original_size + crops_coords_top_left + target_size
        time_ids = [[1024, 768, 64, 32, 896, 1152], [height, width, 0, 0, height, width]]
    time_ids = torch.tensor(time_ids, dtype=torch.float32)

    with torch.no_grad():
        eps = ours(x, t, ctx, y)
        assert eps.abs().mean() > 0.1  # a real comparison, not of near-zero outputs
        kw = {"encoder_hidden_states": ctx}
        expected = ref(x, t, **kw, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        swapped = time_ids.clone()
        swapped[:, [0, 1]] = swapped[:, [1, 0]]  # (width, height): the test must see the order
        wrong = ref(x, t, **kw, added_cond_kwargs={"text_embeds": pooled, "time_ids": swapped}).sample
    d, d_wrong = max_diff(eps, expected), max_diff(eps, wrong)
    print(f"\n{family_name} U-Net with y: max diff {d:.2e} (swapped sizes: {d_wrong:.2e})")
    assert d <= TOL
    assert d_wrong > 100 * TOL


# ---------------------------------------------------------------------------------------------
# models written to disk once per module: sdlab single files, the diffusers folders sdlab writes, and
# diffusers' pipelines loaded from those folders


@dataclass
class Models:
    base_path: Path
    base: StableDiffusion
    refiner: StableDiffusion
    base_folder: Path
    refiner_folder: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    os.environ["HF_HUB_OFFLINE"] = "1"
    d = tmp_path_factory.mktemp("sdxl")
    base_path = write_tiny("sdxl", d / "base.safetensors", seed=0)
    refiner_path = write_tiny("sdxl-refiner", d / "refiner.safetensors", seed=100)
    base, refiner = load_model(base_path), load_model(refiner_path)
    assert (base.config.family, refiner.config.family) == ("sdxl", "sdxl-refiner")
    return Models(
        base_path, base, refiner, convert(base_path, d / "base"), convert(refiner_path, d / "refiner")
    )


@pytest.fixture(scope="module")
def xl_pipe(models: Models):
    """StableDiffusionXLPipeline from the folder sdlab writes, with Euler over Karras σ."""
    from diffusers import StableDiffusionXLPipeline

    # add_watermarker: off whether or not invisible-watermark happens to be installed
    folder = str(models.base_folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)
    pipe.scheduler = _karras(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def refiner_pipe(models: Models):
    """StableDiffusionXLImg2ImgPipeline from the refiner folder sdlab writes (bigG only, aesthetic score)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    folder = str(models.refiner_folder)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        folder, local_files_only=True, add_watermarker=False
    )
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.config.requires_aesthetics_score
    pipe.scheduler = _karras(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# 2. both text encoders and the pooled output


def _transformers_tokenizer(folder: Path, pad_token: int):
    from transformers import CLIPTokenizer as HFTokenizer

    return HFTokenizer.from_pretrained(str(CLIPTokenizer.default().save_folder(folder, pad_token=pad_token)))


@pytest.mark.parametrize(
    ("negative", "clip_skip"),
    [(NEGATIVE, 1), ("", 1), (NEGATIVE, 2)],
    ids=["negative", "empty-negative", "clip-skip-2"],
)
def test_text_encoders_match_diffusers_encode_prompt(
    models: Models, negative: str, clip_skip: int, tmp_path: Path
) -> None:
    """`encode_prompt_pair` / `encode_text` against diffusers' `StableDiffusionXLPipeline.encode_prompt`
    running transformers' CLIPTextModel + CLIPTextModelWithProjection holding the file's weights
    (penultimate hidden states of each, concatenated; pooled = text_encoder_2's `text_embeds`)."""
    from diffusers import StableDiffusionXLPipeline

    model = models.base
    ckpt = read_checkpoint(models.base_path)
    encoders = [transformers_clip(sd, cfg) for sd, cfg in zip(ckpt.text, model.config.text)]
    assert type(encoders[1]).__name__ == "CLIPTextModelWithProjection"
    tokenizers = [
        _transformers_tokenizer(tmp_path / name, cfg.pad_token)
        for name, cfg in zip(("tokenizer", "tokenizer_2"), model.config.text)
    ]
    assert tokenizers[1].pad_token == "!"  # SDXL's second tokenizer pads with id 0
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=None,
        scheduler=None,
    )
    # sdlab's clip skip counts from the family's layer (1 = penultimate); diffusers' counts layers
    # skipped beyond it (None = penultimate): hidden_states[-(clip_skip + 2)]
    ref_skip = None if clip_skip == 1 else clip_skip - 1
    prompt_l = "a photograph of an astronaut"  # SDXL's text_l / text_g (diffusers' prompt / prompt_2)

    with torch.no_grad():
        cond, uncond = encode_prompt_pair(model, PROMPT, negative, clip_skip)
        # A1111 zeroes an empty negative prompt for SDXL; diffusers zeroes a missing one
        # (`force_zeros_for_empty_prompt`), so A1111's "" is diffusers' None
        ref = pipe.encode_prompt(PROMPT, device="cpu", negative_prompt=negative or None, clip_skip=ref_skip)
        if ref_skip is not None:  # diffusers ignores clip_skip on the negative side (its PR #13796):
            neg = pipe.encode_prompt(
                NEGATIVE, device="cpu", do_classifier_free_guidance=False, clip_skip=ref_skip
            )
            ref = (ref[0], neg[0], ref[2], neg[2])  # so the negative prompt is encoded as a prompt
        pairs = {
            "context": (cond.context, ref[0]),
            "negative context": (uncond.context, ref[1]),
            "pooled": (cond.pooled, ref[2]),
            "negative pooled": (uncond.pooled, ref[3]),
        }
        if clip_skip == 1:
            two = encode_text(model, [prompt_l, PROMPT])
            ref_two = pipe.encode_prompt(
                prompt_l, prompt_2=PROMPT, device="cpu", do_classifier_free_guidance=False
            )
            single = encode_text(model, PROMPT)
            pairs |= {
                "text_l/text_g context": (two.context, ref_two[0]),
                "text_l/text_g pooled": (two.pooled, ref_two[2]),
                "encode_text context": (single.context, ref[0]),
                "encode_text pooled": (single.pooled, ref[2]),
            }
    diffs = {}
    for name, (a, b) in pairs.items():
        assert a.shape == b.shape, (name, a.shape, b.shape)
        diffs[name] = max_diff(a, b)
    print("\ntext: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert cond.context.shape == (1, 77, 256) and cond.pooled.shape == (1, 128)
    assert all(v <= TOL for v in diffs.values()), diffs
    if negative:
        assert uncond.context.abs().mean() > 0.1 and max_diff(uncond.context, cond.context) > 0.1
    else:
        assert not uncond.context.any() and not uncond.pooled.any()


# ---------------------------------------------------------------------------------------------
# 3. `sdlab generate` against StableDiffusionXLPipeline

SEED, WIDTH, HEIGHT, STEPS, CFG = 1234, 64, 48, 8, 6.0  # not square: a swapped size would show


def _latents(model: StableDiffusion, seed: int = SEED) -> torch.Tensor:
    """The seed's initial noise as sdlab (and A1111) draw it; the tiny VAE downscales by 2, not 8."""
    f = model.config.vae.downscale
    shape = (1, 4, HEIGHT // f, WIDTH // f)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def _check_image(ours: Image.Image, ref: Image.Image, what: str) -> None:
    value, std = psnr(ours, ref), float(np.asarray(ref).std())
    print(f"\n{what} vs diffusers: PSNR {value:.1f} dB, reference std {std:.1f}")
    assert std > 5  # not a flat image
    assert value >= MIN_PSNR


def test_generate_matches_diffusers_sdxl(models: Models, xl_pipe, tmp_path: Path) -> None:
    out = tmp_path / "ours.png"
    args = ["generate", PROMPT, "-n", NEGATIVE, "-m", str(models.base_path), "-s", str(SEED)]
    args += ["-W", str(WIDTH), "-H", str(HEIGHT), "--steps", str(STEPS), "--cfg", str(CFG)]
    args += ["--sampler", "euler", "--scheduler", "karras"]
    assert main([*args, "-o", str(out), "-q"]) == 0
    ours = Image.open(out).convert("RGB")

    with torch.no_grad():
        ref = xl_pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            latents=_latents(models.base),
        ).images[0]
    _check_image(ours, ref, "sdxl generate")


# ---------------------------------------------------------------------------------------------
# 4. base + refiner, and the refiner alone


@contextmanager
def _counting(*modules: torch.nn.Module) -> Iterator[list[int]]:
    """The number of forward calls of each module while the block runs."""
    calls = [0] * len(modules)

    def hook(i: int):
        def count(*_: object) -> None:
            calls[i] += 1

        return count

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def test_refiner_handover_matches_diffusers(models: Models, xl_pipe, refiner_pipe) -> None:
    """A1111's refiner switch (>= 1.8) against diffusers' `denoising_end` / `denoising_start`."""
    switch = 0.7
    # both engines switch at the same step when no timestep sits within 0.5 of diffusers' cutoff
    # (sdlab compares the nearest integer timestep, diffusers the fractional one)
    xl_pipe.scheduler.set_timesteps(STEPS)
    cutoff = round(1000 - 1000 * switch)
    timesteps = xl_pipe.scheduler.timesteps
    assert (timesteps - cutoff).abs().min() > 0.5, (timesteps, cutoff)
    base_steps = int((timesteps >= cutoff).sum())
    assert 0 < base_steps < STEPS

    req = GenerationRequest(
        PROMPT,
        NEGATIVE,
        width=WIDTH,
        height=HEIGHT,
        steps=STEPS,
        cfg_scale=CFG,
        sampler="euler",
        scheduler="karras",
        seed=SEED,
        refiner="refiner",
        refiner_switch_at=switch,
    )
    with _counting(models.base.unet, models.refiner.unet) as ours_calls:
        ours = generate(models.base, req, refiner=models.refiner).images[0]

    common = {"negative_prompt": NEGATIVE, "num_inference_steps": STEPS, "guidance_scale": CFG}
    with torch.no_grad(), _counting(xl_pipe.unet, refiner_pipe.unet) as ref_calls:
        latents = xl_pipe(
            PROMPT,
            **common,
            height=HEIGHT,
            width=WIDTH,
            latents=_latents(models.base),
            denoising_end=switch,
            output_type="latent",
        ).images
        ref = refiner_pipe(PROMPT, **common, image=latents, denoising_start=switch).images[0]
    # both run one batched (cond ‖ uncond) U-Net call per step; the steps are counted because a switch
    # one step off still scores ~44 dB here, above the PSNR bound
    assert ref_calls == [base_steps, STEPS - base_steps]
    assert ours_calls == ref_calls
    _check_image(ours, ref, f"base + refiner ({base_steps}/{STEPS} base steps)")


def _test_image() -> Image.Image:
    """A smooth colour field with a disc and a bar: something with edges for img2img to start from."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH] / np.array([HEIGHT, WIDTH])[:, None, None]
    rgb = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.8 - 0.5 * xx * yy], axis=-1)
    rgb[(xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.05] = (0.9, 0.2, 0.1)
    rgb[(yy > 0.75) & (yy < 0.85)] = (0.1, 0.1, 0.1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def test_refiner_img2img_matches_diffusers(models: Models, refiner_pipe) -> None:
    """The refiner alone on an init image (A1111 img2img) against StableDiffusionXLImg2ImgPipeline.

    Two documented differences are bridged, not tolerated: A1111 runs t_enc + 1 steps for
    t_enc = int(strength · steps) where diffusers runs int(strength · steps), so diffusers gets the
    strength that gives the same steps; and sdlab draws the posterior sample and the initial noise from
    two generators seeded alike where diffusers draws both from one, so diffusers gets the init latents
    of its own VAE encoding with a posterior draw from a fresh generator (its `image` may be latents)."""
    model, strength = models.refiner, 0.5
    image = _test_image()
    req = GenerationRequest(
        PROMPT,
        NEGATIVE,
        width=WIDTH,
        height=HEIGHT,
        steps=STEPS,
        cfg_scale=CFG,
        sampler="euler",
        scheduler="karras",
        seed=SEED,
        init_image=image,
        strength=strength,
    )
    ours = generate(model, req).images[0]

    t_enc = int(strength * STEPS)
    ref_strength = (t_enc + 1) / STEPS
    assert int(ref_strength * STEPS) == t_enc + 1
    vae = refiner_pipe.vae
    with torch.no_grad():
        pixels = refiner_pipe.image_processor.preprocess(image)
        posterior = vae.encode(pixels).latent_dist
        init = posterior.sample(torch.Generator("cpu").manual_seed(SEED)) * vae.config.scaling_factor
        ref = refiner_pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            image=init,
            strength=ref_strength,
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]
    _check_image(ours, ref, f"refiner img2img ({t_enc + 1}/{STEPS} steps)")
