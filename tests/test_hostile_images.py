"""Hostile and unusual user images on every path (CLI, A1111 API, ComfyUI upload and LoadImage): bombs of
every format refused from their header, before decoding, with one message naming the input and the
problem; every mode converted by `open_image`'s stated rules (checked against numpy oracles); EXIF
orientation applied; the same file gives the same pixels and mask on every path. The corpus is made here.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps, PngImagePlugin

from sdlab.images import ImageError, ImageLimits, ImageTooLarge, open_image, probe_image
from sdlab.server import nodes
from sdlab.server.a1111 import _open_input
from sdlab.server.app import create_app
from sdlab.server.jobs import QueueFull
from sdlab.server.paths import Folders
from sdlab.server.state import Settings

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # as sdlab.images
PILLOW_LIMIT = Image.MAX_IMAGE_PIXELS  # as Pillow set it: sdlab never changes it
LIMITS = ImageLimits(max_bytes=1 << 20)  # the test server's: default pixels, 1 MiB files


# ---------------------------------------------------------------------------------------------
# the corpus


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of width x height whose IDAT is a few KB per 1000 rows (repeated
    full-flush deflate blocks, so even 30000² takes milliseconds to write)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = 1000
    assert height % rows == 0
    raw = b"\0" * ((1 + (width + 7) // 8) * rows)  # filter byte + packed bits, per row
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(raw) + deflate.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, no back-references
    total = len(raw) * (height // rows)
    adler = ((total % 65521) << 16) | 1  # adler32 of `total` zero bytes
    idat = b"\x78\xda" + block * (height // rows) + b"\x03\x00" + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _patched(data: bytes, old: bytes, new: bytes, count: int = 1) -> bytes:
    assert data.count(old) == count, (old, data.count(old))
    return data.replace(old, new)


def header_bomb(fmt: str, side: int) -> bytes:
    """A small real image whose header claims side x side pixels (decoding it would allocate them all)."""
    w, h = 251, 241
    small = Image.new("RGB", (w, h), (10, 20, 30))
    if fmt == "JPEG":
        return _patched(encoded(small, "JPEG"), struct.pack(">HH", h, w), struct.pack(">HH", side, side))
    if fmt == "GIF":  # logical screen and image descriptor
        return _patched(encoded(small, "GIF"), struct.pack("<HH", w, h), struct.pack("<HH", side, side), 2)
    if fmt == "BMP":
        return _patched(encoded(small, "BMP"), struct.pack("<ii", w, h), struct.pack("<ii", side, side))
    if fmt == "TIFF":
        data = encoded(small, "TIFF", compression="tiff_deflate")
        for tag, value in ((256, w), (257, h)):  # ImageWidth, ImageLength as SHORT entries
            data = _patched(
                data, struct.pack("<HHIHH", tag, 3, 1, value, 0), struct.pack("<HHIHH", tag, 3, 1, side, 0)
            )
        return data
    assert fmt == "WEBP"  # lossless: the VP8L header packs width-1 and height-1 in 14 bits each
    data = encoded(small, "WEBP", lossless=True)
    at = data.index(b"VP8L") + 9
    bits = struct.unpack("<I", data[at : at + 4])[0] & ~((1 << 28) - 1)
    return data[:at] + struct.pack("<I", bits | (side - 1) | ((side - 1) << 14)) + data[at + 4 :]


BOMBS = {  # name -> (file, what the refusal says)
    "bomb-13000.png": (lambda: png_bomb(13000, 13000), "13000x13000 = 169,000,000 pixels exceeds the limit"),
    "bomb-30000.png": (lambda: png_bomb(30000, 30000), "too many pixels"),  # beyond Pillow's own limit too
    **{
        f"bomb-12000.{fmt.lower()}": (lambda fmt=fmt: header_bomb(fmt, 12000), "12000x12000 = 144,000,000")
        for fmt in ("JPEG", "GIF", "BMP", "TIFF", "WEBP")
    },
    "bomb-60000.jpeg": (lambda: header_bomb("JPEG", 60000), "too many pixels"),
}


def gradient(w: int = 48, h: int = 32) -> np.ndarray:
    """(h, w, 3) uint8 with distinct rows and columns, so every flip or turn shows."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 5, y * 7, (x * 3 + y * 11) % 256], axis=-1).astype(np.uint8)


def with_exif(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(arr), "JPEG", quality=95, exif=exif)


def _stored(data: bytes) -> np.ndarray:
    """The samples as stored, without sdlab (the oracles below start from these)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def _white_over(grey_or_rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    colour = grey_or_rgb if grey_or_rgb.ndim == 3 else np.repeat(grey_or_rgb[..., None], 3, -1)
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(colour * a + 255 * (1 - a)).astype(np.uint8)


def mode_corpus() -> dict[str, tuple[bytes, np.ndarray, np.ndarray | None]]:
    """name -> (file, the RGB image open_image must give, the alpha LoadImage's mask comes from, or None)."""
    rng = np.random.default_rng(0)
    files: dict[str, tuple[bytes, np.ndarray, np.ndarray | None]] = {}
    i16 = rng.integers(0, 65536, (32, 48), dtype=np.uint16)
    i16[0, :3] = (0, 255, 65535)
    files["i16.png"] = (encoded(Image.fromarray(i16), "PNG"), np.repeat((i16 >> 8)[..., None], 3, -1), None)
    i32 = rng.integers(-70000, 140000, (32, 48), dtype=np.int32)
    grey = (np.clip(i32, 0, 65535) >> 8).astype(np.uint8)  # read as 16-bit data, as PNG and ComfyUI do
    files["i32.tif"] = (encoded(Image.fromarray(i32), "TIFF"), np.repeat(grey[..., None], 3, -1), None)
    f32 = rng.uniform(-0.5, 1.5, (32, 48)).astype(np.float32)
    f32[0, :4] = (np.nan, 0.5, np.inf, -np.inf)
    grey = np.clip(np.rint(np.nan_to_num(f32, nan=0, posinf=1, neginf=0) * 255), 0, 255).astype(np.uint8)
    files["f32.tif"] = (encoded(Image.fromarray(f32), "TIFF"), np.repeat(grey[..., None], 3, -1), None)
    cmyk = encoded(Image.fromarray(rng.integers(0, 256, (32, 48, 4), dtype=np.uint8), "CMYK"), "JPEG")
    c, k = _stored(cmyk).astype(np.int64), 255 - _stored(cmyk)[..., 3:].astype(np.int64)
    t = c[..., :3] * k + 128  # Pillow's MULDIV255: R = (255 - K) - C (255 - K) / 255, rounded
    files["cmyk.jpg"] = (cmyk, (k - (((t >> 8) + t) >> 8)).astype(np.uint8), None)
    index = rng.integers(0, 4, (32, 48), dtype=np.uint8)
    palette = [(9, 9, 9), (200, 10, 10), (10, 200, 10), (10, 10, 200)]
    p = Image.fromarray(index, "P")
    p.putpalette([v for colour in palette for v in colour])
    alpha = np.where(index == 0, 0, 255).astype(np.uint8)
    rgb = np.array(palette, dtype=np.uint8)[index]
    files["p-transparent.png"] = (encoded(p, "PNG", transparency=0), _white_over(rgb, alpha), alpha)
    grey, alpha = rng.integers(0, 256, (2, 32, 48), dtype=np.uint8)
    alpha[0, :3] = (0, 255, 128)
    la = encoded(Image.fromarray(np.stack([grey, alpha], -1), "LA"), "PNG")
    files["la.png"] = (la, _white_over(grey, alpha), alpha)
    rgba = rng.integers(0, 256, (32, 48, 4), dtype=np.uint8)
    rgba[0, :2, 3] = (0, 255)
    files["rgba.png"] = (
        encoded(Image.fromarray(rgba, "RGBA"), "PNG"),
        _white_over(rgba[..., :3], rgba[..., 3]),
        rgba[..., 3],
    )
    bits = rng.integers(0, 2, (32, 48)).astype(bool)
    files["1bit.png"] = (
        encoded(Image.fromarray(bits), "PNG"),
        np.repeat((bits * 255).astype(np.uint8)[..., None], 3, -1),
        None,
    )
    for orientation, turns in ((6, -1), (3, 2)):  # 6: turn 90° clockwise to show; 3: turn 180°
        data = with_exif(gradient(), orientation)
        files[f"exif{orientation}.jpg"] = (data, np.rot90(_stored(data), turns), None)
    data = with_exif(np.repeat(gradient()[..., :1], 3, -1), 6)  # grey: its mask is the same on every path
    files["exif6-grey.jpg"] = (data, np.rot90(_stored(data), -1), None)
    return files


CORPUS = mode_corpus()


def broken() -> dict[str, tuple[bytes, str]]:
    """name -> (file, what the refusal says)."""
    png = encoded(Image.fromarray(gradient()), "PNG")
    jpeg = encoded(Image.fromarray(gradient()), "JPEG")
    return {
        "truncated.png": (png[: len(png) // 2], "corrupt or truncated"),
        "truncated.jpg": (jpeg[:400], "corrupt or truncated"),
        "corrupt.png": (
            png[:40] + bytes(range(256)) * 4,
            "unknown format or corrupt header",
        ),
        "garbage.png": (b"GIF89a" + b"\xff" * 64, "unknown format or corrupt header"),
        "notes.png": (b"just some text\n" * 10, "not an image sdlab reads"),
        "drawing.eps": (
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
            "not an image sdlab reads",
        ),
        "empty.png": (b"", "empty file"),
        "huge.png": (png + b"\0" * (LIMITS.max_bytes + 1 - len(png)), "exceeds the limit of 1,048,576 bytes"),
    }


BROKEN = broken()


# ---------------------------------------------------------------------------------------------
# open_image: the rules


@pytest.mark.parametrize("name", list(CORPUS))
def test_every_mode_converts_by_its_rule(name: str) -> None:
    data, expected, alpha = CORPUS[name]
    rgb = open_image(data, name)
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb), expected)
    rgba = np.asarray(open_image(data, name, mode="RGBA"))
    np.testing.assert_array_equal(rgba[..., 3], 255 if alpha is None else alpha)


def test_alpha_is_composited_on_white_and_masks_read_alpha_or_luma() -> None:
    data, _, alpha = CORPUS["rgba.png"]
    assert open_image(data, "a").getpixel((0, 0)) == (255, 255, 255)  # fully transparent: the background
    mask = np.asarray(open_image(data, "a", mode="L"))
    np.testing.assert_array_equal(mask, np.where(alpha > 128, 255, 0))  # A1111's create_binary_mask
    grey = np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) % 256
    opaque = encoded(Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, -1)), "PNG")
    np.testing.assert_array_equal(np.asarray(open_image(opaque, "m", mode="L")), grey)  # luma of grey


def test_exif_orientation_matches_pillow_transpose_and_keeps_text() -> None:
    data = CORPUS["exif6.jpg"][0]
    with Image.open(io.BytesIO(data)) as im:
        reference = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(open_image(data, "x")), reference)
    assert open_image(data, "x").size == (32, 48)
    text = PngImagePlugin.PngInfo()
    text.add_text("parameters", "a cat")
    tagged = encoded(Image.new("RGB", (8, 8)), "PNG", pnginfo=text)
    assert open_image(tagged, "x").info["parameters"] == "a cat"


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_are_refused_from_the_header(name: str) -> None:
    data, message = BOMBS[name][0](), BOMBS[name][1]
    assert len(data) < 200_000
    with pytest.raises(ImageTooLarge, match=f"^{name}: .*{message}"):
        open_image(data, name)
    with pytest.raises(ImageTooLarge):
        probe_image(data, name)
    assert Image.MAX_IMAGE_PIXELS == PILLOW_LIMIT


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_files_name_the_problem(name: str, tmp_path: Path) -> None:
    data, message = BROKEN[name]
    (tmp_path / name).write_bytes(data)
    for source in (data, tmp_path / name):
        with pytest.raises(ImageError) as refused:
            open_image(source, name, LIMITS)
        assert str(refused.value).startswith(f"{name}: ") and message in str(refused.value)
        assert isinstance(refused.value, ImageTooLarge) == (name == "huge.png")


def test_files_that_are_not_there() -> None:
    with pytest.raises(ImageError, match="^nowhere.png: no such file$"):
        open_image("nowhere.png", "nowhere.png")
    with pytest.raises(ImageError, match="is a folder"):
        open_image(Path(__file__).parent, "tests")


def test_limits_are_configurable() -> None:
    data = CORPUS["rgba.png"][0]
    with pytest.raises(ImageTooLarge, match="48x32 = 1,536 pixels exceeds the limit of 1,000 pixels"):
        open_image(data, "small", ImageLimits(max_pixels=1000))
    with pytest.raises(ImageTooLarge, match="bytes exceeds the limit of 100 bytes"):
        open_image(data, "small", ImageLimits(max_bytes=100))


# ---------------------------------------------------------------------------------------------
# every path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Any]]:
    root = tmp_path_factory.mktemp("hostile")
    (root / "models").mkdir()
    (root / "models" / "never-loaded.safetensors").write_bytes(b"{}")
    settings = Settings(
        Folders(root / "models", root / "outputs", root / "input", root / "state"), image_limits=LIMITS
    )
    app = create_app(settings)
    with TestClient(app, base_url="http://localhost") as client:
        yield client, app.state.server


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def a1111_images(client: TestClient, server: Any, data: bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    """What an A1111 img2img job would run with: the init image and mask as the worker reads them."""
    seen: dict[str, Image.Image | None] = {}

    def submit(kind: str, request: dict[str, Any], job_id: str | None = None) -> None:
        seen.update({key: _open_input(server, request[key]) for key in ("init_image", "mask")})
        raise QueueFull("captured")

    monkeypatch.setattr(server.worker, "submit", submit)
    body = {"init_images": [_b64(data)], "mask": _b64(data), "width": 64, "height": 64, "steps": 1}
    response = client.post("/sdapi/v1/img2img", json=body)
    if response.status_code != 429:
        return response
    return seen["init_image"], seen["mask"]


def cli_images(data: bytes, path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Image.Image, Image.Image]:
    """What `sdlab generate -i FILE --mask FILE` hands to the pipeline."""
    import sdlab.checkpoints.load
    import sdlab.pipeline
    from sdlab.cli import main

    class Seen(Exception):
        pass

    class Model:
        name, native_size, default_steps, default_cfg = "m", 64, 1, 7.0

    def generate(model: Any, request: Any, **_: Any) -> None:
        raise Seen(request)

    path.write_bytes(data)
    monkeypatch.setattr(sdlab.checkpoints.load, "load_model", lambda *a, **k: Model())
    monkeypatch.setattr(sdlab.checkpoints.load, "resolve_model", lambda m: m)
    monkeypatch.setattr(sdlab.pipeline, "generate", generate)
    with pytest.raises(Seen) as seen:
        main(["generate", "a cat", "-i", str(path), "--mask", str(path), "-q"])
    request = seen.value.args[0]
    return request.init_image, request.mask


def comfy_upload(client: TestClient, name: str, data: bytes) -> Any:
    return client.post("/upload/image", files={"image": (name, data)}, data={"overwrite": "true"})


@pytest.mark.parametrize("name", list(CORPUS))
def test_same_pixels_and_mask_on_every_path(
    name: str, server: tuple[TestClient, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, state = server
    data, expected, alpha = CORPUS[name]
    cli_init, cli_mask = cli_images(data, tmp_path / name, monkeypatch)
    api_init, api_mask = a1111_images(client, state, data, monkeypatch)
    assert comfy_upload(client, name, data).status_code == 200
    pixels, comfy_mask = nodes.load_image(state.env(), name)
    comfy_init = nodes.to_pil(pixels)[0]
    for image in (cli_init, api_init):  # A1111's rule: alpha composited on white
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), expected)
    kept = np.asarray(open_image(data, name, mode="RGBA"))[..., :3]  # ComfyUI's: the hidden colour kept
    np.testing.assert_array_equal(np.asarray(comfy_init), kept)
    if alpha is None:
        np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(np.asarray(cli_mask), np.asarray(api_mask))
    np.testing.assert_array_equal(np.asarray(cli_mask), np.asarray(open_image(data, name, mode="L")))
    comfy_alpha = np.broadcast_to(255 if alpha is None else alpha, expected.shape[:2])
    np.testing.assert_array_equal((comfy_mask[0, 0].numpy() * 255).round(), 255 - comfy_alpha)  # 1 - alpha
    if name == "exif6-grey.jpg":  # a grey mask file: its red channel is its luma on every path
        (red,) = nodes.load_image_mask(state.env(), name, "red")
        np.testing.assert_array_equal((red[0, 0].numpy() * 255).round(), np.asarray(cli_mask))
        np.testing.assert_array_equal(np.asarray(cli_mask), expected[..., 0])


@pytest.mark.parametrize("name", [*BOMBS, *BROKEN])
def test_every_path_refuses_with_a_4xx_naming_it(
    name: str,
    server: tuple[TestClient, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sdlab.cli import main

    client, state = server
    data, message = (BOMBS[name][0](), BOMBS[name][1]) if name in BOMBS else BROKEN[name]
    too_large = name in BOMBS or name == "huge.png"
    status = 413 if too_large else 422
    response = a1111_images(client, state, data, monkeypatch)
    assert response.status_code == status and response.json()["detail"].startswith("init_images[0]: ")
    assert message in response.json()["detail"]
    response = client.post("/sdapi/v1/png-info", json={"image": _b64(data)})
    assert response.status_code == status and response.json()["detail"].startswith("image: ")
    response = comfy_upload(client, name, data)
    assert response.status_code == (413 if too_large else 400), response.text
    assert response.json()["detail"].startswith(f"{name}: ") and message in response.json()["detail"]
    assert not (state.folders.inputs / name).exists()  # refused before it was stored

    path = tmp_path / name
    path.write_bytes(data)
    flags = ["--max-image-bytes", str(LIMITS.max_bytes)]
    assert main(["generate", "a cat", "-m", str(tmp_path / "no-model"), "-i", str(path), "-q", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"sdlab generate: error: {path}: ") and message in err


def test_load_image_refuses_a_bomb_in_the_input_folder_at_validation(server: tuple[TestClient, Any]) -> None:
    client, state = server
    (state.folders.inputs / "placed.png").write_bytes(BOMBS["bomb-13000.png"][0]())
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "placed.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "LoadImageMask", "inputs": {"image": "placed.png", "channel": "alpha"}},
    }
    response = client.post("/prompt", json={"prompt": workflow})
    assert response.status_code == 400
    (error,) = response.json()["node_errors"]["1"]["errors"]
    assert error["type"] == "custom_validation_failed" and error["extra_info"]["input_name"] == "image"
    assert error["details"].startswith("image - Invalid image file: placed.png: 13000x13000")
    (state.folders.inputs / "placed.png").unlink()


MEASURE = r"""
import base64, io, json, re, resource, sys, time
from pathlib import Path
from PIL import Image
from fastapi.testclient import TestClient
from sdlab.cli import main
from sdlab.images import ImageError, ImageLimits, open_image
from sdlab.server.app import create_app
from sdlab.server.paths import Folders
from sdlab.server.state import Settings

root = Path(sys.argv[1])
bombs = {path.name: path.read_bytes() for path in sorted((root / "bombs").iterdir())}
app = create_app(Settings(Folders(None, root / "o", root / "i", root / "s")))
# this process's own peak RSS (VmHWM starts afresh at exec; ru_maxrss carries the forking parent's size)
peak = lambda: int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
with TestClient(app, base_url="http://localhost") as client:
    client.post("/sdapi/v1/png-info", json={"image": "x"})  # warm the routes up
    before, times, codes = peak(), {}, []
    for name, data in bombs.items():
        start = time.perf_counter()
        try:
            open_image(data, name)
        except ImageError:
            times[name] = time.perf_counter() - start
        codes.append(main(["generate", "a cat", "-i", str(root / "bombs" / name), "-q"]))
        b64 = base64.b64encode(data).decode()
        codes.append(client.post("/sdapi/v1/img2img", json={"init_images": [b64], "mask": b64}).status_code)
        codes.append(client.post("/upload/image", files={"image": (name, data)}).status_code)
    growth = peak() - before
# the meter works: a decode only shows once it exceeds what the process already peaked above its current
# size (freed start-up memory), so the control decodes an RGB image 64 MiB larger than that slack
rss = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
side = min(int(((peak() - rss + 2**26) / 3) ** 0.5) + 1, 12000)  # below Pillow's own bomb limit
buf = io.BytesIO()
Image.new("1", (side, side)).save(buf, "PNG")
open_image(buf.getvalue(), "control", ImageLimits(max_pixels=side * side, max_bytes=2**30))
print(json.dumps({"growth": growth, "control": peak() - before - growth, "times": times, "codes": codes}))
"""


def test_refusing_bombs_takes_no_memory_and_prints_one_line(tmp_path: Path) -> None:
    """Every bomb on every path in a fresh process: peak RSS growth, time to refuse, stderr lines."""
    (tmp_path / "bombs").mkdir()
    for name, (make, _) in BOMBS.items():
        (tmp_path / "bombs" / name).write_bytes(make())
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    growth, control = figures["growth"] / 2**20, figures["control"] / 2**20
    print(f"\npeak RSS growth {growth:.1f} MiB (control {control:.0f} MiB)")
    print(f"seconds to refuse: {figures['times']}")
    assert figures["growth"] < 2**30 and len(figures["times"]) == len(BOMBS)
    assert figures["control"] >= 2**25  # the meter works: the control's decode shows (at least 32 MiB)
    assert max(figures["times"].values()) < 0.5
    assert figures["codes"] == [2, 413, 413] * len(BOMBS)
    lines = run.stderr.splitlines()
    assert len(lines) == len(BOMBS) and all(line.startswith("sdlab generate: error: ") for line in lines)
