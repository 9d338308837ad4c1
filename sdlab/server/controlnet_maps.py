"""sd-webui-controlnet's control-map preparation, for the A1111 API: the input scaled to `processor_res`
(and padded to multiples of 64) around a preprocessor, then the detected map fitted to the output size
by `detectmap_proc`'s `high_quality_resize` (nearest for maps of few colours, area when shrinking, cubic
when growing; binary maps re-binarised with Otsu's threshold, one-pixel edges thinned). The inpaint
modules' RGBA input (image + mask, `internal_controlnet/args.py` `combine_image_and_mask`) is fitted the
same way in float32, its mask following the colours' interpolation and cut at 127.

Transcribed from the extension (`scripts/preprocessor/legacy/processor.py` `resize_image_with_pad`,
`scripts/controlnet.py` `detectmap_proc`, `scripts/lvminthin.py`, `annotator/color`) and computed with
OpenCV as the extension computes them, so the maps are the extension's to the bit; OpenCV
(`opencv-python-headless`) comes with the `serve` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import numpy as np

Map = np.ndarray  # (H, W, 3) uint8, as the extension's HWC3 gives


def _cv2() -> ModuleType:
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - the serve extra installs it
        raise RuntimeError(
            "ControlNet maps through the A1111 API need OpenCV: pip install 'sdlab[serve]'"
        ) from e
    return cv2


def hwc3(x: np.ndarray) -> Map:
    """The extension's HWC3: grey to three channels, RGBA composited on white."""
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    if x.shape[2] == 4:
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        return (x[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return x


def pad64(x: int) -> int:
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def at_resolution(image: Map, resolution: int, fn: Callable[[Map], Map], crop_first: bool = False) -> Map:
    """`fn` run as the extension runs a preprocessor with a resolution slider: the shorter side scaled to
    `resolution` (cubic when growing, area otherwise), edge-padded to multiples of 64, the result cut back
    (`crop_first`: cut before `fn`, as its blur_gaussian does)."""
    cv2 = _cv2()
    h_raw, w_raw, _ = image.shape
    k = float(resolution) / float(min(h_raw, w_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h, w = int(np.round(float(h_raw) * k)), int(np.round(float(w_raw) * k))
    image = cv2.resize(image, (w, h), interpolation=interpolation)
    if crop_first:
        return fn(image)
    padded = np.pad(image, [[0, pad64(h)], [0, pad64(w)], [0, 0]], mode="edge")
    return fn(padded)[:h, :w]


def shortest_edge(image: Map, size: int) -> Map:
    """`annotator.color.cv2_resize_shortest_edge`: the shorter side to `size` by area resampling."""
    h, w = image.shape[:2]
    new_h, new_w = (size, int(round(w / h * size))) if h < w else (int(round(h / w * size)), size)
    return _cv2().resize(image, (new_w, new_h), interpolation=_cv2().INTER_AREA)


# ---------------------------------------------------------------------------------------------
# detectmap_proc


def _unique_rows(data: np.ndarray) -> np.ndarray:
    """`scripts.utils.get_unique_axis0`: the distinct rows."""
    arr = data[np.lexsort(data.T)]
    keep = np.empty(len(arr), dtype=bool)
    keep[:1] = True
    keep[1:] = np.any(arr[:-1, :] != arr[1:, :], axis=-1)
    return arr[keep]


_LINES = [
    np.array(k, dtype=np.uint8)
    for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]],
        [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
    )
]


def nake_nms(x: np.ndarray) -> np.ndarray:
    """`lvminthin.nake_nms`: keep pixels that are the maximum along some line through them."""
    y = np.zeros_like(x)
    for f in _LINES:
        np.putmask(y, _cv2().dilate(x, kernel=f) == x, x)
    return y


def _rotations(*raw: list[list[int]]) -> list[np.ndarray]:
    kernels = [np.array(k, dtype=np.int32) for k in raw]
    return [np.rot90(k, k=r, axes=(0, 1)) for r in range(4) for k in kernels]


THIN = _rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
PRUNE = _rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])


def _thin_once(x: np.ndarray, kernels: list[np.ndarray]) -> tuple[np.ndarray, bool]:
    """One pass of `lvminthin.thin_one_time`: each hit-or-miss pattern's pixels cleared in turn."""
    done = True
    for k in kernels:
        hits = np.where(_cv2().morphologyEx(x, _cv2().MORPH_HITMISS, k) > 127)
        x[hits] = 0
        done = done and hits[0].shape[0] == 0
    return x, done


def lvmin_thin(x: np.ndarray, prunings: bool = True) -> np.ndarray:
    """`lvminthin.lvmin_thin`: up to 32 thinning passes, then one pruning pass."""
    for _ in range(32):
        x, done = _thin_once(x, THIN)
        if done:
            break
    if prunings:
        x, _ = _thin_once(x, PRUNE)
    return x


def high_quality_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The extension's `high_quality_resize` of an (H, W, 3) map to size (w, h). An (H, W, 4) inpaint map
    (float colours, the mask in alpha) has its mask resized with the colours' interpolation and cut at 127."""
    if x.shape[2] != 4:
        return _resized_map(x, size)[0]
    y, interpolation = _resized_map(x[:, :, :3], size)
    mask = x[:, :, 3]
    if interpolation is not None:
        mask = _cv2().resize(mask, size, interpolation=interpolation)
    return np.concatenate([y, (mask[:, :, None] > 127).astype(np.uint8) * 255], axis=2)


def _resized_map(x: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, int | None]:
    """An RGB map at size (w, h) and the OpenCV interpolation used (None: already that size): nearest for
    maps of few colours, area when shrinking, cubic when growing; binary maps re-binarised, thinned."""
    cv2 = _cv2()
    if x.shape[0] == size[1] and x.shape[1] == size[0]:
        return x, None
    smaller = size[0] * size[1] < x.shape[0] * x.shape[1]
    bigger = size[0] * size[1] > x.shape[0] * x.shape[1]
    colours = len(_unique_rows(x.reshape(-1, x.shape[2])))
    binary = colours == 2 and bool(np.min(x) < 16 and np.max(x) > 240)
    one_pixel_edge = False
    if binary:
        xc = cv2.dilate(cv2.erode(x, np.ones((3, 3), np.uint8), iterations=1), np.ones((3, 3), np.uint8))
        one_pixel_edge = np.where(xc < x)[0].shape[0] * 2 > np.where(x > 127)[0].shape[0]
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif smaller:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, size, interpolation=interpolation)
    if not binary:
        return y, interpolation
    y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if one_pixel_edge:
        y = nake_nms(y)
        _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = lvmin_thin(y, prunings=bigger)
    else:
        _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return np.stack([y] * 3, axis=2), interpolation


def detectmap_proc(
    detected: np.ndarray, resize_mode: str, height: int, width: int, inpaint: bool = False
) -> np.ndarray:
    """The extension's `detectmap_proc`: the map stretched to width x height (`resize`), scaled to cover
    and centre-cropped (`crop`), or scaled to fit on the median border colour (`fill`). An `inpaint` map
    (RGBA, the mask in alpha) is fitted in float32 as the extension fits it, the fill's border masked."""
    detected = detected.astype(np.float32) if inpaint else hwc3(detected)
    if resize_mode == "resize":
        return high_quality_resize(detected, (width, height))
    old_h, old_w = float(detected.shape[0]), float(detected.shape[1])
    k0, k1 = float(height) / old_h, float(width) / old_w
    k = min(k0, k1) if resize_mode == "fill" else max(k0, k1)
    size = (int(np.round(old_w * k)), int(np.round(old_h * k)))
    if resize_mode == "fill":
        borders = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]], axis=0)
        border = np.median(borders, axis=0).astype(detected.dtype)
        if len(border) == 4:  # inpaint: the margin is repainted
            border[3] = 255
        out = np.tile(border[None, None], [height, width, 1])
        detected = high_quality_resize(detected, size)
        new_h, new_w, _ = detected.shape
        pad_h, pad_w = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        out[pad_h : pad_h + new_h, pad_w : pad_w + new_w] = detected
        return out
    detected = high_quality_resize(detected, size)
    new_h, new_w, _ = detected.shape
    pad_h, pad_w = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return detected[pad_h : pad_h + height, pad_w : pad_w + width]


# ---------------------------------------------------------------------------------------------
# inpaint


def inpaint_input(image: Map, mask: np.ndarray | None) -> np.ndarray:
    """`ControlNetUnit.combine_image_and_mask`: the (H, W, 3) image with the first channel of the mask's
    HWC3 as alpha (white = repaint; no mask: zeros, nothing repainted); ValueError when the sizes differ."""
    alpha = np.zeros_like(image[:, :, :1]) if mask is None else hwc3(mask)[:, :, :1]
    if alpha.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"the mask is {alpha.shape[1]}x{alpha.shape[0]} px, the image {image.shape[1]}x{image.shape[0]}"
        )
    return np.concatenate([image, alpha], axis=2)


def visualize_inpaint_mask(rgba: np.ndarray) -> np.ndarray:
    """The extension's `visualize_inpaint_mask`, /controlnet/detect's inpaint image: alpha 255 − mask // 2."""
    out = rgba.copy()
    out[:, :, 3] = 255 - out[:, :, 3] // 2
    return out
