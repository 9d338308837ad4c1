"""Devices, precision, weight storage, offloading and attention choice (sdlab.devices, sdlab.models.ops,
sdlab.offload), checked on the CPU: half-precision runs against float32, the fp16-storage path against
fp32 weights bit for bit, the VAE's float32 retry, offload hooks moving weights (to the meta device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reference import psnr
from tiny import TINY, tiny_checkpoint, write_tiny

from sdlab import families, offload
from sdlab.checkpoints.load import StableDiffusion, load_model, save_single_file
from sdlab.cli import main
from sdlab.devices import Placement, resolve_device, resolve_precision
from sdlab.finite import NonFiniteError
from sdlab.models import blocks, ops
from sdlab.offload import HOME, send_back
from sdlab.pipeline import GenerationRequest, generate
from sdlab.vae_tools import decode_pixels

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
    a, b = generate(converted, REQ), generate(kept, REQ)
    assert torch.equal(a.latents, b.latents)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def _overflowing(model: StableDiffusion) -> None:
    """A VAE whose decoder overflows float16 (|x| > 65504 after conv_in) but not float32."""
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(1e5)


def test_vae_overflow_in_fp16_is_decoded_again_in_fp32(files: dict[str, Path]) -> None:
    model = load_model(files["fp32"])
    _overflowing(model)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = decode_pixels(model.vae, latents)
    ops.adopt(model.vae, torch.float16)  # fp32 weights, fp16 maths
    with torch.inference_mode():
        assert not torch.isfinite(model.vae.decode(latents.half())).all()  # it does overflow
    retried = decode_pixels(model.vae, latents)
    assert retried.dtype == torch.float32
    assert torch.equal(retried, exact)


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
    generate(model, REQ)
    assert seen and set(seen) == {(True, False)}  # the text encoder left before the U-Net ran
    assert on_device(model.vae) and not on_device(unet)  # the VAE ran last
    send_back(model.vae)
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
