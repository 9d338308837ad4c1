"""Upscaler models against spandrel (the library ComfyUI and A1111 load them with) as the oracle.

Each network is built with spandrel's own architecture class at seeded random weights, written to a
file in a real layout, loaded and detected by sdlab, and run tiled on an image larger than the tile;
the result must equal spandrel's untiled output. The tile overlaps are chosen so that half of each
covers the network's receptive field, which is where sdlab's tiling is exact. Then the interfaces:
A1111's extras routes (BGR in, truncated out), ComfyUI's nodes (RGB), the CLI and refusals.
"""

from __future__ import annotations

import base64
import contextlib
import io
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from sdlab.checkpoints.io import CheckpointError
from sdlab.upscale import BUILTIN_UPSCALERS, load_upscaler, run_upscaler, upscale_image, upscaler_names


@contextlib.contextmanager
def torchvision_stub() -> Iterator[None]:
    """spandrel imports two torchvision functions for LaMa and RestoreFormer, which these tests never run;
    no CPU torchvision wheel matches this torch, so stand-ins serve the import and are removed after."""
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    saved = {name: sys.modules.get(name) for name in names}
    functional = types.ModuleType(names[2])

    def absent(*args: object, **kwargs: object) -> None:
        raise RuntimeError("torchvision is stubbed in sdlab's tests")

    functional.InterpolationMode, functional.rotate, functional.normalize = object, absent, absent
    sys.modules.update({names[0]: types.ModuleType(names[0]), names[1]: types.ModuleType(names[1])})
    sys.modules[names[2]] = functional
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def spandrel() -> types.ModuleType:
    if "spandrel" not in sys.modules:
        with torchvision_stub():
            pytest.importorskip(
                "spandrel", reason="spandrel is the oracle (scripts/setup-tests.sh installs it)"
            )
    return sys.modules["spandrel"]


def seeded(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights at a scale that keeps activations O(1) through the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 10
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return net.eval()


def rand_image(h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference(spandrel: types.ModuleType, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """spandrel's untiled output (its network, before the [0, 1] clamp its descriptor adds)."""
    descriptor = spandrel.ModelLoader().load_from_state_dict(dict(sd))
    with torch.no_grad():
        return descriptor.model.eval()(x)


def state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# ESRGAN / RRDBNet in its three key layouts


def new_layout(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Real-ESRGAN's names for an original-layout ESRGAN (model.0, model.1.sub.N..., model.3/6/9 upconvs,
    hr conv and last conv at the end), written out by hand as the oracle for sdlab's key map."""
    last = max(int(k.split(".")[1]) for k in old)
    stages = (last - 4) // 3
    nb = max(int(k.split(".")[3]) for k in old if k.startswith("model.1.sub."))
    names = {"model.0": "conv_first", f"model.1.sub.{nb}": "conv_body", f"model.{last - 2}": "conv_hr"}
    names |= {f"model.{3 * m}": f"conv_up{m}" for m in range(1, stages + 1)} | {f"model.{last}": "conv_last"}
    out = {}
    for key, value in old.items():
        parts = key.split(".")
        if key.startswith("model.1.sub.") and parts[4].startswith("RDB"):
            out[f"body.{parts[3]}.rdb{parts[4][3]}.{parts[5]}.{parts[-1]}"] = value
        else:
            out[f"{names['.'.join(parts[:-1])]}.{parts[-1]}"] = value
    return out


def bsrgan_layout(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BSRGAN's names (RRDB_trunk, trunk_conv, upconvN, HRconv) for the same network."""
    out = {}
    for key, value in new_layout(old).items():
        for new, bsrgan in (("body.", "RRDB_trunk."), ("conv_body", "trunk_conv"), ("conv_hr", "HRconv")):
            key = key.replace(new, bsrgan) if key.startswith(new) else key
        key = key.replace("conv_up", "upconv").replace(".rdb", ".RDB")
        out[key] = value
    return out


RRDB_CASES = {
    # name: (spandrel RRDBNet kwargs, layout, file, image (h, w), tile, overlap); the receptive field is
    # 19 pixels (38 and 76 after a 2x or 4x pixel-unshuffle), the tiles' exact part overlap // 2 from edges
    "4x-old-pth": (dict(scale=4), "old", "pth", (80, 40), 78, 38),
    "4x-new-params_ema": (dict(scale=4), "new", "ema", (20, 16), 512, 32),
    "4x-bsrgan": (dict(scale=4), "bsrgan", "safetensors", (20, 16), 512, 32),
    "8x-old": (dict(scale=8), "old", "safetensors", (20, 16), 512, 32),
    "2x-unshuffle-new": (dict(in_nc=12, scale=4, shuffle_factor=2), "new", "ema", (164, 16), 158, 76),
    "1x-unshuffle-old": (
        dict(in_nc=48, scale=4, shuffle_factor=4),
        "old",
        "safetensors",
        (304, 16),
        296,
        146,
    ),
}


def write(sd: dict[str, torch.Tensor], path: Path, kind: str) -> Path:
    path = path.with_suffix(".safetensors" if kind == "safetensors" else ".pth")
    if kind == "safetensors":
        save_file(sd, path)
    else:
        torch.save({"params_ema": sd} if kind == "ema" else sd, path)
    return path


@pytest.mark.parametrize("case", list(RRDB_CASES))
def test_rrdbnet_tiled_equals_spandrel(spandrel: types.ModuleType, tmp_path: Path, case: str) -> None:
    from spandrel.architectures.ESRGAN import ESRGAN

    kwargs, layout, kind, (h, w), tile, overlap = RRDB_CASES[case]
    old = state(seeded(ESRGAN(num_filters=8, num_blocks=1, **kwargs)))
    sd = {"old": old, "new": new_layout(old), "bsrgan": bsrgan_layout(old)}[layout]
    x = rand_image(h, w)
    ref = reference(spandrel, old, x)
    if layout != "old":  # the hand-written renaming is right: spandrel reads it as the same network
        assert torch.equal(reference(spandrel, sd, x), ref)
    model = load_upscaler(write(sd, tmp_path / case, kind))
    assert (model.architecture, model.scale) == ("ESRGAN", kwargs["scale"] // kwargs.get("shuffle_factor", 1))
    assert max(h, w) > tile or tile == 512  # 512: layouts checked on one tile, tiling by the others
    out = run_upscaler(model, x, tile=tile, overlap=overlap)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-4  # measured ≤ 2.4e-6 (outputs range to about 2.5)


# ---------------------------------------------------------------------------------------------
# Real-ESRGAN compact and SwinIR


def test_compact_tiled_equals_spandrel(spandrel: types.ModuleType, tmp_path: Path) -> None:
    from spandrel.architectures.Compact import Compact

    sd = state(seeded(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=4, upscale=4)))
    model = load_upscaler(write(sd, tmp_path / "realesr-general-x4v3", "ema"))
    assert (model.architecture, model.scale) == ("RealESRGAN Compact", 4)
    x = rand_image(40, 30)
    ref = reference(spandrel, sd, x)
    out = run_upscaler(model, x, tile=28, overlap=12)  # 3 x 2 tiles; receptive field 6 pixels
    assert (out - ref).abs().max() < 1e-4  # measured ≤ 2.4e-6 (outputs range to about 2.5)


SWINIR_CASES = {  # upsampler, resi_connection, scale, image (h, w), tile: receptive field about 12 pixels
    "realSR-nearest+conv-3conv": ("nearest+conv", "3conv", 4, (20, 12), 512),
    "classical-pixelshuffle": ("pixelshuffle", "1conv", 2, (20, 12), 512),
    "lightweight-pixelshuffledirect": ("pixelshuffledirect", "1conv", 3, (66, 30), 60),
    "denoise": ("", "1conv", 1, (66, 30), 60),
}


@pytest.mark.parametrize("case", list(SWINIR_CASES))
def test_swinir_tiled_equals_spandrel(spandrel: types.ModuleType, tmp_path: Path, case: str) -> None:
    from spandrel.architectures.SwinIR import SwinIR

    upsampler, resi, scale, (h, w), tile = SWINIR_CASES[case]
    net = SwinIR(
        img_size=16, embed_dim=16, depths=[2], num_heads=[2], window_size=4, mlp_ratio=2.0,
        upscale=scale, upsampler=upsampler, resi_connection=resi,
    )  # fmt: skip
    sd = state(seeded(net))
    model = load_upscaler(write(sd, tmp_path / case, "safetensors"))
    assert (model.architecture, model.scale, model.multiple) == ("SwinIR", scale, 4)
    x = rand_image(h, w)  # not a multiple of the window: both pad by reflection
    ref = reference(spandrel, sd, x)
    out = run_upscaler(model, x, tile=tile, overlap=28)
    assert (out - ref).abs().max() < 1e-4  # measured ≤ 2.4e-6 (outputs range to about 2.5)


def test_other_architectures_go_to_spandrel(spandrel: types.ModuleType, tmp_path: Path) -> None:
    from spandrel.architectures.DnCNN import DnCNN

    sd = state(seeded(DnCNN(in_nc=3, out_nc=3, nc=8, nb=17, act_mode="R")))
    model = load_upscaler(write(sd, tmp_path / "dncnn", "safetensors"))
    assert (model.architecture, model.scale) == ("DnCNN", 1)
    x = rand_image(20, 24)
    assert torch.allclose(run_upscaler(model, x), reference(spandrel, sd, x).clamp(0, 1), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# refusals


def test_bad_files_are_refused_naming_the_file(spandrel: types.ModuleType, tmp_path: Path) -> None:
    from spandrel.architectures.ESRGAN import ESRGAN

    text = tmp_path / "notes.pth"
    text.write_text("not a model\n")
    unknown = tmp_path / "unknown.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, unknown)
    broken = tmp_path / "broken.safetensors"
    sd = state(seeded(ESRGAN(num_filters=8, num_blocks=1, scale=4)))
    save_file({k: v for k, v in sd.items() if k != "model.1.sub.0.RDB2.conv3.0.weight"}, broken)
    misshapen = tmp_path / "misshapen.safetensors"
    save_file(sd | {"model.3.weight": torch.zeros(32, 8, 3, 3)}, misshapen)  # a pixel-shuffle upsampler
    gray = tmp_path / "gray.safetensors"
    save_file(state(seeded(ESRGAN(in_nc=1, out_nc=1, num_filters=8, num_blocks=1, scale=2))), gray)
    for path, problem in (
        (text, "plain-text file"),
        (unknown, "neither sdlab nor spandrel recognises"),
        (broken, "missing: body.0.rdb2.conv3.weight"),
        (misshapen, "size mismatch for conv_up1.weight"),
        (gray, "1-channel ESRGAN model"),
        (tmp_path / "absent.pth", "no such file"),
    ):
        with pytest.raises(CheckpointError, match=str(path.name)) as e:
            load_upscaler(path)
        assert problem in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------
# A1111's named upscalers


def test_builtin_upscalers_follow_a1111() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8))
    assert upscaler_names([]) == list(BUILTIN_UPSCALERS)
    dest = (48, 24)  # Upscaler.upscale: int(20·2.5 // 8 · 8), int(12·2.5 // 8 · 8)
    for name, resample in (("Lanczos", Image.LANCZOS), ("Nearest", Image.NEAREST)):
        once = image.resize((50, 30), resample)  # do_upscale: int(w·scale) x int(h·scale), then to dest
        assert np.array_equal(upscale_image(image, name, 2.5, []), once.resize(dest, Image.LANCZOS))
    assert np.array_equal(upscale_image(image, "None", 2.5, []), image.resize(dest, Image.LANCZOS))
    with pytest.raises(LookupError, match="'4x-missing' not found"):
        upscale_image(image, "4x-missing", 2, [])


def test_model_upscaler_repeats_until_the_target_size(spandrel: types.ModuleType, tmp_path: Path) -> None:
    from spandrel.architectures.Compact import Compact

    folder = tmp_path / "upscale_models"
    folder.mkdir()
    sd = state(seeded(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)))
    write(sd, folder / "2x-compact", "safetensors")
    assert upscaler_names([folder]) == [*BUILTIN_UPSCALERS, "2x-compact"]
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 12, 3), dtype=np.uint8))

    def spandrel_pass(im: Image.Image) -> Image.Image:  # RGB in, rounded out
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        y = reference(spandrel, sd, x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        return Image.fromarray(np.round(255 * y).astype(np.uint8))

    expected = spandrel_pass(spandrel_pass(image)).resize((40, 24), Image.LANCZOS)  # 2 passes: 48x32 ≥ 40x24
    out = upscale_image(image, "2x-compact", 3.4, [folder], convention="comfy")
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


# ---------------------------------------------------------------------------------------------
# A1111 API, ComfyUI nodes and the CLI


def a1111_esrgan(spandrel: types.ModuleType, sd: dict[str, torch.Tensor], image: Image.Image) -> Image.Image:
    """A1111's `upscale_without_tiling` around spandrel: BGR in, clamp, ×255 truncated, back to RGB."""
    bgr = np.asarray(image)[:, :, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(np.transpose(bgr, (2, 0, 1))) / 255).float()[None]
    y = reference(spandrel, sd, x).squeeze().float().clamp_(0, 1).numpy()
    out = (255.0 * np.moveaxis(y, 0, 2)).astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(out), "RGB")


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unb64(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.fixture(scope="module")
def esrgan_sd(spandrel: types.ModuleType) -> dict[str, torch.Tensor]:
    from spandrel.architectures.ESRGAN import ESRGAN

    return state(seeded(ESRGAN(num_filters=8, num_blocks=1, scale=4), seed=3))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 24, 3), dtype=np.uint8))


def test_a1111_extras_equal_spandrel(
    spandrel: types.ModuleType, esrgan_sd: dict, photo: Image.Image, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient
    from test_server_api import folders

    from sdlab.server.app import create_app
    from sdlab.server.state import Settings

    models = tmp_path / "models"
    (models / "ESRGAN").mkdir(parents=True)
    torch.save(esrgan_sd, models / "ESRGAN" / "4x-tiny.pth")
    (models / "ESRGAN" / "broken.pth").write_text("not a model\n")
    expected = a1111_esrgan(spandrel, esrgan_sd, photo)
    with TestClient(create_app(Settings(folders(tmp_path, models))), base_url="http://localhost") as client:
        listing = client.get("/sdapi/v1/upscalers").json()
        assert [u["name"] for u in listing] == [*BUILTIN_UPSCALERS, "4x-tiny", "broken"]
        assert listing[3] == {
            "name": "4x-tiny", "model_name": "4x-tiny", "model_path": "ESRGAN/4x-tiny.pth", "model_url": None,
            "scale": 4,
        }  # fmt: skip
        body = {"image": b64png(photo), "upscaler_1": "4x-tiny", "upscaling_resize": 4}
        answer = client.post("/sdapi/v1/extra-single-image", json=body).json()
        out = unb64(answer["image"])
        assert np.array_equal(np.asarray(out), np.asarray(expected))
        assert out.info["postprocessing"] == "Postprocess upscale by: 4.0, Postprocess upscaler: 4x-tiny"
        assert answer["html_info"] == "<p>Postprocess upscale by: 4.0, Postprocess upscaler: 4x-tiny</p>"
        # 2x: one 4x pass, then Lanczos down to the target; to a size with crop: centred on black
        half = client.post("/sdapi/v1/extra-single-image", json=body | {"upscaling_resize": 2}).json()
        halved = expected.resize((48, 40), Image.LANCZOS)
        assert np.array_equal(np.asarray(unb64(half["image"])), np.asarray(halved))
        sized = {"resize_mode": 1, "upscaling_resize_w": 96, "upscaling_resize_h": 64, "upscaling_crop": True}
        boxed = unb64(client.post("/sdapi/v1/extra-single-image", json=body | sized).json()["image"])
        assert np.array_equal(np.asarray(boxed)[:, 0:96], np.asarray(expected.crop((0, 8, 96, 72))))
        batch = {k: v for k, v in body.items() if k != "image"} | {
            "imageList": [{"data": b64png(photo), "name": "a.png"}, {"data": b64png(photo), "name": "b.png"}]
        }
        images = client.post("/sdapi/v1/extra-batch-images", json=batch).json()["images"]
        assert [np.array_equal(np.asarray(unb64(i)), np.asarray(expected)) for i in images] == [True, True]
        # upscaler 2 blended over upscaler 1
        second = {"upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.4}
        blended = unb64(client.post("/sdapi/v1/extra-single-image", json=body | second).json()["image"])
        lanczos = photo.resize((96, 80), Image.LANCZOS)
        assert np.array_equal(np.asarray(blended), np.asarray(Image.blend(expected, lanczos, 0.4)))
        # upscaler 1 "None": the image as it was
        same = client.post("/sdapi/v1/extra-single-image", json=body | {"upscaler_1": "None"}).json()
        assert np.array_equal(np.asarray(unb64(same["image"])), np.asarray(photo))
        for change, status, words in (
            ({"gfpgan_visibility": 0.5}, 422, "gfpgan_visibility"),
            ({"codeformer_visibility": 1}, 422, "codeformer_visibility"),
            ({"upscaler_1": "4x-absent"}, 404, "upscaler_1: upscaler '4x-absent' not found"),
            ({"upscaler_2": "2x-absent"}, 404, "upscaler_2: upscaler '2x-absent' not found"),
            ({"upscaler_1": "broken"}, 422, "broken.pth: not a readable PyTorch checkpoint"),
            ({"upscaling_resize": 9}, 422, "upscaling_resize"),
        ):
            response = client.post("/sdapi/v1/extra-single-image", json=body | change)
            assert response.status_code == status and words in response.text, response.text


def test_comfy_nodes_equal_spandrel(
    spandrel: types.ModuleType, esrgan_sd: dict, photo: Image.Image, tmp_path: Path
) -> None:
    from test_server_api import folders

    from sdlab.images import to_pil, to_tensor
    from sdlab.server import nodes
    from sdlab.server.library import Library, ModelCache

    models = tmp_path / "models"
    (models / "upscale_models" / "sub").mkdir(parents=True)
    save_file(esrgan_sd, models / "upscale_models" / "sub" / "4x-tiny.safetensors")
    library = Library(models)
    env = nodes.Env(library, ModelCache(library), folders(tmp_path, models))
    info = nodes.object_info(env, "UpscaleModelLoader")
    assert info["input"]["required"]["model_name"][0] == ["sub/4x-tiny.safetensors"]
    (model,) = nodes.upscale_model_loader(env, "sub/4x-tiny.safetensors")
    (out,) = nodes.image_upscale_with_model(env, model, to_tensor(photo))
    x = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255).permute(2, 0, 1)[None]  # RGB
    expected = reference(spandrel, esrgan_sd, x).clamp(0, 1)
    assert torch.allclose((out + 1) / 2, expected, atol=1e-5)
    rounded = np.round(255 * expected[0].permute(1, 2, 0).numpy()).astype(np.uint8)
    assert np.abs(np.asarray(to_pil(out)[0], dtype=int) - rounded).max() <= 1  # 8 bits, rounded
    (models / "upscale_models" / "bad.pth").write_text("text\n")
    with pytest.raises(nodes.NodeError, match="bad.pth: not a readable PyTorch checkpoint"):
        nodes.upscale_model_loader(env, "bad.pth")


def test_cli_upscale(spandrel: types.ModuleType, esrgan_sd: dict, photo: Image.Image, tmp_path: Path) -> None:
    from sdlab.cli import main

    model = write(esrgan_sd, tmp_path / "4x-tiny", "safetensors")
    photo.save(tmp_path / "photo.png")
    image = str(tmp_path / "photo.png")
    assert main(["upscale", image, "-m", str(model), "-o", str(tmp_path / "big.png")]) == 0
    x = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    y = reference(spandrel, esrgan_sd, x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    big = np.asarray(Image.open(tmp_path / "big.png"), dtype=int)
    assert np.abs(big - np.round(255 * y)).max() <= 1
    scaled = tmp_path / "scaled.png"
    args = ["upscale", image, "-m", "4x-tiny", "--upscaler-dir", str(tmp_path)]
    assert main([*args, "--scale", "2", "-o", str(scaled)]) == 0
    assert Image.open(scaled).size == (48, 40)
    assert main(["upscale", image, "-m", image, "-o", str(tmp_path / "x.png")]) == 2  # not a model file
