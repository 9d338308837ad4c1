"""Devices, precision, weight storage, offloading and attention choice (sdlab.devices, sdlab.models.ops,
sdlab.offload), checked on the CPU: half-precision runs against float32, the fp16-storage path against
fp32 weights bit for bit, the VAE's float32 retry, offload hooks moving weights (to the meta device)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import psnr, randomize
from test_comfy_nodes import _image as _comfy_image
from test_comfy_nodes import _split
from test_controlnet import _controlnet
from test_controlnet import _request as _cn_request
from test_controlnet_nodes import _latent, _run
from test_controlnet_nodes import env as nodes_env  # noqa: F401 (a fixture, requested by name)
from test_ip_adapter import TINY_VISION, _adapter_file, _image
from test_lora import _random_lora
from tiny import TINY, tiny_checkpoint, write_tiny

from sdlab import families, lora, offload
from sdlab.checkpoints.io import read_state_dict, write_safetensors
from sdlab.checkpoints.load import StableDiffusion, load_model, save_single_file
from sdlab.cli import main
from sdlab.conditioning import encode_prompts, encode_text
from sdlab.control import (
    ComfyControl,
    ControlSpec,
    adapter_features,
    comfy_features,
    comfy_residuals,
    control_residuals,
    load_controlnet,
    load_controls,
    prepare_controls,
)
from sdlab.devices import Placement, drop_file_pages, resolve_device, resolve_precision
from sdlab.finite import NonFiniteError
from sdlab.ip_adapter import (
    IPAdapterSpec,
    Resampler,
    cross_attentions,
    ip_adapters_applied,
    load_clip_vision,
    load_ip_adapter,
    prepare_ip_adapters,
)
from sdlab.models import blocks, ops
from sdlab.models.clip_vision import CLIPVisionModel
from sdlab.models.controlnet import ControlNetModel
from sdlab.models.t2i_adapter import T2IAdapterConfig, T2IAdapterModel
from sdlab.models.unet import UNetModel
from sdlab.offload import HOME
from sdlab.pipeline import GenerationRequest, generate
from sdlab.server import graph, nodes
from sdlab.server.library import Library, ModelCache
from sdlab.server.paths import Folders
from sdlab.vae_tools import decode_pixels, encode_pixels, save_latents

REQ = GenerationRequest(prompt="a red cube", negative_prompt="blur", seed=3, steps=1, width=32, height=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("devices")
    fp16 = save_single_file(tiny_checkpoint(TINY["sd1"]), tmp / "sd1-fp16.safetensors", dtype=torch.float16)
    return {"fp32": write_tiny("sd1", tmp / "sd1.safetensors"), "fp16": fp16}


@pytest.fixture(scope="module")
def reference(files: dict[str, Path]):  # noqa: ANN201
    return generate(load_model(files["fp32"]), REQ)


@pytest.mark.parametrize(("dtype", "min_psnr"), [(torch.float16, 40.0), (torch.bfloat16, 30.0)])
def test_half_precision_generates_on_the_cpu(files, reference, dtype: torch.dtype, min_psnr: float) -> None:
    """load_model(dtype=fp16/bf16) then generate on the CPU (was "mixed dtype (CPU)" in GroupNorm); the
    image within half-precision error of float32's (fp16: 11-bit, bf16: 8-bit mantissa)."""
    model = load_model(files["fp32"], dtype=dtype)
    assert {p.dtype for p in model.unet.parameters()} == {dtype}
    out = generate(model, REQ)
    assert out.latents.dtype == dtype
    value = psnr(out.images[0], reference.images[0])
    assert min_psnr <= value < 100, value


def test_fp16_storage_computes_exactly_as_fp32_weights(files: dict[str, Path]) -> None:
    """Weights kept as the file's fp16 and up-cast per layer give the same bits as fp32 weights read from
    the same file; the weights stay fp16 (half the memory)."""
    converted = load_model(files["fp16"])
    kept = load_model(files["fp16"], storage_dtype="file")
    assert {p.dtype for p in converted.unet.parameters()} == {torch.float32}
    assert {p.dtype for p in kept.unet.parameters()} == {torch.float16}
    auto = load_model(files["fp16"], dtype="auto", device="auto")  # the CLI's default on the CPU
    assert {p.dtype for p in auto.vae.parameters()} == {torch.float16}
    assert ops.compute_dtype(auto.unet) == torch.float32
    # converted at load on the CPU: convolution weights channels-last (ops.conv_layout), others as they were
    conv = converted.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert kept.unet.input_blocks[0][0].weight.is_contiguous()  # the file's map, cast per call
    a, b = generate(converted, REQ), generate(kept, REQ)
    assert torch.equal(a.latents, b.latents)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_fp16_conv_weights_go_channels_last_at_their_first_cpu_call(files: dict[str, Path]) -> None:
    """A convolution weight kept as the file's fp16 map is re-stored channels-last (still fp16) at its
    first float32 call on the CPU, where every call casts it into that layout; the output is the bits of
    the per-call cast of the old layout, and the weight's values are unchanged."""
    conv = load_model(files["fp16"], storage_dtype="file").unet.input_blocks[0][0]
    before = conv.weight  # the same Parameter afterwards (LoRA unmerging and offloading hold it), new data
    assert before.dtype == torch.float16 and before.is_contiguous() and before.shape[-1] == 3
    x = torch.randn((2, before.shape[1], 8, 8), generator=torch.Generator().manual_seed(0))
    cast = before.float().contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.conv2d(x, cast, conv.bias.float(), padding=1)
    with torch.inference_mode():
        out = conv(x)
    assert torch.equal(out, expected)
    after = conv.weight.data
    assert conv.weight is before and after.dtype == torch.float16 and not conv.weight.requires_grad
    assert after.is_contiguous(memory_format=torch.channels_last) and torch.equal(after, cast.half())
    with torch.inference_mode():
        assert torch.equal(conv(x), expected) and conv.weight.data.data_ptr() == after.data_ptr()  # once


def _resident_pages(t: torch.Tensor) -> list[bool]:
    """Whether each whole page of `t`'s memory is in this process's memory (/proc/self/pagemap bit 63)."""
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = -(-t.data_ptr() // page), (t.data_ptr() + t.numel() * t.element_size()) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start * 8)
        return [bool(v >> 63) for v in memoryview(f.read((end - start) * 8)).cast("Q")]


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/pagemap and madvise are Linux's")
def test_drop_file_pages_drops_only_unmodified_file_pages(tmp_path: Path) -> None:
    """Pages of a mapped safetensors tensor leave the process and read back the same; an anonymous tensor
    or a mapped one written to (copy-on-write pages) is left alone, its values kept."""
    values = torch.arange(3 << 18, dtype=torch.float32)  # 3 MiB: whole pages inside
    tensors = {"a": values[:5].clone(), "b": values, "c": values.clone()}
    path = write_safetensors(tensors, tmp_path / "w.safetensors")
    sd = read_state_dict(path)
    mapped, written = sd["b"], sd["c"]
    assert float(mapped.sum()) == float(values.sum()) and all(_resident_pages(mapped))
    assert drop_file_pages(mapped)
    assert not any(_resident_pages(mapped))
    assert torch.equal(mapped, values)  # faulted back in from the file
    written[1000:2000] += 1  # copy-on-write: these pages now differ from the file
    assert not drop_file_pages(written)
    assert torch.equal(written[1000:2000], values[1000:2000] + 1)
    anonymous = values.clone()
    assert not drop_file_pages(anonymous) and torch.equal(anonymous, values)


def _overflowing(model: StableDiffusion) -> None:
    """A VAE whose decoder overflows float16 (|x| > 65504 after conv_in) but not float32."""
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(1e5)


@pytest.mark.parametrize("tiled", [False, True])
def test_vae_overflow_in_fp16_is_decoded_again_in_fp32(files: dict[str, Path], tiled: bool) -> None:
    """Untiled and tiled (the path large images take): the retry computes in float32 throughout."""
    model = load_model(files["fp32"])
    _overflowing(model)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = decode_pixels(model.vae, latents, tiled)
    ops.adopt(model.vae, torch.float16)  # fp32 weights, fp16 maths
    with torch.inference_mode():
        assert not torch.isfinite(model.vae.decode(latents.half())).all()  # it does overflow
    retried = decode_pixels(model.vae, latents, tiled)
    assert retried.dtype == torch.float32
    assert torch.equal(retried, exact)


def test_vae_encoder_overflow_in_fp16_is_encoded_again_in_fp32(files: dict[str, Path]) -> None:
    model = load_model(files["fp32"])
    with torch.no_grad():
        model.vae.encoder.conv_in.weight.mul_(1e5)  # overflows float16 only
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    exact = encode_pixels(model.vae, pixels)
    ops.adopt(model.vae, torch.float16)
    with torch.inference_mode():
        assert not torch.isfinite(model.vae.encode(pixels.half()).mean).all()
    assert torch.equal(encode_pixels(model.vae, pixels), exact)


def test_cli_reports_an_overflow_in_one_line(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    """A VAE that overflows even float32: `sdlab vae decode` exits 2 with the reason, and writes no PNG."""
    model = load_model(files["fp32"])
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(1e36)  # finite weights, infinite activations
    vae = write_safetensors(model.vae.state_dict(), tmp_path / "vae.safetensors")
    latent = save_latents(torch.ones(1, 4, 4, 4), tmp_path / "z.safetensors", model.vae.cfg)
    assert main(["vae", "decode", str(latent), "--vae", str(vae), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlab vae: error: the VAE-decoded image holds NaN or Inf values: the VAE decoder")
    assert err.count("\n") == 1 and not list(tmp_path.glob("*.png"))


def test_vae_overflow_in_fp32_is_an_error(files: dict[str, Path]) -> None:
    model = load_model(files["fp32"])
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="VAE-decoded image"):
        decode_pixels(model.vae, torch.ones(1, 4, 4, 4))


def test_auto_precision_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    sd1, sdxl = families.get("sd1"), families.get("sdxl")
    assert resolve_precision("auto", cpu, sdxl) == ops_precision(torch.float32, torch.float32, "file")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", cuda, sd1) == ops_precision(torch.float16, torch.float16, torch.float16)
    assert resolve_precision("auto", cuda, sdxl) == ops_precision(torch.float16, torch.float32, torch.float16)
    assert resolve_precision("fp16", cuda, sdxl).vae == torch.float16  # asked for: as asked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", cuda, sdxl) == ops_precision(
        torch.bfloat16, torch.bfloat16, torch.bfloat16
    )
    assert resolve_device("auto") == cpu  # no GPU on the test machines
    with pytest.raises(ValueError, match="--device cuda:1: 0 CUDA"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="--dtype"):
        resolve_precision("fp8", cpu, sd1)


def ops_precision(compute: torch.dtype, vae: torch.dtype, storage: object):  # noqa: ANN201
    from sdlab.devices import Precision

    return Precision(compute, vae, storage)  # type: ignore[arg-type]


def test_model_offload_moves_each_network_while_it_runs(files, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--offload model`: a network's weights go to the device when it is called, the one before goes
    back to its CPU tensors (no copy). A copy stands in for the move to a GPU."""
    copies: set[int] = set()

    def to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        copy = t.clone()
        copies.add(copy.data_ptr())
        return copy

    monkeypatch.setattr(offload, "_to", to)
    model = load_model(files["fp32"], offload="model")
    text, unet = model.text_encoders[0], model.unet

    def on_device(net: torch.nn.Module) -> bool:
        flags = {p.data_ptr() in copies for p in net.parameters()}
        assert len(flags) == 1
        return flags.pop()

    weight = unet.input_blocks[0][0].weight
    cpu_ptr = weight.data_ptr()
    seen = []
    unet.register_forward_hook(lambda *_: seen.append((on_device(unet), on_device(text))))
    text(torch.zeros(1, 77, dtype=torch.long))
    assert on_device(text) and not on_device(unet)
    decoded: list[bool] = []
    model.vae.decoder.register_forward_hook(lambda *_: decoded.append(on_device(model.vae)))
    generate(model, REQ)
    assert seen and set(seen) == {(True, False)}  # the text encoder left before the U-Net ran
    assert decoded == [True] and not on_device(unet)  # the VAE ran last, on the device
    assert not on_device(model.vae) and offload.on_device(torch.device("cpu")) is None  # and went back
    assert weight.data_ptr() == cpu_ptr == getattr(weight, HOME).data_ptr()


def test_sequential_offload_keeps_weights_on_the_cpu(files: dict[str, Path]) -> None:
    """`--offload sequential`: each layer copies its weights to the device per call, none stay there."""
    model = load_model(files["fp32"], device="meta", offload="sequential")
    meta = torch.device("meta")
    x, ctx = torch.zeros(1, 4, 8, 8, device=meta), torch.zeros(1, 77, 128, device=meta)
    out = model.unet(x, torch.zeros(1, device=meta), ctx)
    assert out.device == meta and out.shape == x.shape
    assert {p.device.type for p in model.unet.parameters()} == {"cpu"}


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_leaves_results_unchanged(files: dict[str, Path], reference, mode: str) -> None:
    out = generate(Placement("cpu", "fp32", offload=mode).load(files["fp32"]), REQ)
    assert torch.equal(out.latents, reference.latents)


@pytest.mark.parametrize("impl", ["sliced", "math"])
def test_attention_implementations_equal_sdpa(monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4 * 16, generator=g) for _ in range(3))
    mask = torch.full((300, 300), float("-inf")).triu(1)
    monkeypatch.setattr(blocks, "SLICE_ELEMENTS", 2 * 4 * 300 * 70)  # five slices of queries
    for m in (None, mask):
        expected = blocks.attention(q, k, v, 4, m)
        assert torch.allclose(blocks.attention(q, k, v, 4, m, impl=impl), expected, atol=2e-6)


def test_attention_choice_reaches_the_networks(files: dict[str, Path], reference) -> None:
    model = Placement("cpu", "fp32", attention="sliced").load(files["fp32"])
    layers = [m for m in model.unet.modules() if hasattr(m, "attention_impl")]
    assert layers and {m.attention_impl for m in layers} == {"sliced"}
    out = generate(model, REQ)
    assert (out.latents - reference.latents).abs().max() < 1e-4
    with pytest.raises(ValueError, match="available are sdpa, sliced, math"):
        blocks.set_attention(model.unet, "flash")


def test_cli_device_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "--attention", "list"])
    assert e.value.code == 0 and capsys.readouterr().out.split() == ["sdpa", "sliced", "math"]
    assert main(["generate", "x", "--device", "cuda:0"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "sdlab generate: error: --device cuda:0: 0 CUDA device(s) available"
    )


# ---------------------------------------------------------------------------------------------
# LoRA on weights kept in the file's float16


def _targets(model: StableDiffusion) -> dict[str, torch.nn.Module]:
    return lora.training_targets(model.unet, model.text_encoders, model.family, conv=True)


@pytest.fixture(scope="module")
def lora_file(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    sd = _random_lora(_targets(load_model(files["fp32"])), seed=1)
    return lora.save_lora(sd, tmp_path_factory.mktemp("lora") / "lora.safetensors")


def test_lora_merges_into_fp16_storage_rounded_once(files: dict[str, Path], lora_file: Path) -> None:
    """sdlab merges in float32 and stores the result in the weight's dtype (ComfyUI's and A1111's way):
    the float16 weight is the float32 merge rounded once, so |error| <= 2^-11 |W'| (2^-25 when subnormal),
    against the float32-storage model holding the same file's numbers. Unmerging puts back the original
    float16 tensors; the image stays within 55 dB of the float32-storage image (61 dB measured)."""
    kept, wide = load_model(files["fp16"], storage_dtype="file"), load_model(files["fp16"])
    originals = {name: layer.weight for name, layer in _targets(kept).items()}
    base = generate(kept, REQ)
    req = replace(REQ, loras=((str(lora_file), 0.8),))
    a, b = generate(kept, req), generate(wide, req)  # merged, and kept merged after the call
    for name, layer in _targets(kept).items():
        w16, w32 = layer.weight, _targets(wide)[name].weight
        assert w16.dtype == torch.float16 and torch.equal(w16, w32.half())
        assert ((w16.float() - w32).abs() <= (w32.abs() * 2**-11).clamp(min=2**-25)).all()
    assert 55 <= psnr(a.images[0], b.images[0]) < 100
    again = generate(kept, REQ)  # the LoRA taken out: the original float16 tensors, bit for bit
    assert all(layer.weight is originals[name] for name, layer in _targets(kept).items())
    assert torch.equal(again.latents, base.latents)


def test_hooked_lora_on_fp16_storage_equals_fp32_storage(files: dict[str, Path], lora_file: Path) -> None:
    """LoRA layers added per call (training's LoRANetwork, never merged) on float16-stored weights: the
    same bits as on float32 weights, since the up-cast is exact."""
    outs = []
    for model in (load_model(files["fp16"], storage_dtype="file"), load_model(files["fp16"])):
        network = lora.LoRANetwork(_targets(model), 4, 2.0, conv_rank=3, conv_alpha=1.5)
        network.load_state_dict(lora.read_lora(lora_file))
        outs.append(generate(model, REQ).latents)
        network.remove()
    assert torch.equal(*outs)
    assert not torch.equal(outs[0], generate(model, REQ).latents)  # the LoRA did change the result


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_with_a_lora_leaves_results_unchanged(files, lora_file: Path, mode: str) -> None:
    """A LoRA merged into offloaded weights: the merged weights live on the CPU and travel as the others."""
    req = replace(REQ, loras=((str(lora_file), 0.8),))
    expected = generate(load_model(files["fp32"]), req)
    model = Placement("cpu", "fp32", offload=mode).load(files["fp32"])
    assert torch.equal(generate(model, req).latents, expected.latents)
    assert {p.device.type for p in model.unet.parameters()} == {"cpu"}


# ---------------------------------------------------------------------------------------------
# `--offload model`: weights changed while a network is on the device, several models on one device


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """The data pointers of the weights' "device" copies: a clone stands in for the move to a GPU (all kept
    alive, so that no later tensor reuses a copy's address)."""
    made: set[int] = set()
    kept: list[torch.Tensor] = []

    def to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        kept.append(t.clone())
        made.add(kept[-1].data_ptr())
        return kept[-1]

    monkeypatch.setattr(offload, "_to", to)
    return made


def _on_device(net: torch.nn.Module, copies: set[int]) -> set[bool]:
    """For each of the network's weights: is it a device copy? ({True}: all on the device)."""
    return {p.data_ptr() in copies for p in net.parameters()}


def _run_unet(model: StableDiffusion) -> None:
    x, ctx = torch.zeros(1, 4, 4, 4), torch.zeros(1, 77, model.config.unet.context_dim)
    with torch.inference_mode():
        model.unet(x, torch.zeros(1), ctx)


def test_lora_merges_and_unmerges_on_the_held_cpu_weights(files, reference, lora_file, copies) -> None:
    """A LoRA merged, then taken out, while the U-Net is on the device: both work on the CPU weights (a
    merge computed from device copies would leave merged weights there for good), the U-Net is sent back
    first, and its next calls run on device copies of the new weights: images equal the unoffloaded ones."""
    req = replace(REQ, loras=((str(lora_file), 0.8),))
    expected = generate(load_model(files["fp32"]), req)
    model = load_model(files["fp32"], offload="model")
    unet, cpu = model.unet, torch.device("cpu")
    originals = {name: layer.weight for name, layer in _targets(model).items()}
    calls: list[set[bool]] = []
    unet.register_forward_hook(lambda *_: calls.append(_on_device(unet, copies)))
    _run_unet(model)
    assert _on_device(unet, copies) == {True} and offload.on_device(cpu) is unet
    lora.use_loras(model, req.loras)  # merged while the U-Net is on the device
    assert _on_device(unet, copies) == {False} and offload.on_device(cpu) is None
    assert not any(w.data_ptr() in copies for w in originals.values())  # the unmerged weights too
    assert torch.equal(generate(model, req).latents, expected.latents)
    _run_unet(model)
    lora.use_loras(model, ())  # taken out while the merged U-Net is on the device
    assert _on_device(unet, copies) == {False} and offload.on_device(cpu) is None
    assert all(layer.weight is originals[name] for name, layer in _targets(model).items())
    assert torch.equal(generate(model, REQ).latents, reference.latents)
    assert len(calls) == 4 and all(c == {True} for c in calls)  # every U-Net call ran on device copies


def test_text_encoders_go_back_right_after_encoding(files: dict[str, Path], copies: set[int]) -> None:
    """`--offload model`: the text encoders run on the device and leave it as soon as the prompts are
    encoded (A1111's and ComfyUI's encoding), before anything else (ControlNets, image encoders) comes."""
    model = load_model(files["fp32"], offload="model")
    text, cpu = model.text_encoders[0], torch.device("cpu")
    calls: list[set[bool]] = []
    text.register_forward_hook(lambda *_: calls.append(_on_device(text, copies)))
    encode_prompts(model, "a red cube", "blur", 2)
    assert calls and all(c == {True} for c in calls)
    assert _on_device(text, copies) == {False} and offload.on_device(cpu) is None
    encode_text(model, "a red cube")
    assert len(calls) > 2 and all(c == {True} for c in calls)
    assert _on_device(text, copies) == {False} and offload.on_device(cpu) is None


def test_model_offload_holds_one_network_per_device(files: dict[str, Path], copies: set[int]) -> None:
    """Two models offloaded to one device (a base model and its refiner, two cached checkpoints): a call
    to one's U-Net sends the other's back."""
    a, b = (load_model(files["fp32"], offload="model") for _ in range(2))
    _run_unet(a)
    assert _on_device(a.unet, copies) == {True}
    _run_unet(b)
    assert _on_device(a.unet, copies) == {False} and _on_device(b.unet, copies) == {True}
    assert offload.on_device(torch.device("cpu")) is b.unet


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_standalone_unet_and_text_encoder_are_offloaded(tmp_path: Path, copies: set[int], mode: str) -> None:
    """ComfyUI's UNETLoader and CLIPLoader under `--offload`: the parts' weights are held on the CPU and
    offloaded as a checkpoint's are ("model": the U-Net's calls on device copies; "sequential": none of its
    weights ever a device copy), the image equal to the unoffloaded one's (they were refused before)."""
    root = tmp_path / "models"
    _split(root, "sd1", seed=0)
    library = Library(root)
    images = []
    for placement in (Placement("cpu"), Placement("cpu", offload=mode)):
        folders = Folders(root, tmp_path / "o", tmp_path / "i", tmp_path / "s")
        env = nodes.Env(library, ModelCache(library, placement=placement), folders)
        run = {k: t.run for k, t in nodes.NODE_TYPES.items()}
        with torch.inference_mode():
            (model,) = run["UNETLoader"](env, unet_name="u.safetensors", weight_dtype="default")
            (clip,) = run["CLIPLoader"](env, clip_name="sd1-0.safetensors", type="stable_diffusion")
            (vae,) = run["VAELoader"](env, vae_name="sd1-vae.safetensors")
            unet, (text,) = model.sd.unet, clip.model.text_encoders
            calls: list[set[bool]] = []
            unet.register_forward_hook(lambda *_, u=unet, c=calls: c.append(_on_device(u, copies)))
            images.append(_comfy_image(env, model, clip, vae))
        assert _on_device(unet, copies) == {False} and _on_device(text, copies) == {False}
        offloaded = None if placement.offload == "none" else placement.offload
        assert [getattr(n, "offload_mode", None) for n in (unet, text)] == [offloaded, offloaded]
        on_copies = {True} if placement.offload == "model" else {False}
        assert len(calls) >= 2 and all(c == on_copies for c in calls)  # 2 sampling steps
    assert torch.equal(images[0], images[1])


# ---------------------------------------------------------------------------------------------
# the networks that condition the U-Net follow its offloading (`sdlab.offload.follow`)


@pytest.fixture(scope="module")
def extras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ControlNet, T2I-Adapter, "plus" IP-Adapter and CLIP image encoder for the tiny SD1 model."""
    tmp = tmp_path_factory.mktemp("extras")
    cn = {f"control_model.{k}": v for k, v in _controlnet("sd1").state_dict().items()}
    adapter = randomize(T2IAdapterModel(T2IAdapterConfig((32, 64), "full")), 2).state_dict()
    encoder = randomize(CLIPVisionModel(TINY_VISION), 21).state_dict()
    return {
        "controlnet": write_safetensors(cn, tmp / "cn.safetensors"),
        "t2i-adapter": write_safetensors(adapter, tmp / "t2iadapter.safetensors"),
        "ip-adapter": _adapter_file(tmp, UNetModel(TINY["sd1"].unet), plus=True),
        "encoder": write_safetensors(encoder, tmp / "clip_vision.safetensors"),
    }


def _extra_request(extras: dict[str, Path], *names: str) -> GenerationRequest:
    """A 4-step 32 x 32 request with the named extra networks (ControlNet units, an image prompt)."""
    controls = tuple(ControlSpec(str(extras[n]), _image(32, 32)) for n in names if n != "ip-adapter")
    image_prompts = tuple(
        IPAdapterSpec(str(extras[n]), _image(), 0.6, clip_vision=str(extras["encoder"]))
        for n in names
        if n == "ip-adapter"
    )
    return replace(_cn_request(extras["controlnet"]), controls=controls, ip_adapters=image_prompts)


Turns = list[tuple[str, list[str]]]


def _turns(
    monkeypatch: pytest.MonkeyPatch, copies: set[int], unet: torch.nn.Module, *classes: type
) -> tuple[Turns, dict[str, torch.nn.Module]]:
    """Filled while sampling: at each call of `unet` and of a network of `classes` (after its offload hook),
    its name and the names of the networks then holding device copies; and the networks met, by name."""
    nets: dict[str, torch.nn.Module] = {"unet": unet}
    turns: Turns = []

    def record(name: str) -> None:
        turns.append((name, sorted(n for n, net in nets.items() if True in _on_device(net, copies))))

    for cls in classes:

        def spy(self, *args, _forward=cls.forward, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            nets[type(self).__name__] = self
            record(type(self).__name__)
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", spy)
    unet.register_forward_pre_hook(lambda *_: record("unet"))  # after the offload hook (registered first)
    return turns, nets


@pytest.mark.parametrize(
    ("extra", "classes"),
    [
        ("controlnet", (ControlNetModel,)),
        ("t2i-adapter", (T2IAdapterModel,)),
        ("ip-adapter", (CLIPVisionModel, Resampler)),
    ],
)
def test_extra_networks_take_turns_with_the_offloaded_unet(
    files, extras, copies, monkeypatch, extra: str, classes: tuple[type, ...]
) -> None:
    """`--offload model`: a ControlNet, a T2I-Adapter, an IP-Adapter's image encoder and projection are
    offloaded as the U-Net is: each call runs on device copies of its own weights with no other network
    there; after `generate` no weights are on the device; the latents equal the unoffloaded run's. An
    IP-Adapter's key/value layers run inside the U-Net from their CPU weights."""
    req = _extra_request(extras, extra)
    expected = generate(load_model(files["fp32"]), req)
    model = load_model(files["fp32"], offload="model")
    turns, nets = _turns(monkeypatch, copies, model.unet, *classes)
    ip_layers: list[set[bool]] = []
    if extra == "ip-adapter":
        attn = cross_attentions(model.unet)[0]
        model.unet.register_forward_pre_hook(
            lambda *_: ip_layers.append(_on_device(attn.ip[0].layer, copies))
        )
    out = generate(model, req)
    assert torch.equal(out.latents, expected.latents)
    assert {name for name, _ in turns} == {"unet", *(c.__name__ for c in classes)}
    assert all(there == [name] for name, there in turns), turns
    if extra == "controlnet":
        assert [name for name, _ in turns] == ["ControlNetModel", "unet"] * 4  # turns at every step
    assert ip_layers == ([{False}] * 4 if extra == "ip-adapter" else [])
    assert all(_on_device(net, copies) == {False} for net in (*nets.values(), model.vae))
    assert offload.on_device(torch.device("cpu")) is None


def test_sequential_offload_of_the_extra_networks(files, extras, copies, monkeypatch) -> None:
    """`--offload sequential` with a ControlNet, a T2I-Adapter and an IP-Adapter together: the latents equal
    the unoffloaded run's and no ControlNet weight is a device copy between its layers' calls."""
    req = _extra_request(extras, "controlnet", "t2i-adapter", "ip-adapter")
    expected = generate(load_model(files["fp32"]), req)
    model = load_model(files["fp32"], offload="sequential")
    between: list[set[bool]] = []
    forward = ControlNetModel.forward

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not between:
            assert self.offload_mode == "sequential" and self.execution_device == torch.device("cpu")
            for m in self.modules():
                m.register_forward_hook(lambda *_, net=self: between.append(_on_device(net, copies)))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", spy)
    out = generate(model, req)
    assert torch.equal(out.latents, expected.latents)
    assert len(between) > 4 * 20 and all(b == {False} for b in between)  # 4 steps, many layers each


@pytest.fixture
def meta_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the offload hooks move weights to the meta device: a tensor's `.data` cannot become a meta tensor,
    so `bring` swaps each tensor with a meta copy of it and `send_back` swaps the two back."""
    homes: dict[int, torch.Tensor] = {}

    def tensors(module: torch.nn.Module, recurse: bool) -> Iterator[torch.Tensor]:
        for m in module.modules() if recurse else (module,):
            yield from offload._tensors(m)

    def bring(module: torch.nn.Module, device: torch.device, recurse: bool = True) -> None:
        for t in tensors(module, recurse):
            if id(t) not in homes:
                moved = t.detach().to(device)
                homes[id(t)] = (
                    torch.nn.Parameter(moved, False) if isinstance(t, torch.nn.Parameter) else moved
                )
                torch.utils.swap_tensors(t, homes[id(t)])

    def send_back(module: torch.nn.Module, recurse: bool = True) -> None:
        for t in tensors(module, recurse):
            if id(t) in homes:
                torch.utils.swap_tensors(t, homes.pop(id(t)))

    monkeypatch.setattr(offload, "bring", bring)
    monkeypatch.setattr(offload, "send_back", send_back)


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_extra_networks_run_on_the_offload_device(files, extras, meta_moves, mode: str) -> None:
    """Offloaded to the meta device (a stand-in for a GPU: an operation meeting a CPU tensor fails), the
    A1111 and ComfyUI control paths and an IP-Adapter given loaded (as ComfyUI's nodes give it) run there,
    while every weight of theirs stays a CPU tensor afterwards."""
    meta = torch.device("meta")
    model = load_model(files["fp32"], device="meta", offload=mode)
    unet = model.unet
    specs = [ControlSpec(str(extras[n]), _image(32, 32)) for n in ("controlnet", "t2i-adapter")]
    controls = prepare_controls(specs, load_controls(specs, {}, unet), 32, 32, model.config.vae.downscale)
    comfy = [
        ComfyControl(load_controlnet(extras[n]), torch.rand(1, 3, 24, 24))
        for n in ("controlnet", "t2i-adapter")
    ]
    adapter = load_ip_adapter(extras["ip-adapter"], torch.float32, "cpu")
    encoder = load_clip_vision(extras["encoder"], torch.float32, "cpu")
    ip = prepare_ip_adapters([IPAdapterSpec(adapter, _image(), clip_vision=encoder)], unet)
    assert ip is not None and ip.cond.device == meta
    x, t = torch.zeros(2, 4, 16, 16, device=meta), torch.zeros(2, device=meta)
    context = torch.zeros(2, 77, unet.cfg.context_dim, device=meta)
    bounds = [(float("inf"), 0.0)] * len(comfy)
    with torch.inference_mode(), offload.devices_emptied_after():
        residuals = control_residuals(controls, x, t, context, None, None, 0.0)
        features = adapter_features(controls, x, None, 0.0, unet.cfg)
        residuals = comfy_residuals(comfy, bounds, x, t, context, None, 1.0, unet, residuals)
        features = comfy_features(comfy, bounds, x, 1.0, unet, features)
        with ip_adapters_applied(unet, ip):
            tokens = torch.cat([ip.cond, ip.uncond]).to(context)
            out = unet(x, t, torch.cat([context, tokens], dim=1), None, residuals, features)
    assert out.device == meta and out.shape == x.shape
    for net in (*(c.net for c in controls), *(c.net for c in comfy), adapter, encoder):
        assert {p.device.type for p in net.parameters()} == {"cpu"}, type(net).__name__


@pytest.fixture(scope="module")
def envs(request: pytest.FixtureRequest) -> tuple[nodes.Env, nodes.Env]:
    """test_controlnet_nodes' ComfyUI environment, and the same with its models loaded `--offload model`."""
    env = request.getfixturevalue("nodes_env")
    return env, replace(env, models=ModelCache(env.library, placement=Placement(offload="model")))


@pytest.mark.parametrize(
    ("name", "cls"), [("cn.safetensors", ControlNetModel), ("t2iadapter_tiny.safetensors", T2IAdapterModel)]
)
def test_comfyui_controls_take_turns_with_the_offloaded_unet(envs, copies, monkeypatch, name, cls) -> None:
    """ComfyUI's ControlNetLoader + ControlNetApplyAdvanced + KSamplerAdvanced with `--offload model`: the
    ControlNet or T2I-Adapter (loaded on the CPU by the node) takes turns with the U-Net on the device and
    the latents equal the unoffloaded run's."""
    env, offloaded_env = envs
    latent = _latent(env, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 14)
    expected = _run(env, "advanced-whole", latent, name)
    unet = nodes.checkpoint_loader(offloaded_env, "tiny.safetensors")[0].sd.unet
    turns, _ = _turns(monkeypatch, copies, unet, cls)
    out = _run(offloaded_env, "advanced-whole", latent, name)
    assert torch.equal(out, expected)
    assert {n for n, _ in turns} == {"unet", cls.__name__}
    assert all(there == [n] for n, there in turns), turns


def test_comfyui_workflow_leaves_no_weights_on_the_device(envs, copies) -> None:
    """A ComfyUI workflow with a ControlNet run with `--offload model`: at its end (VAEDecode ran last) no
    network is left on the device."""
    offloaded_env = envs[1]
    sd = nodes.checkpoint_loader(offloaded_env, "tiny.safetensors")[0].sd
    decoded: list[set[bool]] = []
    sd.vae.decoder.register_forward_hook(lambda *_: decoded.append(_on_device(sd.vae, copies)))
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "cn.safetensors"}},
        "7": {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["2", 0],
                "negative": ["3", 0],
                "control_net": ["6", 0],
                "image": ["5", 0],
                "strength": 0.7,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
        "8": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": 3,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["7", 0],
                "negative": ["7", 1],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    validation = graph.validate(prompt, offloaded_env)
    assert validation.ok, validation.node_errors
    graph.execute(validation, offloaded_env, lambda _: None, lambda *_: None)
    assert decoded == [{True}, {True}]
    assert offload.on_device(torch.device("cpu")) is None
    assert all(_on_device(net, copies) == {False} for net in (sd.unet, sd.vae, *sd.text_encoders))
