"""sdlab.resample against a transcription of ComfyUI's comfy/utils.py `bislerp` and `common_upscale`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlab.resample import common_upscale


def _comfy_bislerp(samples, width, height):  # transcribed from ComfyUI comfy/utils.py
    def slerp(b1, b2, r):
        c = b1.shape[-1]
        b1_norms = torch.norm(b1, dim=-1, keepdim=True)
        b2_norms = torch.norm(b2, dim=-1, keepdim=True)
        b1_normalized = b1 / b1_norms
        b2_normalized = b2 / b2_norms
        b1_normalized[b1_norms.expand(-1, c) == 0.0] = 0.0
        b2_normalized[b2_norms.expand(-1, c) == 0.0] = 0.0
        dot = (b1_normalized * b2_normalized).sum(1)
        omega = torch.acos(dot)
        so = torch.sin(omega)
        res = (torch.sin((1.0 - r.squeeze(1)) * omega) / so).unsqueeze(1) * b1_normalized + (
            torch.sin(r.squeeze(1) * omega) / so
        ).unsqueeze(1) * b2_normalized
        res *= (b1_norms * (1.0 - r) + b2_norms * r).expand(-1, c)
        res[dot > 1 - 1e-5] = b1[dot > 1 - 1e-5]
        res[dot < 1e-5 - 1] = (b1 * (1.0 - r) + b2 * r)[dot < 1e-5 - 1]
        return res

    def generate_bilinear_data(length_old, length_new, device):
        coords_1 = torch.arange(length_old, dtype=torch.float32, device=device).reshape((1, 1, 1, -1))
        coords_1 = F.interpolate(coords_1, size=(1, length_new), mode="bilinear")
        ratios = coords_1 - coords_1.floor()
        coords_1 = coords_1.to(torch.int64)
        coords_2 = torch.arange(length_old, dtype=torch.float32, device=device).reshape((1, 1, 1, -1)) + 1
        coords_2[:, :, :, -1] -= 1
        coords_2 = F.interpolate(coords_2, size=(1, length_new), mode="bilinear")
        coords_2 = coords_2.to(torch.int64)
        return ratios, coords_1, coords_2

    orig_dtype = samples.dtype
    samples = samples.float()
    n, c, h, w = samples.shape
    h_new, w_new = (height, width)
    ratios, coords_1, coords_2 = generate_bilinear_data(w, w_new, samples.device)
    coords_1 = coords_1.expand((n, c, h, -1))
    coords_2 = coords_2.expand((n, c, h, -1))
    ratios = ratios.expand((n, 1, h, -1))
    pass_1 = samples.gather(-1, coords_1).movedim(1, -1).reshape((-1, c))
    pass_2 = samples.gather(-1, coords_2).movedim(1, -1).reshape((-1, c))
    ratios = ratios.movedim(1, -1).reshape((-1, 1))
    result = slerp(pass_1, pass_2, ratios)
    result = result.reshape(n, h, w_new, c).movedim(-1, 1)
    ratios, coords_1, coords_2 = generate_bilinear_data(h, h_new, samples.device)
    coords_1 = coords_1.reshape((1, 1, -1, 1)).expand((n, c, -1, w_new))
    coords_2 = coords_2.reshape((1, 1, -1, 1)).expand((n, c, -1, w_new))
    ratios = ratios.reshape((1, 1, -1, 1)).expand((n, 1, -1, w_new))
    pass_1 = result.gather(-2, coords_1).movedim(1, -1).reshape((-1, c))
    pass_2 = result.gather(-2, coords_2).movedim(1, -1).reshape((-1, c))
    ratios = ratios.movedim(1, -1).reshape((-1, 1))
    result = slerp(pass_1, pass_2, ratios)
    result = result.reshape(n, h_new, w_new, c).movedim(-1, 1)
    return result.to(orig_dtype)


def _comfy_center(samples, width, height):  # common_upscale's crop="center", transcribed
    old_width, old_height = samples.shape[3], samples.shape[2]
    old_aspect, new_aspect = old_width / old_height, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    return samples[:, :, y : old_height - y, x : old_width - x]


@pytest.mark.parametrize(("size", "target"), [((9, 7), (16, 12)), ((16, 16), (5, 11)), ((6, 6), (6, 6))])
def test_bislerp_equals_comfyui(size: tuple[int, int], target: tuple[int, int]) -> None:
    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(0))
    x[0, :, 0, 0] = 0  # a zero vector
    x[1, :, 1, 1] = x[1, :, 1, 2]  # equal neighbours (dot = 1)
    x[1, :, 2, 1] = -x[1, :, 2, 2]  # opposite neighbours (dot = -1)
    expected = _comfy_bislerp(x, *target)
    got = common_upscale(x, "bislerp", *target)
    assert got.shape == expected.shape
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    half = common_upscale(x.half(), "bislerp", *target)
    assert half.dtype == torch.float16 and torch.equal(half, _comfy_bislerp(x.half(), *target))


@pytest.mark.parametrize(
    ("size", "target"), [((7, 10), (4, 4)), ((10, 7), (4, 4)), ((9, 6), (5, 3)), ((5, 5), (8, 8))]
)
def test_center_crop_rounds_as_comfyui(size: tuple[int, int], target: tuple[int, int]) -> None:
    x = torch.arange(size[0] * size[1], dtype=torch.float32).reshape(1, 1, *size)
    expected = F.interpolate(_comfy_center(x, *target), size=target[::-1], mode="nearest-exact")
    assert torch.equal(common_upscale(x, "nearest-exact", *target, crop="center"), expected)


def test_latent_upscale_nodes_offer_bislerp() -> None:
    from sdlab.server import nodes, nodes_core

    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    latent = nodes.Latent(48, 64, 1, z)
    (up,) = nodes.latent_upscale(None, latent, "bislerp", 80, 96, "disabled")  # type: ignore[arg-type]
    assert torch.equal(up.samples, _comfy_bislerp(z, 10, 12))
    (by,) = nodes_core.latent_upscale_by(None, latent, "bislerp", 1.5)  # type: ignore[arg-type]
    assert torch.equal(by.samples, _comfy_bislerp(z, 9, 12))
    assert "bislerp" not in nodes.IMAGE_UPSCALE  # ComfyUI's ImageScale has none
