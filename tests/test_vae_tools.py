"""VAE tools: tiled encode/decode, latent files, round-trip reports and the `sdlab vae` handlers."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference import randomize
from tiny import TINY, write_tiny

from sdlab import vae_tools
from sdlab.checkpoints import load
from sdlab.checkpoints.io import CheckpointError, read_metadata, write_safetensors
from sdlab.config import SDXL_VAE
from sdlab.devices import Placement
from sdlab.images import to_tensor
from sdlab.models.ops import compute_dtype
from sdlab.models.vae import AutoencoderKL
from sdlab.vae_tools import (
    RoundTrip,
    add_vae_parser,
    cli_decode,
    decode_latents,
    decode_tiled,
    encode_image,
    encode_tiled,
    load_latents,
    psnr,
    roundtrip,
    save_latents,
)

CFG = TINY["sd1"].vae  # downscale 2


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return randomize(AutoencoderKL(CFG), 2).requires_grad_(False)


@pytest.fixture(scope="module")
def local_vae() -> AutoencoderKL:
    """The tiny VAE without its GroupNorms and mid-block attention: every output pixel then depends only
    on nearby inputs, so tiling with margins wider than the receptive field must match the whole image
    (this isolates the cutting and blending from the GroupNorm synchronisation)."""
    model = randomize(AutoencoderKL(CFG), 2).requires_grad_(False)
    for mid in (model.encoder.mid, model.decoder.mid):
        mid.attn_1 = torch.nn.Identity()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny("sd1", tmp_path_factory.mktemp("model") / "tiny.safetensors")


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def counting(model: torch.nn.Module, method: str, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the input shape of every call of `model.<method>` (`forward` for a submodule)."""
    calls: list[tuple[int, ...]] = []
    original = getattr(model, method)

    def wrapped(x: torch.Tensor):
        calls.append(tuple(x.shape))
        return original(x)

    monkeypatch.setattr(model, method, wrapped)
    return calls


# ---------------------------------------------------------------------------------------------
# tiling


def test_tile_starts_cover_evenly_with_the_overlap() -> None:
    for n in range(1, 120):
        starts = vae_tools._starts(n, 16, 6)
        tile = min(16, n)
        assert starts[0] == 0 and starts[-1] + tile == n
        assert all(b - a <= tile - 6 for a, b in zip(starts, starts[1:]))  # overlap >= 6
        assert len(starts) == 1 or tile + (len(starts) - 2) * (tile - 6) < n  # one fewer could not cover


def test_tile_cores_partition_the_grid_away_from_tile_borders() -> None:
    """Each cell is in exactly one core (so GroupNorm statistics count it once), and a core keeps at least
    half the overlap away from every border its tile shares with a neighbour."""
    for h, w in [(5, 7), (16, 40), (37, 23), (64, 128)]:
        tiles = vae_tools._grid(h, w, 16, 6)
        owners = torch.zeros(h, w, dtype=torch.int64)
        for t in tiles:
            (y0, y1), (x0, x1) = t.core_rows, t.core_cols
            owners[y0:y1, x0:x1] += 1
            top, bottom, left, right = t.shared
            assert y0 - t.rows[0] >= 3 * top and t.rows[1] - y1 >= 3 * bottom
            assert x0 - t.cols[0] >= 3 * left and t.cols[1] - x1 >= 3 * right
        assert bool((owners == 1).all())


def test_group_norm_with_statistics_summed_over_a_partition_is_the_whole_group_norm() -> None:
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 8, 12, 20, generator=torch.Generator().manual_seed(3)) * 3 + 5
    parts = [x[..., :, :7], x[..., :5, 7:], x[..., 5:, 7:]]
    sums = sum(vae_tools._norm_sums(p) for p in parts)
    torch.testing.assert_close(vae_tools._group_norm(x, norm, sums), norm(x), rtol=0, atol=1e-5)


def test_tiled_decode_matches_untiled_and_uses_tiles(local_vae, monkeypatch) -> None:
    z = torch.randn(1, 4, 48, 64, generator=torch.Generator().manual_seed(0))
    whole = local_vae.decode(z)
    mids = counting(local_vae.decoder.mid, "forward", monkeypatch)
    tiles = counting(local_vae.decoder.conv_out, "forward", monkeypatch)
    tiled = decode_tiled(local_vae, z, tile=32, overlap=24)
    assert mids == [(1, 64, 48, 64)]  # the middle block sees the whole latent
    assert len(tiles) == 3 * 5 and set(tiles) == {(1, 32, 64, 64)}  # the rest 32x32-latent tiles
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max() < 1e-3


def test_tiled_encode_matches_untiled_and_uses_tiles(local_vae, monkeypatch) -> None:
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    whole = local_vae.encode(x)
    tiles = counting(local_vae.encoder.conv_in, "forward", monkeypatch)
    mids = counting(local_vae.encoder.mid, "forward", monkeypatch)
    tiled = encode_tiled(local_vae, x, tile=64, overlap=48)
    assert len(tiles) == 3 * 5 and set(tiles) == {(1, 3, 64, 64)}
    assert mids == [(1, 64, 48, 64)]
    assert (tiled.mean - whole.mean).abs().max() < 1e-3
    assert (tiled.logvar - whole.logvar).abs().max() < 1e-3


def per_tile(fn, x: torch.Tensor, grid: int, tile: int, overlap: int) -> torch.Tensor:
    """The former method: the whole VAE on each tile alone (its own GroupNorm statistics and attention),
    the outputs blended with the same weights."""
    tiles = vae_tools._grid(x.shape[-2] // grid, x.shape[-1] // grid, tile, overlap)
    with torch.no_grad():
        return vae_tools._blend(tiles, [fn(t.crop(x, grid)) for t in tiles], overlap)


def test_tiling_with_group_norm_and_attention_matches_untiled(vae, monkeypatch) -> None:
    """The tiny VAE (ch 32, ch_mult (1, 2), GroupNorms and mid attention, random weights) on a 192x128
    image in 2 x 4 tiles of 48 latent cells overlapping by 32.

    Only the tiles' zero padding makes a tile differ from the whole, and it reaches inwards one pixel per
    3x3 conv: the decoder's tiled part (4 convs at the latent size, 1 + 4 + conv_out at 2x) reaches 7
    latent cells, the encoder's (conv_in + 2 convs at 2x, the stride-2 conv, 2 convs) at most 5. Blend
    weights are 0 over the outer overlap / 4 = 8 cells and cores start overlap / 2 = 16 cells in, so
    every pixel blended and every pixel in a GroupNorm's statistics is the whole image's: the tiled
    result is the untiled one up to float32 rounding (convs and reductions summing in another order;
    1e-4 is ~100 ulp of outputs up to ~10), well inside the issue's 1e-2. On the same tiles, per-tile
    GroupNorm statistics and attention miss that 1e-2.
    """
    g = torch.Generator().manual_seed(4)
    x = F.interpolate(torch.rand(2, 3, 16, 24, generator=g), size=(128, 192), mode="bilinear") * 2 - 1
    whole = vae.encode(x)
    tiles = counting(vae.encoder.conv_in, "forward", monkeypatch)
    tiled = encode_tiled(vae, x, tile=96, overlap=64)
    assert len(tiles) == 2 * 4
    for a, b in [(tiled.mean, whole.mean), (tiled.logvar, whole.logvar)]:
        assert (a - b).abs().max() < 1e-4

    z = whole.mean[:1]  # the shared code path was checked per sample above; one is enough here
    decoded = vae.decode(z)
    tiles = counting(vae.decoder.conv_out, "forward", monkeypatch)
    assert (decode_tiled(vae, z, tile=48, overlap=32) - decoded).abs().max() < 1e-4
    assert len(tiles) == 2 * 4

    def moments(image: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(image)
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    old = per_tile(moments, x, 2, 48, 32)
    assert (old[:, :4] - whole.mean).abs().max() > 1e-2 and (old[:, 4:] - whole.logvar).abs().max() > 1e-2
    assert (per_tile(vae.decode, z, 1, 48, 32) - decoded).abs().max() > 1e-2


@pytest.mark.parametrize("op", ["decode", "encode"])
def test_automatic_tiling_only_above_the_threshold(vae, monkeypatch, op: str) -> None:
    monkeypatch.setattr(vae_tools, f"{op}_tiled", lambda model, x: "tiled")
    monkeypatch.setattr(vae, op, lambda x: "whole")
    run = getattr(vae_tools, op)
    shape = {"encode": (1, 3, 32, 48), "decode": (1, 4, 16, 24)}[op]  # a 48x32-pixel image either way
    x = torch.zeros(shape)
    assert run(vae, x) == "whole" and run(vae, x, tiled=True) == "tiled"
    monkeypatch.setattr(vae_tools, "TILE_ABOVE_PIXELS", 32 * 48 - 1)
    assert run(vae, x) == "tiled" and run(vae, x, tiled=False) == "whole"


def test_tiled_encode_rejects_sizes_off_the_latent_grid(vae) -> None:
    with pytest.raises(ValueError, match="multiples of 2"):
        encode_tiled(vae, torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(vae, torch.zeros(1, 4, 8, 8), tile=4, overlap=4)


# ---------------------------------------------------------------------------------------------
# latents and latent files


def test_encode_image_scales_crops_and_samples(vae) -> None:
    image = noise_image(67, 49)
    z = encode_image(vae, image)
    assert z.shape == (1, 4, 24, 33)  # cropped to 66x48
    mean = vae.encode(to_tensor(image.crop((0, 0, 66, 48)))).mean
    torch.testing.assert_close(z, mean * CFG.scale_factor)
    draw = encode_image(vae, image, generator=torch.Generator().manual_seed(5))
    again = encode_image(vae, image, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(draw, again)
    assert not torch.allclose(draw, z)


def test_latent_file_round_trip_with_metadata(vae, tmp_path) -> None:
    image = noise_image(65, 48)
    z = encode_image(vae, image)
    path = save_latents(z, tmp_path / "x.safetensors", vae.cfg, image.size)
    torch.testing.assert_close(load_latents(path), z)
    meta = read_metadata(path)
    assert meta["scale_factor"] == "0.18215" and meta["shift_factor"] == "0.0"
    assert meta["downscale"] == "2" and meta["size"] == "64x48" and meta["original_size"] == "65x48"
    [decoded] = decode_latents(vae, load_latents(path))
    assert decoded.size == (64, 48) and decoded.mode == "RGB"
    with pytest.raises(FileExistsError):
        save_latents(z, path, vae.cfg)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"samples": torch.zeros(1, 4, 8, 8)}, "no 'latent' tensor"),
        ({"latent": torch.zeros(4, 8, 8)}, "expected \\(batch, channels, height, width\\)"),
        ({"latent": torch.zeros(1, 3, 8, 8)}, "3 channels; this VAE takes 4"),
        ({"latent": torch.zeros(1, 4, 8, 8, dtype=torch.int32)}, "floating point"),
        ({"latent": torch.full((1, 4, 8, 8), float("nan"))}, "NaN or infinite"),
    ],
)
def test_bad_latent_files_fail_clearly(tmp_path, tensors, message) -> None:
    path = write_safetensors(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=message):
        load_latents(path)


def test_unreadable_latent_files_fail_clearly(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_latents(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_latents(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------
# round trip


def test_psnr_of_a_known_mse() -> None:
    black = Image.new("RGB", (8, 4))
    assert psnr(black, Image.new("RGB", (8, 4), (10, 10, 10))) == pytest.approx(10 * math.log10(255**2 / 100))
    half = Image.fromarray(np.array([[[0, 0, 0], [20, 20, 20]]], dtype=np.uint8))  # MSE = 400 / 2
    assert psnr(Image.new("RGB", (2, 1)), half) == pytest.approx(10 * math.log10(255**2 / 200))
    assert psnr(black, black) == math.inf
    with pytest.raises(ValueError, match="differ in size"):
        psnr(black, Image.new("RGB", (4, 8)))


def test_roundtrip_report(vae) -> None:
    image = noise_image(65, 48)
    report = roundtrip(vae, image)
    fitted = image.crop((0, 0, 64, 48))
    assert report.reconstruction.size == (64, 48) and report.latent_shape == (4, 24, 32)
    assert report.compression_ratio == 3.0  # 2x2 pixels x 3 colours per 4 latent channels
    assert report.psnr_db == pytest.approx(psnr(fitted, decode_latents(vae, encode_image(vae, fitted))[0]))
    assert report.format()[0] == "note: cropped 65x48 to 64x48 (the VAE needs sides in multiples of 2)"


def test_roundtrip_lines_for_an_sd_sized_image() -> None:
    report = RoundTrip(Image.new("RGB", (512, 512)), (512, 512), (4, 64, 64), 48.0, 31.2345)
    assert report.format() == [
        "image:       512x512 RGB (786,432 numbers)",
        "latent:      4x64x64 (16,384 numbers)",
        "compression: 48.0x fewer numbers",
        "PSNR:        31.23 dB (8-bit RGB, posterior mean)",
    ]


# ---------------------------------------------------------------------------------------------
# command line


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdlab")
    add_vae_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["vae", *argv])


def test_cli_roundtrip_encode_decode(checkpoint, tmp_path, capsys) -> None:
    image_path = tmp_path / "in.png"
    noise_image(41, 32).save(image_path)
    args = parse("roundtrip", str(image_path), "-m", str(checkpoint), "-o", str(tmp_path / "rt.png"))
    assert args.tiled is None and args.func(args) == 0
    assert args.func(args) == 0  # a second run never overwrites the first
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("note: cropped 41x32 to 40x32") and out[4].startswith("PSNR:")
    assert out[5] == f"wrote {tmp_path / 'rt.png'}" and out[-1] == f"wrote {tmp_path / 'rt-1.png'}"

    latent = tmp_path / "z.safetensors"
    args = parse("encode", str(image_path), "-m", str(checkpoint), "-o", str(latent), "--no-tiled")
    assert args.tiled is False and args.func(args) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "latent: 1x4x16x20 (posterior mean)",
        f"wrote {latent}",
    ]
    with pytest.raises(FileExistsError):
        args.func(args)
    sampled = tmp_path / "s.safetensors"
    args = parse("encode", str(image_path), "-m", str(checkpoint), "-o", str(sampled), "--sample-seed", "3")
    assert args.func(args) == 0 and "latent: 1x4x16x20 (sampled)" in capsys.readouterr().out
    assert not torch.equal(load_latents(sampled), load_latents(latent))

    args = parse("decode", str(latent), "-m", str(checkpoint), "-o", str(tmp_path / "dec.png"), "--tiled")
    assert args.tiled is True and args.func(args) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'dec.png'}\n"
    assert Image.open(tmp_path / "dec.png").size == (40, 32)


def test_cli_decode_from_a_namespace_with_a_standalone_vae(vae, tmp_path, capsys) -> None:
    vae_path = write_safetensors(vae.state_dict(), tmp_path / "vae.safetensors")
    latent = save_latents(torch.randn(2, 4, 8, 8), tmp_path / "z.safetensors", SDXL_VAE)
    args = argparse.Namespace(latent=latent, output=tmp_path / "x.png", model=None, vae=vae_path, tiled=None)
    assert cli_decode(args) == 0
    assert capsys.readouterr().out.splitlines() == [
        "warning: latents were scaled by 0.13025, this VAE uses 0.18215",
        f"wrote {tmp_path / 'x.png'}",
        f"wrote {tmp_path / 'x-1.png'}",
    ]


def test_cli_without_a_model_asks_for_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(load, "default_model_path", lambda: tmp_path / "absent.safetensors")
    args = parse("decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "x.png"))
    with pytest.raises(CheckpointError, match="shipped model is not installed.*pass a model with -m"):
        args.func(args)


def test_cli_half_precision_is_close_to_fp32(checkpoint, tmp_path) -> None:
    """`sdlab vae encode/decode --dtype fp16|bf16` on the CPU: latents close to float32's (relative to their
    largest value) and decoded images (of float32's latents) within a PSNR bound of float32's; measured
    1.4e-3 / 57.9 dB (fp16) and 1.2e-2 / 46.2 dB (bf16) on this noise image."""
    image_path = tmp_path / "in.png"
    noise_image(40, 32).save(image_path)
    out, z32 = {}, str(tmp_path / "z-fp32.safetensors")  # every decoder decodes float32's latents
    for name in ("fp32", "fp16", "bf16"):
        z, png = tmp_path / f"z-{name}.safetensors", tmp_path / f"{name}.png"
        flags = ["-m", str(checkpoint), "--device", "cpu", "--dtype", name]
        for argv in (["encode", str(image_path), "-o", str(z)], ["decode", z32, "-o", str(png)]):
            args = parse(*argv, *flags)
            assert args.func(args) == 0
        out[name] = load_latents(z), Image.open(png)
    z32, image32 = out["fp32"]
    for name, latent_error, min_psnr in (("fp16", 5e-3, 50.0), ("bf16", 3e-2, 40.0)):
        z, image = out[name]
        assert 0 < (z - z32).abs().max() <= latent_error * z32.abs().max(), name
        assert min_psnr <= psnr(image, image32) < 100, name


def test_cli_device_errors_are_one_line(checkpoint, tmp_path, capsys) -> None:
    from sdlab.cli import main

    argv = ["vae", "roundtrip", str(tmp_path / "in.png"), "-m", str(checkpoint)]
    noise_image(16, 16).save(argv[2])
    assert main([*argv, "--device", "cuda:0"]) == 2
    assert capsys.readouterr().err == "sdlab vae: error: --device cuda:0: 0 CUDA device(s) available\n"
    for bad in (["--dtype", "fp8"], ["--attention", "flash"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, *bad])
        assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    args = parse(*argv[1:], "--attention", "sliced", "--dtype", "bf16")
    vae = vae_tools.load_vae(args.model, args.vae, Placement.from_args(args))
    assert {m.attention_impl for m in vae.modules() if hasattr(m, "attention_impl")} == {"sliced"}
    assert compute_dtype(vae) == torch.bfloat16
