"""sd-webui-controlnet's control-map preparation (sdlab.server.controlnet_maps, the A1111 API's modules)
against the extension's own functions transcribed here with OpenCV, as it runs them: `resize_image_with_pad`
around a preprocessor, `detectmap_proc` / `high_quality_resize` (binary maps, one-pixel edges thinned,
few-colour maps by nearest, area and cubic otherwise) in all three resize modes, `t2ia_color_grid`."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.images import DEFAULT_LIMITS
from sdlab.preprocess import gaussian_blur_numpy, preprocess
from sdlab.server.controlnet_api import MODULES
from sdlab.server.controlnet_maps import detectmap_proc, inpaint_input, visualize_inpaint_mask

cv2 = pytest.importorskip("cv2")

# ---------------------------------------------------------------------------------------------
# the extension, transcribed (scripts/utils.py, scripts/controlnet.py, scripts/lvminthin.py,
# annotator/color, scripts/preprocessor/model_free_preprocessors.py and legacy/processor.py)


def HWC3(x):
    assert x.dtype == np.uint8
    if x.ndim == 2:
        x = x[:, :, None]
    assert x.ndim == 3
    H, W, C = x.shape
    assert C == 1 or C == 3 or C == 4
    if C == 3:
        return x
    if C == 1:
        return np.concatenate([x, x, x], axis=2)
    if C == 4:
        color = x[:, :, 0:3].astype(np.float32)
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        y = color * alpha + 255.0 * (1.0 - alpha)
        y = y.clip(0, 255).astype(np.uint8)
        return y


def pad64(x):
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_image_with_pad(img, resolution):
    H_raw, W_raw, _ = img.shape
    k = float(resolution) / float(min(H_raw, W_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    H_target = int(np.round(float(H_raw) * k))
    W_target = int(np.round(float(W_raw) * k))
    img = cv2.resize(img, (W_target, H_target), interpolation=interpolation)
    H_pad, W_pad = pad64(H_target), pad64(W_target)
    img_padded = np.pad(img, [[0, H_pad], [0, W_pad], [0, 0]], mode="edge")

    def remove_pad(x):
        return x[:H_target, :W_target].copy()

    return img_padded.copy(), remove_pad


def canny(input_image, resolution, slider_1, slider_2):
    input_image, remove_pad = resize_image_with_pad(input_image, resolution)
    return remove_pad(cv2.cvtColor(cv2.Canny(input_image, int(slider_1), int(slider_2)), cv2.COLOR_GRAY2RGB))


def threshold(img, res, thr_a):
    img, remove_pad = resize_image_with_pad(img, res)
    result = np.zeros_like(img, dtype=np.uint8)
    result[np.min(img, axis=2) > thr_a] = 255
    return remove_pad(result)


def apply_color(img, res):
    h, w = img.shape[:2]
    if h < w:
        new_h, new_w = res, int(round(w / h * res))
    else:
        new_w, new_h = res, int(round(h / w * res))
    img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    input_img_color = cv2.resize(img, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(input_img_color, (w, h), interpolation=cv2.INTER_NEAREST)


lvmin_kernels_raw = [
    np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], dtype=np.int32),
    np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], dtype=np.int32),
]
lvmin_kernels = [np.rot90(x, k=r, axes=(0, 1)) for r in range(4) for x in lvmin_kernels_raw]
lvmin_prunings_raw = [
    np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], dtype=np.int32),
    np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]], dtype=np.int32),
]
lvmin_prunings = [np.rot90(x, k=r, axes=(0, 1)) for r in range(4) for x in lvmin_prunings_raw]


def remove_pattern(x, kernel):
    objects = cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel)
    objects = np.where(objects > 127)
    x[objects] = 0
    return x, objects[0].shape[0] > 0


def thin_one_time(x, kernels):
    y = x
    is_done = True
    for k in kernels:
        y, has_update = remove_pattern(y, k)
        if has_update:
            is_done = False
    return y, is_done


def lvmin_thin(x, prunings=True):
    y = x
    for _ in range(32):
        y, is_done = thin_one_time(y, lvmin_kernels)
        if is_done:
            break
    if prunings:
        y, _ = thin_one_time(y, lvmin_prunings)
    return y


def nake_nms(x):
    f1 = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8)
    f2 = np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8)
    f3 = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8)
    f4 = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8)
    y = np.zeros_like(x)
    for f in [f1, f2, f3, f4]:
        np.putmask(y, cv2.dilate(x, kernel=f) == x, x)
    return y


def get_unique_axis0(data):
    arr = np.asanyarray(data)
    idxs = np.lexsort(arr.T)
    arr = arr[idxs]
    unique_idxs = np.empty(len(arr), dtype=np.bool_)
    unique_idxs[:1] = True
    unique_idxs[1:] = np.any(arr[:-1, :] != arr[1:, :], axis=-1)
    return arr[unique_idxs]


def high_quality_resize(x, size):
    inpaint_mask = None
    if x.ndim == 3 and x.shape[2] == 4:
        inpaint_mask = x[:, :, 3]
        x = x[:, :, 0:3]

    if x.shape[0] != size[1] or x.shape[1] != size[0]:
        new_size_is_smaller = (size[0] * size[1]) < (x.shape[0] * x.shape[1])
        new_size_is_bigger = (size[0] * size[1]) > (x.shape[0] * x.shape[1])
        unique_color_count = len(get_unique_axis0(x.reshape(-1, x.shape[2])))
        is_one_pixel_edge = False
        is_binary = False
        if unique_color_count == 2:
            is_binary = np.min(x) < 16 and np.max(x) > 240
            if is_binary:
                xc = x
                xc = cv2.erode(xc, np.ones(shape=(3, 3), dtype=np.uint8), iterations=1)
                xc = cv2.dilate(xc, np.ones(shape=(3, 3), dtype=np.uint8), iterations=1)
                one_pixel_edge_count = np.where(xc < x)[0].shape[0]
                all_edge_count = np.where(x > 127)[0].shape[0]
                is_one_pixel_edge = one_pixel_edge_count * 2 > all_edge_count
        if 2 < unique_color_count < 200:
            interpolation = cv2.INTER_NEAREST
        elif new_size_is_smaller:
            interpolation = cv2.INTER_AREA
        else:
            interpolation = cv2.INTER_CUBIC
        y = cv2.resize(x, size, interpolation=interpolation)
        if inpaint_mask is not None:
            inpaint_mask = cv2.resize(inpaint_mask, size, interpolation=interpolation)
        if is_binary:
            y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
            if is_one_pixel_edge:
                y = nake_nms(y)
                _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
                y = lvmin_thin(y, prunings=new_size_is_bigger)
            else:
                _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            y = np.stack([y] * 3, axis=2)
    else:
        y = x
    if inpaint_mask is not None:
        inpaint_mask = (inpaint_mask > 127).astype(np.float32) * 255.0
        inpaint_mask = inpaint_mask[:, :, None].clip(0, 255).astype(np.uint8)
        y = np.concatenate([y, inpaint_mask], axis=2)
    return y


def extension_detectmap_proc(detected_map, resize_mode, h, w, module="none"):
    """`Script.detectmap_proc(detected_map, module, resize_mode, h, w)` (ResizeMode RESIZE / OUTER_FIT /
    INNER_FIT as "resize" / "fill" / "crop"), the map it returns."""
    if "inpaint" in module:
        detected_map = detected_map.astype(np.float32)
    else:
        detected_map = HWC3(detected_map)
    if resize_mode == "resize":
        return high_quality_resize(detected_map, (w, h))
    old_h, old_w, _ = detected_map.shape
    old_w = float(old_w)
    old_h = float(old_h)
    k0 = float(h) / old_h
    k1 = float(w) / old_w

    def safeint(x):
        return int(np.round(x))

    if resize_mode == "fill":
        k = min(k0, k1)
        borders = np.concatenate(
            [detected_map[0, :, :], detected_map[-1, :, :], detected_map[:, 0, :], detected_map[:, -1, :]],
            axis=0,
        )
        high_quality_border_color = np.median(borders, axis=0).astype(detected_map.dtype)
        if len(high_quality_border_color) == 4:
            # Inpaint hijack
            high_quality_border_color[3] = 255
        high_quality_background = np.tile(high_quality_border_color[None, None], [h, w, 1])
        detected_map = high_quality_resize(detected_map, (safeint(old_w * k), safeint(old_h * k)))
        new_h, new_w, _ = detected_map.shape
        pad_h = max(0, (h - new_h) // 2)
        pad_w = max(0, (w - new_w) // 2)
        high_quality_background[pad_h : pad_h + new_h, pad_w : pad_w + new_w] = detected_map
        return high_quality_background
    k = max(k0, k1)
    detected_map = high_quality_resize(detected_map, (safeint(old_w * k), safeint(old_h * k)))
    new_h, new_w, _ = detected_map.shape
    pad_h = max(0, (new_h - h) // 2)
    pad_w = max(0, (new_w - w) // 2)
    return detected_map[pad_h : pad_h + h, pad_w : pad_w + w]


# ---------------------------------------------------------------------------------------------


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth random picture (noise upscaled), so edges are neither everywhere nor nowhere."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def edge_map(w: int, h: int, thick: bool) -> np.ndarray:
    """A binary line drawing: one-pixel lines, or 4-pixel strokes."""
    y = np.zeros((h, w), np.uint8)
    cv2.circle(y, (w // 2, h // 2), min(w, h) // 3, 255, 4 if thick else 1)
    cv2.line(y, (2, h - 3), (w - 3, 5), 255, 4 if thick else 1)
    return np.stack([y] * 3, axis=2)


def few_colours(w: int, h: int) -> np.ndarray:
    """A segmentation-like map of 5 colours."""
    y = np.zeros((h, w, 3), np.uint8)
    for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 50)]):
        y[i * h // 5 :, : (i + 2) * w // 6] = c
    return y


MAPS = {
    "one-pixel edges": edge_map(37, 29, False),
    "thick strokes": edge_map(37, 29, True),
    "few colours": few_colours(37, 29),
    "photo": photo(37, 29),
}


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
@pytest.mark.parametrize("size", [(64, 48), (24, 16)], ids=["bigger", "smaller"])
def test_detectmap_proc_is_the_extensions(name: str, mode: str, size: tuple[int, int]) -> None:
    x = MAPS[name]
    ours = detectmap_proc(x.copy(), mode, size[1], size[0])
    theirs = extension_detectmap_proc(x.copy(), mode, size[1], size[0])
    assert ours.shape == (size[1], size[0], 3)
    assert np.array_equal(ours, theirs)
    if name == "one-pixel edges" and mode == "resize":
        assert set(np.unique(ours)) == {0, 255}  # still a binary map, thinned


@pytest.mark.parametrize("res", [40, 96])
def test_modules_at_processor_res_are_the_extensions(res: int) -> None:
    """canny and threshold run on the image scaled to `res` (area down, cubic up) and padded to 64s; the
    colour grid on the shorter side scaled by area."""
    image = photo(70, 50, seed=1)
    pil = Image.fromarray(image)
    assert np.array_equal(MODULES["canny"].run(pil, res, 60, 120), canny(image, res, 60, 120))
    assert np.array_equal(MODULES["threshold"].run(pil, res, 120, None), threshold(image, res, 120))
    grid = MODULES["color"].run(Image.fromarray(photo(150, 130)), res + 64, None, None)
    assert np.array_equal(grid, apply_color(photo(150, 130), res + 64))


def test_color_grid_preprocessor() -> None:
    """At the image's own size the grid is the extension's (the shorter side scaled to itself)."""
    image = photo(130, 140, seed=2)
    ours = np.asarray(preprocess("color_grid", Image.fromarray(image)))
    assert np.array_equal(ours, apply_color(image, 130))
    with pytest.raises(ValueError, match="at least 64x64"):
        preprocess("color_grid", Image.fromarray(photo(40, 80)))


# ---------------------------------------------------------------------------------------------
# inpaint units (the RGBA input fitted in float32) and lineart_standard at processor_res


def get_pytorch_control(x):
    """`scripts/controlnet.py` get_pytorch_control, then the hook's ControlNet inpaint protocol."""
    y = torch.from_numpy(x).float() / 255.0
    y = y.permute(2, 0, 1)[None]
    if y.shape[1] == 4:
        c, m = y[:, 0:3], (y[:, 3:4] > 0.5).float()
        y = c * (1 - m) - m
    return y


def lineart_standard(img, res):
    img, remove_pad = resize_image_with_pad(img, res)
    x = img.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    intensity *= 127
    result = intensity.clip(0, 255).astype(np.uint8)
    return HWC3(remove_pad(result))


def disc_mask(w: int, h: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.circle(m, (w // 3, h // 2), min(w, h) // 3, 255, -1)
    return m


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
@pytest.mark.parametrize("size", [(64, 48), (24, 16), (37, 29)], ids=["bigger", "smaller", "same"])
def test_inpaint_map_is_the_extensions(name: str, mode: str, size: tuple[int, int]) -> None:
    """An inpaint input (image + mask in alpha) fitted in float32 with the mask following the colours'
    interpolation, cut at 127, and repainted in a fill's margin: the extension's array, dtype included."""
    x = np.concatenate([MAPS[name], disc_mask(37, 29)[:, :, None]], axis=2)
    ours = detectmap_proc(x.copy(), mode, size[1], size[0], inpaint=True)
    theirs = extension_detectmap_proc(x.copy(), mode, size[1], size[0], "inpaint")
    assert ours.dtype == theirs.dtype and ours.shape == (size[1], size[0], 4)
    assert np.array_equal(ours, theirs)
    assert set(np.unique(ours[:, :, 3])) == {0, 255}


def _unit_spec(tmp_path, unit: dict, size: tuple[int, int] = (40, 32)):
    from sdlab.server.controlnet_api import parse_units
    from sdlab.server.library import Library

    (tmp_path / "ControlNet").mkdir(exist_ok=True)
    (tmp_path / "ControlNet" / "cn.safetensors").write_bytes(b"\0" * 64)  # listed, never loaded here
    scripts = {"controlnet": {"args": [{"model": "cn"} | unit]}}
    return parse_units(Library(tmp_path), scripts, size, None, DEFAULT_LIMITS)[0].spec


def _b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("mode", ["Just Resize", "Crop and Resize", "Resize and Fill"])
def test_inpaint_unit_feeds_the_extensions_hint(tmp_path, mode: str) -> None:
    """An A1111 inpaint unit: image (RGBA, composited on white by HWC3) and mask (an RGB image: its first
    channel) read as `parse_image`, fitted as the extension fits them; the control sdlab feeds the ControlNet
    is the extension's hint: −1 on the repainted pixels, the colours within 8-bit rounding elsewhere."""
    from sdlab.control import hint_tensor

    rng = np.random.default_rng(5)
    image = np.concatenate([photo(37, 29, seed=3), rng.integers(0, 256, (29, 37, 1), dtype=np.uint8)], 2)
    mask = np.stack(
        [disc_mask(37, 29), rng.integers(0, 256, (29, 37), dtype=np.uint8), np.zeros((29, 37))], 2
    )
    mask = mask.astype(np.uint8)
    unit = {"module": "inpaint_global_harmonious", "image": _b64(image), "mask": _b64(mask)}
    spec = _unit_spec(tmp_path, unit | {"resize_mode": mode})
    ours = hint_tensor(preprocess(spec.preprocessor, spec.image, spec.mask))
    rgba = np.concatenate([HWC3(image), HWC3(mask)[:, :, 0:1]], axis=2)  # combine_image_and_mask
    mode_key = {"Just Resize": "resize", "Crop and Resize": "crop", "Resize and Fill": "fill"}[mode]
    fitted = extension_detectmap_proc(rgba, mode_key, 32, 40, "inpaint")
    theirs = get_pytorch_control(fitted)
    masked = theirs == -1
    assert masked.any() and (~masked).any()
    assert torch.equal(ours == -1, masked)
    # the colours a job stores as PNG: the extension's float map rounded, its cubic overshoot clipped
    stored = np.concatenate([np.round(fitted[:, :, :3]).clip(0, 255), fitted[:, :, 3:]], axis=2)
    assert torch.equal(ours, get_pytorch_control(stored.astype(np.float32)))
    in_range = ((theirs >= 0) & (theirs <= 1)) | masked
    assert (ours - theirs)[in_range].abs().max() <= 0.5 / 255 + 1e-7
    assert spec.resize_mode == "resize" and spec.image.size == (40, 32)  # fitted already


def test_inpaint_unit_refusals_and_no_mask(tmp_path) -> None:
    """A mask of another size is refused naming the unit (the extension raises too); without a mask
    nothing is repainted (the extension's zero alpha); in img2img without its own image, inpaint_only and
    inpaint_only+lama: refused with the reason."""
    from fastapi import HTTPException

    from sdlab.control import hint_tensor
    from sdlab.server.controlnet_api import parse_units
    from sdlab.server.library import Library

    image = photo(40, 32, seed=4)
    with pytest.raises(HTTPException, match=r"args\[0\]: the mask is 20x32 px, the image 40x32"):
        _unit_spec(tmp_path, {"module": "inpaint", "image": _b64(image), "mask": _b64(image[:, :20])})
    spec = _unit_spec(tmp_path, {"module": "inpaint", "image": _b64(image)})
    hint = hint_tensor(preprocess(spec.preprocessor, spec.image, spec.mask))
    assert torch.equal(hint, get_pytorch_control(image))
    scripts = {"controlnet": {"args": [{"module": "inpaint", "model": "cn"}]}}
    with pytest.raises(HTTPException, match="needs its own image and mask"):
        parse_units(Library(tmp_path), scripts, (40, 32), Image.fromarray(image), DEFAULT_LIMITS)
    with pytest.raises(HTTPException, match="blends the VAE-encoded control image"):
        _unit_spec(tmp_path, {"module": "inpaint_only", "image": _b64(image)})
    with pytest.raises(HTTPException, match="LaMa inpainting model weights"):
        _unit_spec(tmp_path, {"module": "inpaint_only+lama", "image": _b64(image)})


def test_detect_shows_the_inpaint_input_as_the_extension() -> None:
    """`/controlnet/detect`'s inpaint image: `visualize_inpaint_mask` of image + mask (alpha 255 − m // 2)."""
    x = np.concatenate([photo(12, 10), disc_mask(12, 10)[:, :, None]], axis=2)
    shown = visualize_inpaint_mask(inpaint_input(x[:, :, :3], x[:, :, 3]))
    assert np.array_equal(shown[:, :, :3], x[:, :, :3])
    assert np.array_equal(shown[:, :, 3], 255 - x[:, :, 3] // 2)


@pytest.mark.parametrize("res", [40, 50, 96])
def test_lineart_standard_at_processor_res_is_the_extensions(res: int) -> None:
    """lineart_standard runs on the image scaled to processor_res and edge-padded to 64s (its median over
    the padded image), with OpenCV's blur: the extension's map to the bit. At the image's own size (50)
    the padding alone changes a quarter of the pixels from the map of the unpadded image."""
    image = 255 - edge_map(70, 50, True)  # black strokes on white
    image = cv2.addWeighted(image, 0.8, photo(70, 50, seed=6), 0.2, 0)
    ours = MODULES["lineart_standard"].run(Image.fromarray(image), res, None, None)
    theirs = lineart_standard(image, res)
    assert ours.shape == theirs.shape and theirs.max() > 100
    assert np.array_equal(ours, theirs)
    if res == 50:
        unpadded = np.asarray(preprocess("lineart_standard", Image.fromarray(image)))
        assert (ours != unpadded).mean() > 0.1


def test_numpy_blur_is_opencvs() -> None:
    """The blur used without OpenCV: OpenCV's kernel and borders, equal up to float32 summation order."""
    x = photo(33, 21, seed=7).astype(np.float32)
    for sigma in (0.5, 6.0):
        np.testing.assert_allclose(
            gaussian_blur_numpy(x, sigma), cv2.GaussianBlur(x, (0, 0), sigma), atol=2e-4
        )
