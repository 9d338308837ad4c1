"""ControlNet: the network and its key maps against diffusers' ControlNetModel, both file layouts, the
U-Net's residual injection against diffusers' UNet2DConditionModel, control modes and guidance ranges
as sd-webui-controlnet computes them, preprocessors, and (slow) the whole pipeline at the SD1.5 shapes
against diffusers' StableDiffusionControlNetPipeline."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import diffusers_unet, max_diff, randomize
from tiny import TINY, write_tiny

from sdlab.checkpoints import keymaps
from sdlab.checkpoints.detect import detect_controlnet
from sdlab.checkpoints.io import CheckpointError, write_safetensors
from sdlab.checkpoints.load import load_model
from sdlab.config import SDXL_UNET, VAEConfig
from sdlab.control import Control, ControlSpec, control_residuals, load_controlnet, read_controlnet
from sdlab.models.controlnet import ControlNetConfig, ControlNetModel
from sdlab.models.unet import timestep_embedding
from sdlab.pipeline import GenerationRequest, generate
from sdlab.preprocess import canny, preprocess, preprocessor_names

TINY_CN = {name: ControlNetConfig(TINY[name].unet) for name in ("sd1", "sdxl")}


def _controlnet(name: str, seed: int = 5) -> ControlNetModel:
    return randomize(ControlNetModel(TINY_CN[name]), seed)  # type: ignore[return-value]


def _diffusers_controlnet(net: ControlNetModel):
    """diffusers' ControlNetModel built from sdlab's config, holding the same weights (diffusers checks
    every key and shape with strict loading)."""
    from diffusers import ControlNetModel as DiffusersControlNet

    cfg = net.cfg
    config = keymaps.controlnet_diffusers_config(cfg.unet, cfg.hint_channels, cfg.hint_block_channels)
    model = DiffusersControlNet(**{k: v for k, v in config.items() if not k.startswith("_")})
    model.load_state_dict(keymaps.controlnet_ldm_to_diffusers(net.state_dict(), cfg.unet), strict=True)
    return model.eval()


def _inputs(name: str, batch: int = 2, size: int = 16):
    """Latents, hint, timesteps, context, y and diffusers' added_cond_kwargs (SDXL: y = pooled text ‖
    sinusoidal embeddings of six size values, which diffusers computes from the values)."""
    g = torch.Generator().manual_seed(3)
    u = TINY[name].unet
    x = torch.randn(batch, 4, size // 8, size // 8, generator=g)
    hint = torch.rand(batch, 3, size, size, generator=g)
    t = torch.tensor([500.0, 20.0][:batch])
    context = torch.randn(batch, 7, u.context_dim, generator=g)
    if u.adm_in_channels is None:
        return x, hint, t, context, None, {}
    pooled = torch.randn(batch, 128, generator=g)
    sizes = torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 48.0]] * batch)
    y = torch.cat([pooled, timestep_embedding(sizes.flatten(), 256).reshape(batch, -1)], dim=1)
    return x, hint, t, context, y, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": sizes}}


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_residuals_match_diffusers_controlnet(name: str) -> None:
    net = _controlnet(name)
    x, hint, t, context, y, extra = _inputs(name)
    ref = _diffusers_controlnet(net)
    with torch.no_grad():
        ours = net(x, hint, t, context, y)
        down, mid = ref(x, t, context, hint, return_dict=False, **extra)
    assert len(ours) == len(down) + 1
    for a, b in zip(ours, [*down, mid], strict=True):
        assert max_diff(a, b) <= 1e-5 * b.abs().max()
    assert mid.abs().max() > 0.1  # the zero convolutions are random here, so the residuals are not zero


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_unet_adds_residuals_as_diffusers_does(name: str) -> None:
    from sdlab.models.unet import UNetModel

    cfg = TINY[name]
    unet = randomize(UNetModel(cfg.unet), 7)
    x, hint, t, context, y, _ = _inputs(name)
    residuals = _controlnet(name)(x, hint, t, context, y)
    ref = diffusers_unet(unet.state_dict(), cfg.unet, cfg.vae)  # y through its class embedding
    extra = {} if y is None else {"class_labels": y}
    with torch.no_grad():
        ours = unet(x, t, context, y, residuals)
        plain = unet(x, t, context, y)
        theirs = ref(
            x,
            t,
            context,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            **extra,
        ).sample
    assert max_diff(ours, theirs) <= 1e-5 * theirs.abs().max()
    assert max_diff(ours, plain) > 1e-2  # the residuals change the prediction


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_key_maps_round_trip_and_detection(name: str) -> None:
    sd = _controlnet(name).state_dict()
    cfg = detect_controlnet(sd)
    assert cfg == TINY_CN[name]
    diffusers_sd = keymaps.controlnet_ldm_to_diffusers(sd, cfg.unet)
    assert set(diffusers_sd) == set(_diffusers_controlnet(_controlnet(name)).state_dict())
    back = keymaps.controlnet_diffusers_to_ldm(diffusers_sd)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


def test_both_file_layouts_load_the_same_network(tmp_path: Path) -> None:
    net = _controlnet("sd1")
    sd = net.state_dict()
    single = write_safetensors({f"control_model.{k}": v for k, v in sd.items()}, tmp_path / "cn.safetensors")
    bare = write_safetensors(dict(sd), tmp_path / "bare.safetensors")
    folder = tmp_path / "diffusers-cn"
    _diffusers_controlnet(net).save_pretrained(folder)  # the diffusers layout, written by diffusers
    for source in (single, bare, folder, folder / "diffusion_pytorch_model.safetensors"):
        loaded = load_controlnet(source).state_dict()
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd), source


def test_difference_controlnet_adds_the_base_unet(tmp_path: Path) -> None:
    from sdlab.models.unet import UNetModel

    sd = _controlnet("sd1").state_dict()
    base = randomize(UNetModel(TINY["sd1"].unet), 9).state_dict()
    diff = {k: v - base[k] if k in base else v for k, v in sd.items()}
    path = write_safetensors(
        {"difference": torch.zeros(1)} | {f"control_model.{k}": v for k, v in diff.items()},
        tmp_path / "diff.safetensors",
    )
    with pytest.raises(CheckpointError, match="difference ControlNet needs the model"):
        read_controlnet(path)
    got = read_controlnet(path, base)
    assert all(torch.allclose(got[k], sd[k], atol=1e-6) for k in sd)


def test_other_files_are_refused(tmp_path: Path) -> None:
    lora = write_safetensors({"lora_controlnet": torch.zeros(1)}, tmp_path / "control-lora.safetensors")
    with pytest.raises(CheckpointError, match="Control-LoRA"):
        read_controlnet(lora)
    model = write_tiny("sd1", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        read_controlnet(model)


def test_control_modes_and_weights() -> None:
    net = _controlnet("sd1")
    x, hint, t, context, _, _ = _inputs("sd1")
    hint = hint[:1]  # one control image for the batch
    with torch.no_grad():
        raw = net(x, hint.expand(2, -1, -1, -1), t, context)
    mark = torch.tensor([1.0, 0.0])  # row 0 conditional, row 1 unconditional

    def run(mode: str, weight: float = 0.7) -> list[torch.Tensor]:
        control = Control(net, hint, weight, 0.0, 1.0, mode)
        with torch.no_grad():
            out = control_residuals([control], x, t, context, None, mark, 0.5)
        assert out is not None
        return out

    n = len(raw)
    soft = [0.7 * 0.825 ** (12 - i) for i in range(n)]  # sd-webui-controlnet's soft injection
    for i, (b, p, c) in enumerate(zip(run("balanced"), run("prompt"), run("control"), strict=True)):
        assert torch.allclose(b, 0.7 * raw[i], atol=1e-6)
        assert torch.allclose(p, soft[i] * raw[i], atol=1e-6)
        assert torch.allclose(c[0], soft[i] * raw[i][0], atol=1e-6) and torch.equal(
            c[1], torch.zeros_like(c[1])
        )
    two = Control(net, hint, 0.3, 0.0, 1.0, "balanced")
    with torch.no_grad():
        summed = control_residuals(
            [Control(net, hint, 0.7, 0, 1, "balanced"), two], x, t, context, None, mark, 0
        )
    assert summed is not None and torch.allclose(summed[-1], raw[-1], atol=1e-5)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("cn")
    model = load_model(write_tiny("sd1", tmp / "sd1.safetensors"))
    sd = _controlnet("sd1").state_dict()
    return model, write_safetensors({f"control_model.{k}": v for k, v in sd.items()}, tmp / "cn.safetensors")


def _request(path: Path, **kw: object) -> GenerationRequest:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    spec = ControlSpec(str(path), image, **kw)  # type: ignore[arg-type]
    return GenerationRequest(
        "a red apple", "blurry", 32, 32, steps=4, sampler="euler", seed=3, controls=(spec,)
    )


def test_generate_applies_controls_in_the_guidance_range(sd1, monkeypatch: pytest.MonkeyPatch) -> None:
    model, path = sd1
    plain = generate(model, replace(_request(path), controls=()))
    zero = generate(model, _request(path, weight=0.0))
    assert torch.equal(zero.latents, plain.latents)  # weight 0 adds zero residuals
    full = generate(model, _request(path))
    assert max_diff(full.latents, plain.latents) > 1e-2

    calls: list[int] = []
    original = ControlNetModel.forward

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", spy)
    # A1111: active while (index of the last finished step) / steps lies in [start, end]; during steps
    # 0..3 that fraction is 0, 0, 1/4, 2/4 (state.sampling_step is set by the step callback)
    expected = {(0.0, 1.0): 4, (0.0, 0.3): 3, (0.0, 0.2): 2, (0.3, 1.0): 1, (0.5, 1.0): 1, (0.6, 1.0): 0}
    for (start, end), count in expected.items():
        calls.clear()
        generate(model, _request(path, guidance_start=start, guidance_end=end))
        assert len(calls) == count, (start, end)


def test_bad_units_are_named(sd1, tmp_path: Path) -> None:
    model, path = sd1
    for kw, message in (
        ({"weight": float("nan")}, "weight"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start"),
        ({"control_mode": "loud"}, "control_mode"),
        ({"preprocessor": "openpose"}, "OpenPose model weights"),
    ):
        with pytest.raises(ValueError, match=message):
            generate(model, _request(path, **kw))
    with pytest.raises(CheckpointError, match="no such ControlNet"):
        generate(model, _request(tmp_path / "missing.safetensors"))
    xl = write_safetensors(_controlnet("sdxl").state_dict(), tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="a ControlNet for a U-Net with model_channels 64"):
        generate(model, _request(xl))


def test_cli_control_matches_the_pipeline(sd1, tmp_path: Path) -> None:
    from sdlab.cli import main
    from sdlab.images import to_tensor

    model, path = sd1
    image = tmp_path / "control.png"
    _request(path).controls[0].image.save(image)  # type: ignore[union-attr]
    out = tmp_path / "out.png"
    args = ["generate", "a red apple", "-n", "blurry", "-m", str(model.source), "-W", "32", "-H", "32"]
    args += ["--steps", "4", "--cfg", "7", "--sampler", "euler", "-s", "3", "-o", str(out), "-q"]
    args += ["--control", f"{path}:{image}:0.6", "--control-mode", "prompt", "--control-end", "0.5"]
    assert main(args) == 0
    req = _request(path, weight=0.6, control_mode="prompt", guidance_end=0.5)
    expected = generate(model, replace(req, cfg_scale=7.0)).images[0]
    assert torch.equal(to_tensor(Image.open(out)), to_tensor(expected))
    assert main([*args[:-6], "--control", f"{path}"]) == 2  # no image: a one-line error


def _edge_image() -> Image.Image:
    rng = np.random.default_rng(1)
    arr = np.zeros((48, 64, 3), dtype=np.uint8)
    arr[10:30, 12:40] = (200, 30, 90)
    arr[25:44, 30:60] = (20, 180, 240)
    return Image.fromarray(np.clip(arr + rng.integers(0, 25, arr.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize(("low", "high"), [(100, 200), (20, 60), (1, 5)])
def test_canny_equals_opencv(low: int, high: int) -> None:
    cv2 = pytest.importorskip("cv2")
    image = _edge_image()
    ours = np.asarray(canny(image, low, high))
    ref = cv2.Canny(np.asarray(image), low, high)
    assert np.array_equal(ours[..., 0], ref) and ref.any()


def test_preprocessors_are_listed_and_weights_named() -> None:
    assert {"none", "canny", "threshold", "invert", "lineart_standard", "tile_resample", "inpaint"} <= set(
        preprocessor_names()
    )
    with pytest.raises(ValueError, match="depth estimator"):
        preprocess("depth_midas", _edge_image())
    with pytest.raises(ValueError, match="unknown preprocessor"):
        preprocess("sharpen", _edge_image())
    grey = np.asarray(preprocess("threshold", _edge_image(), threshold_a=100))
    assert set(np.unique(grey)) <= {0, 255}


def test_lineart_standard_matches_the_extension_formula() -> None:
    cv2 = pytest.importorskip("cv2")
    image = _edge_image()
    x = np.asarray(image).astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    ref = (intensity * 127).clip(0, 255).astype(np.uint8)
    ours = np.asarray(preprocess("lineart_standard", image))[..., 0]
    assert np.abs(ours.astype(int) - ref).max() <= 1  # float sums in another order


def test_inpaint_hint_marks_the_masked_pixels() -> None:
    from sdlab.control import hint_tensor

    mask = Image.new("L", (64, 48))
    mask.paste(255, (0, 0, 32, 48))
    hint = hint_tensor(preprocess("inpaint", _edge_image(), mask))
    assert torch.equal(hint[..., :32], torch.full_like(hint[..., :32], -1.0))
    assert torch.allclose(hint[..., 32:], hint_tensor(_edge_image())[..., 32:])


@pytest.mark.slow
def test_sd15_controlnet_matches_diffusers_pipeline_both_layouts(real_size_files, tmp_path: Path) -> None:
    """SD1.5 shapes, a random-weight ControlNet at the real SD1.5 ControlNet shape (361 M parameters) as
    a `control_model.*` single file; diffusers reads it with its own converter and writes its folder;
    sdlab's image from either file equals StableDiffusionControlNetPipeline's (Euler, Karras, CFG 7). That
    the control changes the image is checked on the tiny model and in the SDXL parity test (no third run)."""
    from diffusers import ControlNetModel as DiffusersControlNet
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from reference import diffusers_pipeline, psnr

    from sdlab.config import SD1_UNET

    path, config = real_size_files("sd1")
    seed, size, steps, cfg = 1234, 128, 4, 7.0
    prompt, negative = "a red apple on a wooden table", "blurry"
    net = randomize(ControlNetModel(ControlNetConfig(SD1_UNET)), 21)
    single = tmp_path / "control_sd15_random.safetensors"
    write_safetensors({f"control_model.{k}": v.half() for k, v in net.state_dict().items()}, single)
    del net
    ckpt = load_file_fp32(single)
    dconfig = keymaps.controlnet_diffusers_config(SD1_UNET, 3, (16, 32, 96, 256))
    with torch.device("meta"):  # every weight comes from the file: no 361 M-parameter random init
        ref_net = DiffusersControlNet(**{k: v for k, v in dconfig.items() if not k.startswith("_")})
    ref_net.load_state_dict(convert_controlnet_checkpoint(ckpt, dconfig), strict=True, assign=True)
    folder = tmp_path / "controlnet-diffusers"
    ref_net.save_pretrained(folder)
    del ckpt

    image = _edge_image().resize((size, size))
    base = diffusers_pipeline(path, config)
    parts = {
        k: v
        for k, v in base.components.items()
        if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    }
    pipe = StableDiffusionControlNetPipeline(
        **parts,
        controlnet=ref_net.eval(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
    )
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        ref = pipe(
            prompt,
            image,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=cfg,
            negative_prompt=negative,
            latents=latents,
        ).images[0]
    del pipe, base, ref_net

    model = load_model(path)
    request = GenerationRequest(prompt, negative, size, size, steps, cfg, "euler", "karras", seed)
    for source in (single, folder):
        ours = generate(model, replace(request, controls=(ControlSpec(str(source), image),))).images[0]
        value = psnr(ours, ref)
        print(f"\nControlNet ({source.name}) vs diffusers: PSNR {value:.1f} dB")
        assert value >= 40.0


def load_file_fp32(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


# an SDXL of reduced width: SDXL's U-Net structure (channel_mult (1, 2, 4), 2 ResBlocks per level,
# transformer depths (0, 2, 10) and 10 in the middle, 64-channel heads, linear proj, the text_time
# add-embedding) at a fifth of the width, the tiny CLIP-L + bigG text encoders and a 4-level VAE (8x, as
# SD's, so the ControlNet keeps SD's hint embedding)
XL_REDUCED = replace(
    TINY["sdxl"],
    unet=replace(
        SDXL_UNET, model_channels=32, context_dim=256, adm_in_channels=128 + 6 * 256, num_head_channels=64
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, scale_factor=0.13025),
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for a test of many small matrix products: on a busy machine a second thread costs
    more in synchronisation than it gains (5x slower here at load 8)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sdxl_controlnet_matches_diffusers_pipeline_both_layouts(tmp_path: Path, one_thread: None) -> None:
    """A reduced-width SDXL and a random-weight ControlNet of its shape as a `control_model.*` single file;
    diffusers reads it with its own converter (plus the add-embedding, which that converter leaves out)
    and writes its folder; sdlab's image from either file equals StableDiffusionXLControlNetPipeline's
    (Euler, Karras, CFG 6, the pipeline loaded from the folder sdlab's converter writes)."""
    from diffusers import ControlNetModel as DiffusersControlNet
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from reference import psnr
    from tiny import tiny_checkpoint

    from sdlab.checkpoints.load import convert, save_single_file

    seed, size, steps, cfg = 1234, 64, 4, 6.0
    prompt, negative = "a red apple on a wooden table", "blurry"
    path = save_single_file(tiny_checkpoint(XL_REDUCED, seed=30), tmp_path / "xl.safetensors")
    net = randomize(ControlNetModel(ControlNetConfig(XL_REDUCED.unet)), 22)
    sd = net.state_dict()
    single = write_safetensors(
        {f"control_model.{k}": v for k, v in sd.items()}, tmp_path / "cn-xl.safetensors"
    )
    dconfig = keymaps.controlnet_diffusers_config(XL_REDUCED.unet, 3, net.cfg.hint_block_channels)
    with torch.device("meta"):  # every weight comes from the file
        ref_net = DiffusersControlNet(**{k: v for k, v in dconfig.items() if not k.startswith("_")})
    converted = convert_controlnet_checkpoint({f"control_model.{k}": v for k, v in sd.items()}, dconfig)
    for i, layer in ((1, 0), (2, 2)):
        for kind in ("weight", "bias"):
            converted[f"add_embedding.linear_{i}.{kind}"] = sd[f"label_emb.0.{layer}.{kind}"]
    ref_net.load_state_dict(converted, strict=True, assign=True)
    folder = tmp_path / "controlnet-xl-diffusers"
    ref_net.save_pretrained(folder)
    del net

    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        str(convert(path, tmp_path / "xl")),
        controlnet=ref_net.eval(),
        local_files_only=True,
        add_watermarker=False,
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    image = _edge_image().resize((size, size))
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        ref = pipe(
            prompt,
            image=image,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=cfg,
            negative_prompt=negative,
            latents=latents,
        ).images[0]
    del pipe

    model = load_model(path)
    assert model.config.unet == XL_REDUCED.unet
    request = GenerationRequest(prompt, negative, size, size, steps, cfg, "euler", "karras", seed)
    for source in (single, folder):
        ours = generate(model, replace(request, controls=(ControlSpec(str(source), image),))).images[0]
        value = psnr(ours, ref)
        print(f"\nSDXL ControlNet ({source.name}) vs diffusers: PSNR {value:.1f} dB")
        assert value >= 40.0
    assert psnr(generate(model, request).images[0], ref) < 30.0  # the control changes the image
