"""ControlNet preprocessors that need no downloaded weights: pure functions from an image to a control image.

Names and defaults follow AUTOMATIC1111's sd-webui-controlnet (`threshold_a`/`threshold_b` are its two
slider values). `canny` computes exactly what `cv2.Canny` computes (the extension's implementation);
the filters built on Gaussian blurs call OpenCV's when it is installed (then they are the extension's to
the bit), else a NumPy transcription of it (the same up to float32 summation order). Detectors
that need model weights (OpenPose, MiDaS, ...) are named in `NEEDS_WEIGHTS` and refused with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

Preprocessor = Callable[[Image.Image, float | None, float | None], Image.Image]
CANNY_SHIFT = 15
TG22 = int(0.4142135623730950488016887242097 * (1 << CANNY_SHIFT) + 0.5)  # tan(22.5°) in fixed point


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _image(arr: np.ndarray) -> Image.Image:
    """A (H, W) or (H, W, 3) array, clipped to 8 bits, as an RGB image (grey maps on all three channels)."""
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr, "RGB")


def canny(image: Image.Image, low: float | None = None, high: float | None = None) -> Image.Image:
    """Canny edges (white on black) as `cv2.Canny(rgb, low, high)`: 3x3 Sobel with replicated borders,
    per pixel the channel of largest L1 gradient, non-maximum suppression in OpenCV's fixed point, and
    hysteresis over 8-connected candidates. Defaults 100 / 200 (A1111)."""
    lo, hi = math.floor(100 if low is None else low), math.floor(200 if high is None else high)
    lo, hi = min(lo, hi), max(lo, hi)
    p = np.pad(_rgb(image).astype(np.int64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = (p[:-2, 2:] - p[:-2, :-2]) + 2 * (p[1:-1, 2:] - p[1:-1, :-2]) + (p[2:, 2:] - p[2:, :-2])
    dy = (p[2:, :-2] - p[:-2, :-2]) + 2 * (p[2:, 1:-1] - p[:-2, 1:-1]) + (p[2:, 2:] - p[:-2, 2:])
    mag = np.abs(dx) + np.abs(dy)
    pick = mag.argmax(axis=2)[..., None]  # the first channel of largest magnitude
    dx, dy, mag = (np.take_along_axis(a, pick, axis=2)[..., 0] for a in (dx, dy, mag))
    candidates = (mag > lo) & _local_maxima(mag, dx, dy)
    return _image(_hysteresis(candidates, candidates & (mag > hi)) * 255)


def _local_maxima(mag: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression along the gradient, binned as OpenCV does with tan 22.5° in fixed point
    (ties go to the left/upper neighbour; zero magnitude outside the image)."""
    m = np.pad(mag, 1)
    at = {
        (r, c): m[1 + r : m.shape[0] - 1 + r, 1 + c : m.shape[1] - 1 + c]
        for r in (-1, 0, 1)
        for c in (-1, 0, 1)
    }
    x, y = np.abs(dx), np.abs(dy) << CANNY_SHIFT
    tg22x = x * TG22
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (x << (CANNY_SHIFT + 1)))
    same_sign = (dx ^ dy) >= 0  # s = +1: compare (i-1, j-1) and (i+1, j+1), else (i-1, j+1) and (i+1, j-1)
    before = np.where(same_sign, at[-1, -1], at[-1, 1])
    after = np.where(same_sign, at[1, 1], at[1, -1])
    return (
        (horizontal & (mag > at[0, -1]) & (mag >= at[0, 1]))
        | (vertical & (mag > at[-1, 0]) & (mag >= at[1, 0]))
        | (~horizontal & ~vertical & (mag > before) & (mag > after))
    )


def _hysteresis(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidates 8-connected to a strong pixel (grown one ring at a time until nothing changes)."""
    edges = strong.copy()
    while True:
        p = np.pad(edges, 1)
        grown = np.zeros_like(edges)
        for r in range(3):
            for c in range(3):
                grown |= p[r : r + edges.shape[0], c : c + edges.shape[1]]
        grown &= candidates
        if (grown == edges).all():
            return edges
        edges = grown


def gaussian_blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    """`cv2.GaussianBlur(float_image, (0, 0), sigma)`, the extension's blur: OpenCV's own when it is installed
    (the `serve` extra), else `gaussian_blur_numpy`; (H, W[, C]) float32 in and out."""
    try:
        import cv2
    except ImportError:
        return gaussian_blur_numpy(arr, sigma)
    return cv2.GaussianBlur(arr.astype(np.float32), (0, 0), sigma)


def gaussian_blur_numpy(arr: np.ndarray, sigma: float) -> np.ndarray:
    """OpenCV's float Gaussian blur in NumPy: its kernel (2·round(4σ)+1 taps, normalised), separable,
    mirrored borders (reflect-101); the same up to float32 summation order."""
    n = int(round(sigma * 4 * 2 + 1)) | 1
    xs = np.arange(n, dtype=np.float64) - (n - 1) / 2
    k = np.exp(-(xs**2) / (2 * sigma * sigma))
    k = (k / k.sum()).astype(np.float32)
    out = arr.astype(np.float32)
    for axis in (1, 0):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (n // 2, n // 2)
        padded = np.pad(out, pad, mode="reflect")
        length = out.shape[axis]
        out = sum(k[i] * np.take(padded, np.arange(i, i + length), axis=axis) for i in range(n))
    return out.astype(np.float32)


def threshold(image: Image.Image, level: float | None = None, _: float | None = None) -> Image.Image:
    """Binary map: white where each of a pixel's channels is above `level` (default 127), as A1111's
    extension computes it (`np.min(img, axis=2) > thr_a`)."""
    return _image((_rgb(image).min(axis=2) > (127 if level is None else level)).astype(np.uint8) * 255)


def invert(image: Image.Image, _a: float | None = None, _b: float | None = None) -> Image.Image:
    """255 − image: black lines on white (a scribble or line drawing) become white on black."""
    return _image(255 - _rgb(image).astype(np.int16))


def lineart_standard(image: Image.Image, _a: float | None = None, _b: float | None = None) -> Image.Image:
    """A1111's "lineart_standard (from white bg & black line)": darkness against a σ=6 blur, normalised by
    the median of the clearly dark pixels."""
    x = _rgb(image).astype(np.float32)
    intensity = np.min(gaussian_blur(x, 6.0) - x, axis=2).clip(0, 255)
    dark = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(dark)) if dark.size else 0.0)
    return _image(intensity * 127)


def scribble_xdog(image: Image.Image, level: float | None = None, _: float | None = None) -> Image.Image:
    """A1111's "scribble_xdog": a difference of Gaussians (σ 0.5 and 5) as 8 bits, white where twice its
    darkness, wrapped to 8 bits as the extension's uint8 arithmetic wraps it, exceeds `level` (32)."""
    x = _rgb(image).astype(np.float32)
    dog = (255 - np.min(gaussian_blur(x, 5.0) - gaussian_blur(x, 0.5), axis=2)).clip(0, 255).astype(np.uint8)
    darkness = (2 * (255 - dog.astype(np.int32))) % 256
    return _image((darkness > (32 if level is None else level)).astype(np.uint8) * 255)


def blur_gaussian(image: Image.Image, sigma: float | None = None, _: float | None = None) -> Image.Image:
    """A1111's "blur_gaussian" (for tile models): a Gaussian blur of σ `sigma` (default 9)."""
    return _image(gaussian_blur(_rgb(image).astype(np.float32), 9.0 if sigma is None else sigma).round())


def tile_resample(image: Image.Image, rate: float | None = None, _: float | None = None) -> Image.Image:
    """A1111's "tile_resample": the image shrunk by `rate` (default 1: unchanged) with area averaging."""
    rate = 1.0 if rate is None else rate
    if rate <= 1.0:
        return image.convert("RGB")
    size = (max(1, int(image.width / rate)), max(1, int(image.height / rate)))
    return image.convert("RGB").resize(size, Image.BOX)


def color_grid(image: Image.Image, _a: float | None = None, _b: float | None = None) -> Image.Image:
    """A1111's "t2ia_color_grid" at the image's size: shrunk to 1/64 by cubic resampling and blown back up
    by nearest, with OpenCV as the extension does it (`annotator/color`; the A1111 API first scales the
    shorter side to the unit's processor_res)."""
    import cv2  # the extension's resampling; OpenCV comes with the serve extra

    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    if h < 64 or w < 64:
        raise ValueError(f"color_grid needs an image of at least 64x64 px, got {w}x{h}")
    small = cv2.resize(rgb, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)
    return _image(cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST))


def map_image(image: Image.Image, _a: float | None = None, _b: float | None = None) -> Image.Image:
    """A map made elsewhere (depth, normal, segmentation, a finished edge map), used as it is (RGB)."""
    return image.convert("RGB")


PREPROCESSORS: dict[str, Preprocessor] = {
    "none": map_image,
    "canny": canny,
    "threshold": threshold,
    "invert": invert,
    "scribble_xdog": scribble_xdog,
    "lineart_standard": lineart_standard,
    "depth_map": map_image,
    "normal_map": map_image,
    "blur_gaussian": blur_gaussian,
    "tile_resample": tile_resample,
    "color_grid": color_grid,
}
NEEDS_WEIGHTS = {
    name: f"needs the {what} model weights, which sdlab does not ship or download"
    for names, what in (
        (
            (
                "openpose",
                "openpose_face",
                "openpose_faceonly",
                "openpose_full",
                "openpose_hand",
                "dw_openpose_full",
            ),
            "OpenPose",
        ),
        (("depth_midas", "depth_leres", "depth_leres++", "depth_zoe", "depth_anything"), "depth estimator"),
        (("normal_bae", "normal_midas"), "normal estimator"),
        (
            ("lineart_realistic", "lineart_coarse", "lineart_anime", "lineart_anime_denoise"),
            "line-art network",
        ),
        (
            (
                "softedge_hed",
                "softedge_hedsafe",
                "softedge_pidinet",
                "softedge_pidisafe",
                "scribble_hed",
                "scribble_pidinet",
            ),
            "HED/PiDiNet",
        ),
        (("mlsd",), "M-LSD"),
        (("inpaint_only+lama",), "LaMa inpainting"),
        (("t2ia_sketch_pidi", "pidinet_sketch"), "PiDiNet"),
        (("t2ia_style_clipvision", "clip_vision"), "CLIP vision (and T2I style adapter)"),
        (("seg_ofade20k", "seg_ofcoco", "seg_ufade20k"), "segmentation"),
    )
    for name in names
}


def preprocess(
    name: str,
    image: Image.Image,
    mask: Image.Image | None = None,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
) -> Image.Image:
    """The control image preprocessor `name` makes from `image`. `inpaint` returns RGBA with the repaint
    `mask` (white = repaint) in alpha, which `sdlab.control.hint_tensor` turns into −1 pixels."""
    if name == "inpaint":
        if mask is None:
            raise ValueError("the inpaint preprocessor needs a mask (white = repaint)")
        rgba = image.convert("RGB").resize(mask.size) if image.size != mask.size else image.convert("RGB")
        rgba.putalpha(mask.convert("L"))
        return rgba
    if name in NEEDS_WEIGHTS:
        raise ValueError(
            f"preprocessor {name!r} {NEEDS_WEIGHTS[name]}; pass a ready control image with 'none'"
        )
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {name!r}; sdlab has {', '.join(preprocessor_names())}")
    return PREPROCESSORS[name](image, threshold_a, threshold_b)


def preprocessor_names() -> list[str]:
    """Every preprocessor sdlab runs (A1111's `/controlnet/module_list` lists these)."""
    return [*PREPROCESSORS, "inpaint"]
