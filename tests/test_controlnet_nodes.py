"""ComfyUI's ControlNet nodes on the tiny model: a ControlNetLoader + ControlNetApplyAdvanced run equals
a hand-written sampling loop with ComfyUI's rules (the control image centre-cut with ComfyUI's rounding
and resized by nearest-exact, residuals x strength, active over the σ range percent_to_sigma gives);
ControlNetApply reaches the negative side as ComfyUI's sampler makes it; a T2I-Adapter file through the
same nodes equals a loop with ComfyUI's `T2IAdapter` rules (odd latent sizes included); /object_info
entries as ComfyUI's nodes.py declares them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import TINY, write_tiny

from sdlab.checkpoints.io import write_safetensors
from sdlab.diffusion.schedule import DiscreteSchedule
from sdlab.models.controlnet import ControlNetConfig, ControlNetModel
from sdlab.models.t2i_adapter import T2IAdapterConfig, T2IAdapterModel, halve, place_features
from sdlab.pipeline import sampling_sigmas
from sdlab.regions import percent_to_sigma
from sdlab.server import nodes
from sdlab.server import nodes_controlnet as cn
from sdlab.server.library import Library, ModelCache
from sdlab.server.paths import Folders

STEPS, CFG, STRENGTH, START, END = 3, 5.0, 0.7, 0.2, 0.6


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> nodes.Env:
    tmp = tmp_path_factory.mktemp("controlnet_nodes")
    root = tmp / "models"
    write_tiny("sd1", root / "checkpoints" / "tiny.safetensors")
    net = ControlNetModel(ControlNetConfig(TINY["sd1"].unet))
    g = torch.Generator().manual_seed(11)
    sd = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in net.state_dict().items()}
    (root / "controlnet").mkdir()
    write_safetensors({f"control_model.{k}": v for k, v in sd.items()}, root / "controlnet/cn.safetensors")
    adapter = T2IAdapterModel(T2IAdapterConfig((32, 64), "full"))
    sd = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in adapter.state_dict().items()}
    write_safetensors(sd, root / "controlnet" / "t2iadapter_tiny.safetensors")
    library = Library(root)
    return nodes.Env(library, ModelCache(library), Folders(root, tmp / "o", tmp / "i", tmp / "s"))


def _image() -> torch.Tensor:
    """A 75 x 50 control image as IMAGE pixels in [-1, 1]."""
    g = torch.Generator().manual_seed(4)
    return torch.rand(1, 3, 50, 75, generator=g) * 2 - 1


def _comfy_hint(image01: torch.Tensor, size: int) -> torch.Tensor:
    """ComfyUI's common_upscale(·, size, size, "nearest-exact", "center") worked out by hand for 75 x 50:
    x = round((75 − 75·(1/1.5)) / 2) = round(12.5) = 12, so columns 12..62 (51 wide) stay; then source
    pixel floor((i + 0.5)·in/out) for each output pixel i."""
    cut = image01[..., :, 12:63]
    rows = np.minimum(np.floor((np.arange(size) + 0.5) * 50 / size), 49).astype(int)
    cols = np.minimum(np.floor((np.arange(size) + 0.5) * 51 / size), 50).astype(int)
    return cut[..., rows, :][..., :, cols]


def _latent(env: nodes.Env, z: torch.Tensor) -> nodes.Latent:
    """Noisy latents z (σ_max-sized) in the model's own scaling, so KSampler takes them as they are."""
    vae = nodes.checkpoint_loader(env, "tiny.safetensors")[2]
    return nodes.Latent(64, 64, 1, z, scaling=(vae.cfg.scale_factor, vae.cfg.shift_factor))


def _run(env: nodes.Env, apply: str, latent: nodes.Latent, name: str = "cn.safetensors") -> torch.Tensor:
    model, clip, _ = nodes.checkpoint_loader(env, "tiny.safetensors")
    (net,) = cn.controlnet_loader(env, name)
    with torch.inference_mode():
        (pos,) = nodes.clip_text_encode(env, "a red cat", clip)
        (neg,) = nodes.clip_text_encode(env, "blurry", clip)
        if apply == "advanced":
            pos, neg = cn.controlnet_apply_advanced(env, pos, neg, net, _image(), STRENGTH, START, END)
        elif apply == "advanced-whole":
            pos, neg = cn.controlnet_apply_advanced(env, pos, neg, net, _image(), STRENGTH, 0.0, 1.0)
        elif apply == "apply":
            (pos,) = cn.controlnet_apply(env, pos, net, _image(), STRENGTH)
        (out,) = nodes.ksampler_advanced(
            env, model, "disable", 0, STEPS, CFG, "euler", "normal", pos, neg, latent, 0, 10000, "disable"
        )
    return out.samples


def _manual(env: nodes.Env, z: torch.Tensor, name: str = "cn.safetensors") -> torch.Tensor:
    """Euler with CFG written out: each side's ControlNet residuals x strength while σ_end ≤ σ ≤ σ_start;
    for a T2I-Adapter its features of the hint (made once) x strength after its input blocks instead."""
    model, clip, _ = nodes.checkpoint_loader(env, "tiny.safetensors")
    sd = model.sd
    (net,) = cn.controlnet_loader(env, name)
    schedule = DiscreteSchedule.for_model(sd.config)
    hi, lo = percent_to_sigma(schedule, START), percent_to_sigma(schedule, END)
    hint = _comfy_hint((_image() + 1) / 2, z.shape[-1] * 8)
    adapter = isinstance(net, T2IAdapterModel)
    if adapter:
        features = [f * STRENGTH for f in net(hint, pooling="comfyui")]
        features = place_features(sd.unet.cfg, features, *z.shape[-2:])
    sigmas = sampling_sigmas(sd, "euler", "normal", STEPS)
    with torch.inference_mode():
        (pos,) = nodes.clip_text_encode(env, "a red cat", clip)
        (neg,) = nodes.clip_text_encode(env, "blurry", clip)
        x = z.clone()
        for i in range(STEPS):
            s = sigmas[i]
            x_in, t = x / (s**2 + 1) ** 0.5, schedule.sigma_to_t(s[None])
            d = []
            for c in (pos, neg):
                res, feats = None, None
                if lo <= float(s) <= hi and adapter:
                    feats = features
                elif lo <= float(s) <= hi:
                    res = [r * STRENGTH for r in net(x_in, hint, t, c.context)]
                d.append(x - sd.unet(x_in, t, c.context, None, res, feats) * s)
            denoised = d[1] + (d[0] - d[1]) * CFG
            x = x + (x - denoised) / s * (sigmas[i + 1] - s)
    return x


def test_apply_advanced_equals_comfyuis_rules(env: nodes.Env) -> None:
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 14
    latent = _latent(env, z)
    sd = nodes.checkpoint_loader(env, "tiny.safetensors")[0].sd
    schedule = DiscreteSchedule.for_model(sd.config)
    sigmas = sampling_sigmas(sd, "euler", "normal", STEPS)
    hi, lo = percent_to_sigma(schedule, START), percent_to_sigma(schedule, END)
    assert [lo <= float(s) <= hi for s in sigmas[:-1]] == [False, True, False]  # the range cuts both ends
    ours, manual = _run(env, "advanced", latent), _manual(env, z)
    plain = _run(env, "none", latent)
    assert (ours - manual).abs().max() <= 1e-4 * manual.abs().max()
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max()  # the ControlNet does change the result


def test_apply_reaches_the_negative_side(env: nodes.Env) -> None:
    """ControlNetApply on the positive only: ComfyUI's sampler gives the negative its ControlNet too
    (`control_apply_to_uncond`), so it equals ControlNetApplyAdvanced on both over the whole schedule."""
    latent = _latent(env, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 14)
    assert torch.equal(_run(env, "apply", latent), _run(env, "advanced-whole", latent))


def test_t2i_adapter_through_the_controlnet_nodes(env: nodes.Env) -> None:
    """ComfyUI's loaders load T2I-Adapters too; applied with ComfyUI's rules on 9x9 latents (an odd size
    its adapter pools with padding) the result equals the written-out loop."""
    z = torch.randn(1, 4, 9, 9, generator=torch.Generator().manual_seed(5)) * 14
    latent = _latent(env, z)
    ours = _run(env, "advanced", latent, "t2iadapter_tiny.safetensors")
    manual = _manual(env, z, "t2iadapter_tiny.safetensors")
    plain = _run(env, "none", latent)
    assert (ours - manual).abs().max() <= 1e-4 * manual.abs().max()
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max()  # the adapter does change the result


def test_comfyui_adapter_pooling_is_comfyuis_downsample() -> None:
    """ComfyUI's `Downsample` (comfy/t2i_adapter/adapter.py) transcribed: AvgPool2d(2, 2) with padding set
    to each side's parity before the call (zeros counted). diffusers' ceil mode differs on odd sides."""
    x = torch.rand(1, 3, 9, 6, generator=torch.Generator().manual_seed(0))
    op = torch.nn.AvgPool2d(kernel_size=2, stride=2)
    op.padding = [x.shape[2] % 2, x.shape[3] % 2]
    assert torch.equal(halve(x, "comfyui"), op(x))
    assert halve(x, "diffusers").shape == op(x).shape and not torch.allclose(halve(x, "diffusers"), op(x))
    even = x[..., :8, :]
    assert torch.equal(halve(even, "comfyui"), halve(even, "diffusers"))


def test_control_image_batch_is_refused(env: nodes.Env) -> None:
    (net,) = cn.controlnet_loader(env, "cn.safetensors")
    with pytest.raises(nodes.NodeError, match="image: a batch of 2"):
        cn._control(net, torch.zeros(2, 3, 8, 8), 1.0, 0.0, 1.0)


def test_object_info_matches_comfyuis_declarations(env: nodes.Env) -> None:
    strength = ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}]
    loader = nodes.object_info(env, "ControlNetLoader")
    names = [["cn.safetensors", "t2iadapter_tiny.safetensors"]]
    assert loader["input"] == {"required": {"control_net_name": names}}
    assert (loader["output"], loader["category"]) == (["CONTROL_NET"], "loaders")
    assert loader["display_name"] == "Load ControlNet Model"
    diff = nodes.object_info(env, "DiffControlNetLoader")
    assert diff["input"]["required"] == {"model": ["MODEL"], "control_net_name": names}
    assert diff["display_name"] == "Load ControlNet Model (diff)"
    apply = nodes.object_info(env, "ControlNetApply")
    assert apply["input"]["required"] == {
        "conditioning": ["CONDITIONING"],
        "control_net": ["CONTROL_NET"],
        "image": ["IMAGE"],
        "strength": strength,
    }
    assert (apply["output"], apply["category"]) == (["CONDITIONING"], "conditioning/controlnet")
    advanced = nodes.object_info(env, "ControlNetApplyAdvanced")
    assert advanced["input"]["required"] == {
        "positive": ["CONDITIONING"],
        "negative": ["CONDITIONING"],
        "control_net": ["CONTROL_NET"],
        "image": ["IMAGE"],
        "strength": strength,
        "start_percent": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}],
        "end_percent": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}],
    }
    assert advanced["input"]["optional"] == {"vae": ["VAE"]}
    assert advanced["output_name"] == ["positive", "negative"]
    assert advanced["display_name"] == "Apply ControlNet (Advanced)"
