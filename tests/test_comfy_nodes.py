"""ComfyUI's core nodes against oracles: ComfyUI's formulas transcribed (conditioning lists, area / mask
weighting, latent and image operations), whole runs that must agree (KSamplerAdvanced halves, the custom
sampling nodes, LatentFromBatch), /object_info entries as ComfyUI declares them, and the models folder
read in ComfyUI's layout and through extra_model_paths.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY, tiny_checkpoint, write_tiny

from sdlab.checkpoints import keymaps
from sdlab.checkpoints.io import write_safetensors
from sdlab.conditioning import Conditioning
from sdlab.diffusion.denoiser import Denoiser
from sdlab.diffusion.schedule import DiscreteSchedule
from sdlab.pipeline import _unet_fn, sampling_sigmas
from sdlab.regions import percent_to_sigma
from sdlab.server import graph, nodes
from sdlab.server import nodes_core as core
from sdlab.server.library import Library, ModelCache, ModelPathsError, extra_model_paths
from sdlab.server.paths import Folders


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> nodes.Env:
    tmp = tmp_path_factory.mktemp("comfy_nodes")
    root = tmp / "models"
    write_tiny("sd1", root / "checkpoints" / "tiny.safetensors")  # ComfyUI's folder name
    library = Library(root)
    return nodes.Env(library, ModelCache(library), Folders(root, tmp / "o", tmp / "i", tmp / "s"))


@pytest.fixture(scope="module")
def parts(env: nodes.Env) -> tuple:
    model, clip, vae = nodes.checkpoint_loader(env, "tiny.safetensors")
    with torch.inference_mode():
        (a,) = nodes.clip_text_encode(env, "a red cat", clip)
        (b,) = nodes.clip_text_encode(env, "a blue sky", clip)
        (n,) = nodes.clip_text_encode(env, "blurry", clip)
    return model, clip, vae, a, b, n


def _init(seed: int = 1, size: int = 16) -> nodes.Latent:
    z = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    return nodes.Latent(size * 8, size * 8, 1, z, scaling=(0.18215, 0.0))  # the tiny SD1 VAE's scale


def _one_step(env: nodes.Env, model: nodes.Model, pos, neg, latent: nodes.Latent, cfg: float) -> torch.Tensor:
    """The guided prediction D(x, σ_max): one euler step without added noise ends at it."""
    with torch.inference_mode():
        (out,) = nodes.ksampler_advanced(
            env, model, "disable", 0, 1, cfg, "euler", "normal", pos, neg, latent, 0, 10000, "disable"
        )
    return out.samples


def _denoise(model: nodes.Model, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    sd = model.sd
    d = Denoiser(_unet_fn(sd), DiscreteSchedule.for_model(sd.config), sd.config.prediction)
    sigma = sampling_sigmas(sd, "euler", "normal", 1)[:1]
    with torch.inference_mode():
        return d(x, sigma, context=cond.context)


# ---------------------------------------------------------------------------------------------
# sampling


def test_ksampler_advanced_halves_equal_one_ksampler_run(env: nodes.Env, parts: tuple) -> None:
    model, _, _, a, _, n = parts
    (empty,) = nodes.empty_latent_image(env, 32, 32, 1)
    with torch.inference_mode():
        (full,) = nodes.ksampler(env, model, 7, 4, 6.0, "euler", "karras", a, n, empty, 1.0)
        (half,) = nodes.ksampler_advanced(
            env, model, "enable", 7, 4, 6.0, "euler", "karras", a, n, empty, 0, 2, "enable"
        )
        (rest,) = nodes.ksampler_advanced(
            env, model, "disable", 7, 4, 6.0, "euler", "karras", a, n, half, 2, 10000, "disable"
        )
    assert (rest.samples - full.samples).abs().max() <= 1e-5
    assert not torch.allclose(half.samples, full.samples, atol=1e-2)  # the first half left noise in


def test_custom_sampling_nodes_equal_ksampler(env: nodes.Env, parts: tuple) -> None:
    """RandomNoise + CFGGuider + KSamplerSelect + BasicScheduler -> SamplerCustomAdvanced, as a workflow."""
    model, _, _, a, _, n = parts
    (empty,) = nodes.empty_latent_image(env, 32, 32, 1)
    with torch.inference_mode():
        (expected,) = nodes.ksampler(env, model, 5, 3, 5.0, "euler", "normal", a, n, empty, 0.8)
        (noise,) = core.random_noise(env, 5)
        (guider,) = core.cfg_guider(env, model, a, n, 5.0)
        (sampler,) = core.ksampler_select(env, "euler")
        (sigmas,) = core.basic_scheduler(env, model, "normal", 3, 0.8)
        out, denoised = core.sampler_custom_advanced(env, noise, guider, sampler, sigmas, empty)
    assert torch.equal(out.samples, expected.samples)
    # the last σ is 0: Euler's last step x + (x - denoised)/σ·(0 - σ) lands on the last prediction, up to
    # float32 rounding of that sum (a few ulp of the latents' magnitude)
    scale = out.samples.abs().max()
    torch.testing.assert_close(denoised.samples, out.samples, rtol=0, atol=1e-6 * scale)


def test_latent_from_batch_keeps_each_images_noise(env: nodes.Env, parts: tuple) -> None:
    model, _, _, a, _, n = parts
    (batch,) = nodes.empty_latent_image(env, 32, 32, 3)
    with torch.inference_mode():
        (picked,) = core.latent_from_batch(env, batch, 1, 2)
        (whole,) = nodes.ksampler(env, model, 11, 2, 5.0, "euler", "normal", a, n, batch, 1.0)
        (part,) = nodes.ksampler(env, model, 11, 2, 5.0, "euler", "normal", a, n, picked, 1.0)
    assert picked.batch_index == (1, 2)
    assert (
        part.samples - whole.samples[1:3]
    ).abs().max() <= 1e-5 * whole.samples.abs().max()  # batch rounding


# ---------------------------------------------------------------------------------------------
# conditioning lists


def test_average_concat_zero_out_follow_comfyui(env: nodes.Env, parts: tuple) -> None:
    _, _, _, a, b, _ = parts
    (avg,) = core.conditioning_average(env, a, b, 0.3)
    assert torch.allclose(avg.context, a.context * 0.3 + b.context * 0.7)
    long = Conditioning(torch.randn(1, 154, a.context.shape[2]))
    (padded,) = core.conditioning_average(env, long, a, 0.25)  # `from` shorter: zero-padded
    tail = torch.zeros(1, 77, a.context.shape[2])
    assert torch.allclose(padded.context, long.context * 0.25 + torch.cat([a.context, tail], 1) * 0.75)
    (cat,) = core.conditioning_concat(env, a, b)
    assert torch.equal(cat.context, torch.cat([a.context, b.context], 1))
    pooled = Conditioning(a.context, pooled=torch.ones(1, 8))
    (zero,) = core.conditioning_zero_out(env, pooled)
    assert not zero.context.any() and not zero.pooled.any()
    (both,) = core.conditioning_combine(env, a, cat)
    assert both == (a, cat)


def test_area_conditioning_is_comfyuis_weighting(env: nodes.Env, parts: tuple) -> None:
    """Combine(SetArea(A, right half), B) against cfg: each side Σ D·mult / Σ mult, the area's inner
    edge ramped over min(8, width/4) = 2 latent columns, the negative given a twin of A's area."""
    model, _, _, a, b, n = parts
    latent = _init()
    (area,) = core.conditioning_set_area(env, a, 64, 128, 64, 0, 0.7)
    (both,) = core.conditioning_combine(env, area, b)
    got = _one_step(env, model, both, n, latent, 4.0)

    x = latent.samples
    w = torch.ones(1, 4, 16, 8) * 0.7
    w[..., 0] *= 0.5
    pad = F.pad(w, (8, 0))

    def side(full: Conditioning, part: Conditioning) -> torch.Tensor:
        d_part = F.pad(_denoise(model, x[..., 8:], part) * w, (8, 0))
        return (_denoise(model, x, full) + d_part) / (1 + pad + 1e-37)

    cond, uncond = side(b, a), side(n, n)
    assert (got - (uncond + (cond - uncond) * 4.0)).abs().max() <= 1e-5


def test_mask_and_timestep_range(env: nodes.Env, parts: tuple) -> None:
    model, _, _, a, b, n = parts
    latent = _init(2)
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., :, :40] = 1.0
    (masked,) = core.conditioning_set_mask(env, a, mask, 0.8, "default")
    (both,) = core.conditioning_combine(env, masked, b)
    got = _one_step(env, model, both, n, latent, 1.0)  # cfg 1: the negative is not run
    m = F.interpolate(mask, size=(16, 16), mode="bilinear", align_corners=False) * 0.8
    x = latent.samples
    expected = (_denoise(model, x, b) + _denoise(model, x, a) * m) / (1 + m + 1e-37)
    assert (got - expected).abs().max() <= 1e-5

    sigma_max = float(sampling_sigmas(model.sd, "euler", "normal", 1)[0])
    assert percent_to_sigma(DiscreteSchedule.ddpm(), 0.5) < sigma_max
    (late,) = core.conditioning_set_timestep_range(env, a, 0.5, 1.0)  # inactive at σ_max
    (early,) = core.conditioning_set_timestep_range(env, a, 0.0, 0.5)
    only_b = _one_step(env, model, b, n, latent, 3.0)
    without_a = _one_step(env, model, core.conditioning_combine(env, late, b)[0], n, latent, 3.0)
    assert (without_a - only_b).abs().max() <= 1e-5 * only_b.abs().max()  # batched vs single calls
    with_a = _one_step(env, model, core.conditioning_combine(env, early, b)[0], n, latent, 3.0)
    plain = _one_step(env, model, core.conditioning_combine(env, a, b)[0], n, latent, 3.0)
    assert torch.allclose(with_a, plain, atol=1e-6) and not torch.allclose(with_a, only_b, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# latents and images


def test_latent_composite_blend_repeat(env: nodes.Env) -> None:
    to, source = _init(3), nodes.Latent(64, 64, 1, torch.randn(1, 4, 8, 8), scaling=(0.18215, 0.0))
    (plain,) = core.latent_composite(env, to, source, 32, 16, 0)
    expected = to.samples.clone()
    expected[:, :, 2:10, 4:12] = source.samples
    assert torch.equal(plain.samples, expected)
    (soft,) = core.latent_composite(env, to, source, 32, 16, 16)  # 2 latent pixels, all four edges inner
    ramp = torch.ones(8)
    ramp[0] = ramp[-1] = 0.5
    mask = ramp[:, None] * ramp[None, :]
    region = source.samples * mask + to.samples[:, :, 2:10, 4:12] * (1 - mask)
    assert torch.allclose(soft.samples[:, :, 2:10, 4:12], region)
    (blend,) = core.latent_blend(env, to, _init(4), 0.3)
    assert torch.allclose(blend.samples, to.samples * 0.3 + _init(4).samples * 0.7)
    (rep,) = core.repeat_latent_batch(env, to, 3)
    assert rep.samples.shape[0] == 3 and torch.equal(rep.samples[2], to.samples[0])
    (up,) = core.latent_upscale_by(env, to, "nearest-exact", 1.5)
    assert up.samples.shape[-2:] == (24, 24) and (up.width, up.height) == (192, 192)


def _comfy_outpaint_mask(
    h: int, w: int, left: int, top: int, right: int, bottom: int, f: int
) -> torch.Tensor:
    """ComfyUI's ImagePadForOutpaint mask loop, transcribed."""
    mask = torch.ones((h + top + bottom, w + left + right))
    t = torch.zeros((h, w))
    if f > 0 and f * 2 < h and f * 2 < w:
        for i in range(h):
            for j in range(w):
                dt = i if top != 0 else h
                db = h - i if bottom != 0 else h
                dl = j if left != 0 else w
                dr = w - j if right != 0 else w
                d = min(dt, db, dl, dr)
                if d >= f:
                    continue
                v = (f - d) / f
                t[i, j] = v * v
    mask[top : top + h, left : left + w] = t
    return mask


def test_image_nodes(env: nodes.Env) -> None:
    image = torch.rand(1, 3, 20, 24) * 2 - 1
    padded, mask = core.image_pad_for_outpaint(env, image, 8, 0, 16, 8, 6)
    assert padded.shape == (1, 3, 28, 48) and torch.equal(padded[:, :, 0:20, 8:32], image)
    assert not padded[:, :, 20:].any() and not padded[..., :8].any()  # grey 0.5 is 0 in [-1, 1]
    assert torch.allclose(mask[0, 0], _comfy_outpaint_mask(20, 24, 8, 0, 16, 8, 6), atol=1e-6)
    assert torch.equal(core.image_invert(env, image)[0], -image)
    (batch,) = core.image_batch(env, image, torch.zeros(2, 3, 10, 12))
    assert batch.shape == (3, 3, 20, 24) and torch.equal(batch[0], image[0]) and not batch[1:].any()
    (scaled,) = core.image_scale_by(env, image, "nearest-exact", 0.5)
    assert torch.equal(scaled, image[:, :, 1::2, 1::2])  # nearest-exact: pixel centres


# ---------------------------------------------------------------------------------------------
# /object_info and workflows


def test_object_info_matches_comfyuis_declarations(env: nodes.Env) -> None:
    area = nodes.object_info(env, "ConditioningSetArea")
    assert area["display_name"] == "Conditioning (Set Area)" and area["category"] == "conditioning"
    assert area["input"]["required"] == {
        "conditioning": ["CONDITIONING"],
        "width": ["INT", {"default": 64, "min": 64, "max": 16384, "step": 8}],
        "height": ["INT", {"default": 64, "min": 64, "max": 16384, "step": 8}],
        "x": ["INT", {"default": 0, "min": 0, "max": 16384, "step": 8}],
        "y": ["INT", {"default": 0, "min": 0, "max": 16384, "step": 8}],
        "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}],
    }
    composite = nodes.object_info(env, "LatentComposite")["input"]["required"]
    assert list(composite) == ["samples_to", "samples_from", "x", "y", "feather"]
    assert composite["feather"] == ["INT", {"default": 0, "min": 0, "max": 16384, "step": 8}]
    mask = nodes.object_info(env, "ConditioningSetMask")["input"]["required"]
    assert mask["set_cond_area"] == [["default", "mask bounds"]]
    pad = nodes.object_info(env, "ImagePadForOutpaint")
    assert pad["input"]["required"]["feathering"] == [
        "INT",
        {"default": 40, "min": 0, "max": 16384, "step": 1},
    ]
    assert pad["output"] == ["IMAGE", "MASK"] and pad["display_name"] == "Pad Image for Outpainting"
    save = nodes.object_info(env, "SaveImage")
    assert save["input"]["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert save["display_name"] == "Save Image"
    custom = nodes.object_info(env, "SamplerCustomAdvanced")
    assert custom["output"] == ["LATENT", "LATENT"] and custom["output_name"] == ["output", "denoised_output"]
    assert custom["category"] == "sampling/custom_sampling"
    assert nodes.object_info(env, "KSamplerAdvanced")["display_name"] == "KSampler (Advanced)"
    assert (
        "tiny.safetensors" in nodes.object_info(env, "CheckpointLoader")["input"]["required"]["ckpt_name"][0]
    )


def test_workflow_with_area_and_custom_sampler_runs(env: nodes.Env) -> None:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["1", 1]}},
        "4": {
            "class_type": "ConditioningSetAreaPercentage",
            "inputs": {
                "conditioning": ["3", 0],
                "width": 0.5,
                "height": 1.0,
                "x": 0.5,
                "y": 0,
                "strength": 1,
            },
        },
        "5": {
            "class_type": "ConditioningCombine",
            "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["4", 0]},
        },
        "6": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "9": {
            "class_type": "CFGGuider",
            "inputs": {"model": ["1", 0], "positive": ["5", 0], "negative": ["6", 0], "cfg": 5},
        },
        "10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "11": {
            "class_type": "BasicScheduler",
            "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2, "denoise": 1},
        },
        "12": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["8", 0],
                "guider": ["9", 0],
                "sampler": ["10", 0],
                "sigmas": ["11", 0],
                "latent_image": ["7", 0],
            },
        },
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 1], "vae": ["1", 2]}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}},
    }
    validation = graph.validate(prompt, env)
    assert validation.ok, validation.node_errors
    outputs = graph.execute(validation, env, lambda _: None, lambda *_: None)
    assert outputs["14"]["images"][0]["type"] == "temp"


def _split(root: Path, name: str, seed: int) -> None:
    """The tiny model `name` as standalone files: the U-Net in the original layout and with diffusers keys,
    text encoders in the transformers layout and (the OpenCLIP one) in OpenCLIP's, the VAE."""
    cfg = TINY[name]
    ckpt = tiny_checkpoint(cfg, seed)
    write_safetensors(
        {f"model.diffusion_model.{k}": v for k, v in ckpt.unet.items()}, root / "unet" / "u.safetensors"
    )
    diffusers = keymaps.unet_ldm_to_diffusers(ckpt.unet, cfg.unet)
    write_safetensors(diffusers, root / "diffusion_models" / f"{name}-diffusers.safetensors")
    for i, (layout, sd) in enumerate(zip(ckpt.text_layouts, ckpt.text, strict=True)):
        sd = keymaps.text_openai_to_openclip(sd) if layout == "openclip" else sd
        write_safetensors(sd, root / "clip" / f"{name}-{i}.safetensors")
    write_safetensors(ckpt.vae, root / "vae" / f"{name}-vae.safetensors")


def _image(env: nodes.Env, model: nodes.Model, clip: nodes.Clip, vae) -> torch.Tensor:
    """img2img through the nodes: encode, 2 euler steps at denoise 0.75, decode."""
    pixels = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    (pos,) = nodes.clip_text_encode(env, "a red cat", clip)
    (neg,) = nodes.clip_text_encode(env, "blurry", clip)
    (latent,) = nodes.vae_encode(env, pixels, vae)
    (out,) = nodes.ksampler(env, model, 5, 2, 6.0, "euler", "normal", pos, neg, latent, 0.75)
    return nodes.vae_decode(env, out, vae)[0]


def test_standalone_unet_clip_vae_equal_the_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_tiny("sd1", root / "checkpoints" / "tiny.safetensors")
    _split(root, "sd1", seed=0)
    library = Library(root)
    env = nodes.Env(
        library, ModelCache(library), Folders(root, tmp_path / "o", tmp_path / "i", tmp_path / "s")
    )
    run = {k: t.run for k, t in nodes.NODE_TYPES.items()}
    with torch.inference_mode():
        whole = _image(env, *run["CheckpointLoaderSimple"](env, ckpt_name="tiny.safetensors"))
        (clip,) = run["CLIPLoader"](env, clip_name="sd1-0.safetensors", type="stable_diffusion")
        (vae,) = run["VAELoader"](env, vae_name="sd1-vae.safetensors")
        for unet_name in ("u.safetensors", "sd1-diffusers.safetensors"):
            (model,) = run["UNETLoader"](env, unet_name=unet_name, weight_dtype="default")
            assert model.sd.family.name == "sd1" and model.sd.vae is None and model.sd.text_encoders == []
            assert torch.equal(_image(env, model, clip, vae), whole)
    with pytest.raises(nodes.NodeError, match="weight_dtype 'fp8_e4m3fn'"):
        run["UNETLoader"](env, unet_name="u.safetensors", weight_dtype="fp8_e4m3fn")
    with pytest.raises(nodes.NodeError, match="type 'sd3'"):
        run["CLIPLoader"](env, clip_name="sd1-0.safetensors", type="sd3")


def test_dual_clip_loader_sdxl_and_sdxl_unet(tmp_path: Path) -> None:
    """SDXL's CLIP-L and OpenCLIP bigG files (given in either order) condition as the checkpoint's do; a
    standalone SDXL U-Net is recognised as SDXL and denoises as the checkpoint's. The sizes are explicit:
    a U-Net alone takes its family's 8 pixels per latent (the tiny checkpoint's VAE has 2)."""
    root = tmp_path / "models"
    write_tiny("sdxl", root / "checkpoints" / "xl.safetensors", seed=4)
    _split(root, "sdxl", seed=4)
    library = Library(root)
    env = nodes.Env(
        library, ModelCache(library), Folders(root, tmp_path / "o", tmp_path / "i", tmp_path / "s")
    )
    model, clip, _ = nodes.checkpoint_loader(env, "xl.safetensors")
    with torch.inference_mode():
        sizes = (128, 128, 0, 0, 128, 128, "a red cat", "a cat")
        expected = nodes.clip_text_encode_sdxl(env, clip, *sizes)[0]
        for names in (("sdxl-0", "sdxl-1"), ("sdxl-1", "sdxl-0")):
            (dual,) = core.dual_clip_loader(env, f"{names[0]}.safetensors", f"{names[1]}.safetensors", "sdxl")
            got = nodes.clip_text_encode_sdxl(env, dual, *sizes)[0]
            assert torch.equal(got.context, expected.context) and torch.equal(got.pooled, expected.pooled)
        (unet,) = core.unet_loader(env, "sdxl-diffusers.safetensors", "default")
        assert unet.sd.family.name == "sdxl" and unet.sd.config.prediction == "eps"
        latent = _init(size=16)
        one = [_one_step(env, m, expected, expected, latent, 5.0) for m in (model, unet)]
    assert torch.equal(one[0], one[1])


# ---------------------------------------------------------------------------------------------
# the models folder


def test_comfyui_layout_and_extra_model_paths(tmp_path: Path) -> None:
    a1111 = tmp_path / "webui"
    (a1111 / "models" / "Stable-diffusion").mkdir(parents=True)
    (a1111 / "models" / "Stable-diffusion" / "a.safetensors").write_bytes(b"")
    (a1111 / "models" / "Lora" / "sub").mkdir(parents=True)
    (a1111 / "models" / "Lora" / "sub" / "l.safetensors").write_bytes(b"")
    comfy = tmp_path / "comfy" / "models"
    for kind, name in (
        ("checkpoints", "c.ckpt"),
        ("loras", "m.safetensors"),
        ("clip_vision", "v.safetensors"),
    ):
        (comfy / kind).mkdir(parents=True)
        (comfy / kind / name).write_bytes(b"")
    (tmp_path / "more_vae").mkdir()
    (tmp_path / "more_vae" / "v.pt").write_bytes(b"")
    yaml_file = tmp_path / "conf" / "extra_model_paths.yaml"
    yaml_file.parent.mkdir()
    yaml_file.write_text(
        f"a111:\n    base_path: {a1111}\n    checkpoints: models/Stable-diffusion\n    lora: models/Lora\n"
        "    loras: |\n        models/Lora\n        models/LyCORIS\n"
        "comfyui:\n    base_path: ../comfy/\n    is_default: true\n    checkpoints: models/checkpoints/\n"
        "    clip: models/clip/\n    clip_vision: models/clip_vision/\n"
        "other:\n    vae: ../more_vae\n"
        "empty:\n"
    )
    extra = extra_model_paths(yaml_file)
    assert ("loras", a1111 / "models" / "LyCORIS") in extra
    assert ("text_encoders", tmp_path / "comfy" / "models" / "clip") in extra  # the legacy name, renamed
    assert ("vae", tmp_path / "more_vae") in extra  # relative to the file without a base_path
    library = Library(comfy, extra)  # a ComfyUI models folder as the models folder
    assert {"a.safetensors", "c.ckpt"} <= set(library.checkpoints())
    assert set(library.loras()) == {"m.safetensors", "sub/l.safetensors"}
    assert set(library.vaes()) == {"v.pt"} and set(library.listing("clip_vision")) == {"v.safetensors"}

    bad = tmp_path / "bad.yaml"
    bad.write_text("a111:\n    checkpoints: [1, 2]\n")
    with pytest.raises(ModelPathsError, match="a111.checkpoints"):
        extra_model_paths(bad)
    bad.write_text("!!python/object/apply:os.system ['true']\n")  # safe_load refuses Python tags
    with pytest.raises(ModelPathsError):
        extra_model_paths(bad)
    run = subprocess.run(
        [sys.executable, "-m", "sdlab.cli", "serve", "--extra-model-paths", str(bad), "--port", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert run.returncode == 2 and "--extra-model-paths" in run.stderr
