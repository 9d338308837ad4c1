"""Upscaler models (ESRGAN/RRDBNet, Real-ESRGAN compact, SwinIR; others through spandrel) and A1111's
named upscalers, tiled so that large images fit in memory."""

from sdlab.upscale.base import Upscaler
from sdlab.upscale.load import load_upscaler
from sdlab.upscale.named import (
    BUILTIN_UPSCALERS,
    UnknownUpscaler,
    rescale,
    upscale_image,
    upscale_pixels,
    upscaler_files,
    upscaler_names,
    upscaler_path,
)
from sdlab.upscale.tiling import run_upscaler

__all__ = [
    "BUILTIN_UPSCALERS",
    "UnknownUpscaler",
    "Upscaler",
    "load_upscaler",
    "rescale",
    "run_upscaler",
    "upscale_image",
    "upscale_pixels",
    "upscaler_files",
    "upscaler_names",
    "upscaler_path",
]
