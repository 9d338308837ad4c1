"""Conditioning records: SDXL's two encoders, pooled output and vector input y; A1111's and ComfyUI's
empty negative; long prompts, weights and clip skip on both encoders; the refiner hand-over rule."""

from __future__ import annotations

import pytest
import torch
from tiny import write_tiny

from sdlab import families
from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.conditioning import Conditioning, encode_prompt_pair, encode_text
from sdlab.diffusion.schedule import DiscreteSchedule, get_sigmas
from sdlab.models.unet import timestep_embedding
from sdlab.pipeline import Calls, Guidance, Handover, _handing_over
from sdlab.text.comfy_prompt import comfy_chunks
from sdlab.text.prompt import chunk_prompt

LONG = ", ".join(f"word{i}" for i in range(40))  # > 75 tokens: several chunks


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StableDiffusion]:
    tmp = tmp_path_factory.mktemp("models")
    return {n: load_model(write_tiny(n, tmp / f"{n}.safetensors")) for n in ("sdxl", "sdxl-refiner", "sd1")}


def _ids(model: StableDiffusion, text: str, index: int, comfy: bool = True) -> torch.Tensor:
    """Encoder `index`'s token ids of a prompt without syntax, chunk by chunk (C, 77), cut into chunks as
    ComfyUI does (`encode_text`) or as A1111 does (`encode_prompt_pair`: at a comma)."""
    chunker = comfy_chunks if comfy else chunk_prompt
    chunks = chunker(model.tokenizer, text, model.config.text[index].pad_token)
    return torch.tensor([c.ids for c in chunks])


def test_vector_is_pooled_then_size_embeddings() -> None:
    pooled = torch.randn(1, 1280)
    cond = Conditioning(torch.zeros(1, 77, 2048), pooled, crop=(16, 8))
    y = cond.vector(families.SDXL, height=768, width=1024)
    emb = timestep_embedding(torch.tensor([768.0, 1024, 16, 8, 768, 1024]), 256).reshape(1, -1)
    assert y.shape == (1, 2816) and torch.equal(y, torch.cat([pooled, emb], dim=1))
    # the refiner: original size, crop, aesthetic score 6 (positive) / 2.5 (negative) unless given
    refiner = Conditioning(torch.zeros(1, 77, 1280), pooled)
    for negative, score in ((False, 6.0), (True, 2.5)):
        y = refiner.vector(families.SDXL_REFINER, 64, 96, negative)
        emb = timestep_embedding(torch.tensor([64.0, 96, 0, 0, score]), 256).reshape(1, -1)
        assert torch.equal(y, torch.cat([pooled, emb], dim=1))
    explicit = Conditioning(torch.zeros(1, 77, 1280), pooled, aesthetic_score=9.0)
    assert torch.equal(
        explicit.vector(families.SDXL_REFINER, 64, 96, True)[:, -256:],
        timestep_embedding(torch.tensor([9.0]), 256),
    )
    with pytest.raises(ValueError, match="pooled"):
        Conditioning(torch.zeros(1, 77, 2048)).vector(families.SDXL, 64, 64)


def test_sdxl_context_joins_both_encoders_penultimate_and_pools_big_g(
    models: dict[str, StableDiffusion],
) -> None:
    model = models["sdxl"]
    clip_l, big_g = model.text_encoders
    assert [c.pad_token for c in model.config.text] == [49407, 0]  # CLIP-L pads with EOS, bigG with 0
    assert _ids(model, "a cat", 1)[0, 4:].eq(0).all() and _ids(model, "a cat", 0)[0, 4:].eq(49407).all()
    with torch.no_grad():
        # the family's penultimate layer, clip skip 2 (one more) on both encoders, and ComfyUI's
        # CLIPSetLastLayer(-1): the last layer, still without the final layer norm
        for layer, comfy in ((2, True), (3, True), (1, True), (3, False)):
            if comfy:
                cond = encode_text(model, LONG, layer)
            else:  # A1111's clip skip 2: layer 3
                cond = encode_prompt_pair(model, LONG, "blurry", clip_skip=2)[0]
            z_l = clip_l(_ids(model, LONG, 0, comfy)).layer(layer)  # no final layer norm for SDXL
            out_g = big_g(_ids(model, LONG, 1, comfy))
            want = torch.cat([z_l, out_g.layer(layer)], dim=-1).reshape(1, -1, 256)
            assert cond.context.shape == (1, 77 * len(z_l), 256) and len(z_l) >= 2
            assert torch.allclose(cond.context, want, atol=1e-6)
            assert torch.allclose(cond.pooled, out_g.pooled[:1], atol=1e-6)  # first chunk, last layer
        assert not torch.equal(_ids(model, LONG, 0), _ids(model, LONG, 0, comfy=False))  # cut elsewhere


def test_weights_apply_to_each_encoder_with_its_own_mean(models: dict[str, StableDiffusion]) -> None:
    model = models["sdxl"]
    with torch.no_grad():
        plain, weighted = (
            encode_prompt_pair(model, p, "")[0].context for p in ("a red apple", "a (red:1.5) apple")
        )
    for half in (slice(0, 128), slice(128, 256)):
        a, b = plain[0, :, half], weighted[0, :, half]
        assert torch.allclose(a.mean(), b.mean(), atol=1e-6)  # A1111: each encoder's mean restored
        ratio = (b[2] / a[2]) / (b[1] / a[1])  # token 2 is "red"
        assert torch.allclose(ratio, torch.full_like(ratio, 1.5), rtol=1e-4)


def test_empty_negative_zeroed_for_a1111_encoded_for_comfyui(models: dict[str, StableDiffusion]) -> None:
    with torch.no_grad():
        for name in ("sdxl", "sdxl-refiner"):
            model = models[name]
            cond, uncond = encode_prompt_pair(model, "a cat", "")
            assert not cond.context.eq(0).all()
            assert uncond.context.eq(0).all() and uncond.pooled.eq(0).all()
            assert uncond.context.shape == cond.context.shape
            comfy = encode_text(model, "")  # ComfyUI encodes the empty prompt like any other
            assert not comfy.context.eq(0).all() and not comfy.pooled.eq(0).all()
            assert not encode_prompt_pair(model, "a cat", "blurry")[1].context.eq(0).all()
        sd1 = encode_prompt_pair(models["sd1"], "a cat", "")[1]  # SD1: A1111 encodes "" as text
        assert not sd1.context.eq(0).all() and sd1.pooled is None


def test_refiner_conditioning_uses_its_one_encoder(models: dict[str, StableDiffusion]) -> None:
    model = models["sdxl-refiner"]
    (big_g,) = model.text_encoders
    with torch.no_grad():
        cond = encode_text(model, "a cat")
        out = big_g(_ids(model, "a cat", 0))
    assert cond.context.shape == (1, 77, 128)
    assert torch.allclose(cond.context, out.layer(2), atol=1e-6)
    assert torch.allclose(cond.pooled, out.pooled, atol=1e-6)
    inputs = cond.model_inputs(model.family, 2, 64, 64, negative=True)
    assert inputs["y"].shape == (2, model.config.unet.adm_in_channels)


def _switch_call(sigmas: torch.Tensor, switch_at: float, by_steps: bool) -> int:
    """The denoiser call at which the hand-over takes place (Euler: one call per step)."""
    calls: list[str] = []
    first = lambda x, s, **kw: calls.append("base") or x  # noqa: E731
    handover = Handover(None, Guidance(None, None, 1.0), switch_at, by_steps)  # type: ignore[arg-type]
    import sdlab.pipeline as pipeline

    original = pipeline.guided_denoiser
    pipeline.guided_denoiser = lambda model, guidance, x, n: lambda x, s, **kw: calls.append("refiner") or x
    counter = Calls()
    try:
        d = _handing_over(first, handover, DiscreteSchedule.ddpm(), len(sigmas) - 1, counter)
        for s in sigmas[:-1]:
            d(torch.zeros(1), s[None])
            counter.n += 1
    finally:
        pipeline.guided_denoiser = original
    return calls.index("refiner") if "refiner" in calls else len(calls)


def test_refiner_switch_follows_a1111_timestep_rule_and_step_option() -> None:
    schedule = DiscreteSchedule.ddpm()
    sigmas = get_sigmas("karras", schedule, 20)
    t = [int((schedule.sigmas - s).abs().argmin()) for s in sigmas[:-1]]
    for f in (0.5, 0.8, 0.9):
        want = next(i for i, ti in enumerate(t) if (999 - ti) / 1000 >= f)
        assert _switch_call(sigmas, f, by_steps=False) == want
        assert t[want] < round(1000 - 1000 * f) <= t[want - 1] + 1  # diffusers' denoising_end cut-off
        assert _switch_call(sigmas, f, by_steps=True) == next(i for i in range(20) if i / 20 >= f)
    assert _switch_call(sigmas, 1.0, by_steps=False) == 20  # never: the base model does every step
