"""Winograd F(2×2, 3×3) convolutions (sdlab.models.winograd) against a float64 direct convolution, and the
rule that sends a layer through them (CPU float32 inference only, 16×16 and up)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlab.models import ops, winograd


def _float64_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)


@pytest.mark.parametrize(
    ("batch", "c", "o", "h", "w", "band_bytes", "bias"),
    [
        (2, 64, 80, 16, 16, winograd.BAND_BYTES, True),  # one band
        (1, 64, 64, 20, 34, 1 << 14, True),  # bands of 1 tile row: 10 of them, non-square
        (3, 70, 64, 18, 16, 1 << 17, False),  # bands of 2 rows and a last band of 1; no bias
        (1, 96, 64, 64, 64, 1 << 20, True),  # 32 tile rows in 4-row bands
    ],
)
def test_conv3x3_equals_a_direct_convolution(monkeypatch, batch, c, o, h, w, band_bytes, bias) -> None:
    """Within float32 rounding of the float64 convolution, as close as oneDNN's own direct kernel is; the
    output channels-last, bands or not."""
    monkeypatch.setattr(winograd, "BAND_BYTES", band_bytes)
    g = torch.Generator().manual_seed(batch * 1000 + c + h)
    x = torch.randn(batch, c, h, w, generator=g)
    weight = torch.randn(o, c, 3, 3, generator=g) / (3 * c**0.5)
    b = torch.randn(o, generator=g) if bias else None
    ref = _float64_reference(x, weight, b)
    out = winograd.conv3x3(x, winograd.kernel_transform(weight), b)
    direct = F.conv2d(x, weight, b, padding=1)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    err, direct_err = ((out.double() - ref).abs().max().item(), (direct.double() - ref).abs().max().item())
    scale = ref.abs().max().item()
    assert err <= 4e-7 * scale * c**0.5, (err, scale)  # float32 rounding over c·9 terms
    assert err <= 2 * direct_err, (err, direct_err)


def test_kernel_transform_of_fp16_weights_is_exact() -> None:
    """G g Gᵀ of fp16 kernels (up-cast first) equals the float64 transform rounded to float32 once: the
    coefficients are ±1 and ±½, so nothing is lost to fp16 arithmetic."""
    w = (torch.randn(8, 5, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.1).half()
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    expected = torch.einsum("ki,lj,ocij->okl c".replace(" ", ""), g, g, w.double()).reshape(8, 16, 5)
    got = winograd.kernel_transform(w.contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=2**-24, atol=0)
    torch.testing.assert_close(winograd.kernel_transform(w), got, rtol=0, atol=0)  # any layout


def _conv(c: int = 64, o: int = 64, **kwargs: object) -> nn.Conv2d:
    conv = nn.Conv2d(c, o, kwargs.pop("kernel_size", 3), padding=kwargs.pop("padding", 1), **kwargs)
    return ops.adopt(conv, torch.float32)


@pytest.mark.parametrize(
    ("conv", "shape", "expected"),
    [
        (_conv(), (2, 64, 16, 16), True),
        (_conv(), (1, 64, 64, 32), True),
        (_conv(), (2, 64, 8, 8), False),  # under MIN_PIXELS: the kernel transform costs what it saves
        (_conv(), (1, 64, 17, 16), False),  # odd height
        (_conv(32, 64), (1, 32, 32, 32), False),  # a first layer's few input channels
        (_conv(64, 4), (1, 64, 32, 32), False),  # a last layer's few output channels
        (_conv(stride=2), (1, 64, 32, 32), False),
        (_conv(dilation=2, padding=2), (1, 64, 32, 32), False),
        (_conv(groups=2), (1, 64, 32, 32), False),
        (_conv(padding_mode="reflect"), (1, 64, 32, 32), False),
        (_conv(kernel_size=1, padding=0), (1, 64, 32, 32), False),
    ],
)
def test_which_layers_take_the_winograd_path(conv: nn.Conv2d, shape: tuple[int, ...], expected: bool) -> None:
    x = torch.zeros(shape)
    with torch.no_grad():
        assert winograd.applies(conv, x) is expected
    assert winograd.applies(conv, x.double()) is False  # float32 maths only
    assert winograd.applies(conv, x.half()) is False


def test_training_keeps_the_direct_convolution(monkeypatch) -> None:
    """With autograd recording (training, a LoRA's gradients) a layer convolves directly; under no_grad or
    inference_mode the same layer goes through Winograd, with the same result within rounding."""
    calls: list[tuple[int, ...]] = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    conv = _conv()
    x = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(2))
    trained = conv(x)
    assert trained.requires_grad and calls == []
    with torch.inference_mode():
        inferred = conv(x)
    assert calls == [(1, 64, 16, 16)]
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loaded_in", [torch.no_grad, torch.inference_mode])
def test_fp16_stored_layer_matches_its_float32_copy_bit_for_bit(loaded_in) -> None:
    """A layer whose weights stay fp16 (up-cast per call) gives the same bits as the same weights converted
    to float32 at load, on the Winograd path as on the direct one; also when it was built under inference
    mode (a ComfyUI loader node), which once failed with "Inference tensors do not track version counter"."""
    with loaded_in():
        half = ops.adopt(_conv(96, 64).half().requires_grad_(False), torch.float32)  # as loaded
    full = _conv(96, 64)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = torch.randn(2, 96, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(half(x), full(x))
