"""The `sdlab` command line: argparse in, one call into the library out."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from sdlab.checkpoints.io import CheckpointError
from sdlab.control import CONTROL_MODES, ControlSpec
from sdlab.devices import add_device_arguments
from sdlab.diffusion.samplers import SAMPLERS
from sdlab.diffusion.schedule import SCHEDULES
from sdlab.fast import FAST_PRESET, FastMode
from sdlab.finite import NonFiniteError
from sdlab.hires import HiresFix
from sdlab.images import RESIZE_MODES, ImageLimits, add_image_limit_arguments, open_image
from sdlab.ip_adapter import IPAdapterSpec
from sdlab.server import add_serve_parser
from sdlab.train.cli import add_train_parser
from sdlab.train.evaluate import add_eval_parser
from sdlab.vae_tools import add_vae_parser

MASKED_CONTENT_FLAGS = ("fill", "original", "noise", "nothing")  # A1111's inpainting_fill 0..3


def cmd_tokenize(args: argparse.Namespace) -> int:
    from sdlab.text.tokenizer import CLIPTokenizer

    print(json.dumps(CLIPTokenizer.default().encode(args.text, max_length=None)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from sdlab.checkpoints.load import describe, read_checkpoint, resolve_model

    print(describe(read_checkpoint(resolve_model(args.model))))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sdlab.checkpoints.load import convert

    out = convert(args.input, args.output, dtype=args.dtype)
    print(out)
    return 0


def _check_folders(args: argparse.Namespace, *dests: str) -> None:
    """A folder the user names (--lora-dir, --embeddings-dir, --upscaler-dir) must exist: one line naming
    it, not a silently empty listing (the defaults may be absent)."""
    for dest in dests:
        for folder in getattr(args, dest):
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"--{dest.replace('_', '-')} {folder}: no such folder")


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdlab.checkpoints.load import resolve_model
    from sdlab.devices import Placement
    from sdlab.images import ImageLimits, next_output_path, open_image, save_png
    from sdlab.infotext import request_infotext
    from sdlab.pipeline import GenerationRequest, generate

    _check_folders(args, "lora_dir", "embeddings_dir", "upscaler_dir")
    limits = ImageLimits(args.max_image_pixels, args.max_image_bytes)
    init = open_image(args.init_image, args.init_image, limits) if args.init_image else None
    mask = open_image(args.mask, args.mask, limits, mode="L") if args.mask else None
    placement = Placement.from_args(args)
    model = placement.load(resolve_model(args.model), vae=args.vae)
    refiner = placement.load(resolve_model(args.refiner)) if args.refiner else None
    size = model.native_size
    req = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        width=args.width or (init.width // 8 * 8 if init else size),
        height=args.height or (init.height // 8 * 8 if init else size),
        steps=args.steps if args.steps is not None else model.default_steps,
        cfg_scale=args.cfg if args.cfg is not None else model.default_cfg,
        sampler=args.sampler,
        scheduler=args.scheduler,
        seed=args.seed,
        batch_size=args.batch,
        clip_skip=args.clip_skip,
        init_image=init,
        strength=args.strength,
        resize_mode=args.resize_mode,
        mask=mask,
        inpaint_full_res=args.inpaint_area == "masked",
        inpaint_full_res_padding=args.inpaint_padding,
        inpainting_fill=MASKED_CONTENT_FLAGS.index(args.masked_content),
        loras=tuple(_lora_arg(a) for a in args.lora),
        lora_dirs=tuple(args.lora_dir),
        embedding_dirs=tuple(args.embeddings_dir),
        refiner=refiner.name if refiner else None,
        refiner_switch_at=args.refiner_switch,
        refiner_switch_by_steps=args.refiner_switch_by_steps,
        hires=_hires_arg(args),
        controls=_control_args(args, limits),
        ip_adapters=_ip_adapter_args(args, limits),
        fast=_fast_arg(args),
    )
    with tqdm(total=None, desc="sampling", unit="step", disable=args.quiet, leave=False) as bar:

        def progress(step: int, total: int, _latent: object) -> None:
            bar.total = total
            bar.update(step - bar.n)

        result = generate(model, req, callback=progress, refiner=refiner)
    for image, seed in zip(result.images, result.seeds, strict=True):
        target = args.output or next_output_path(args.outdir, seed)
        print(save_png(image, target, request_infotext(result.request, seed, model, refiner)))
    return 0


HIRES_OPTIONS = "scale resize steps denoise upscaler prompt negative sampler scheduler".split()


def _hires_arg(args: argparse.Namespace) -> HiresFix | None:
    """The hires fix the --hires-* options ask for; None when none is given."""
    given = {name: getattr(args, f"hires_{name}") for name in HIRES_OPTIONS}
    given = {name: value for name, value in given.items() if value is not None}
    if not given:
        return None
    if "negative" in given:
        given["negative_prompt"] = given.pop("negative")
    return HiresFix(**given, upscaler_dirs=tuple(args.upscaler_dir))


def _size_arg(value: str) -> tuple[int, int]:
    """`WxH` of --hires-resize (0 for a side: from the aspect ratio)."""
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {value!r}")
    return int(width), int(height)


def add_hires_arguments(parser: argparse.ArgumentParser) -> None:
    """A1111's hires fix options of `generate`; giving any of them turns it on."""
    g = parser.add_argument_group("hires fix", "upscale the first pass, then redraw it (any option: on)")
    g.add_argument("--hires-scale", type=float, help="upscale factor (default 2)")
    g.add_argument("--hires-resize", type=_size_arg, metavar="WxH", help="final size instead of a factor")
    g.add_argument("--hires-steps", type=int, help="second-pass steps (default: the first pass's)")
    g.add_argument("--hires-denoise", type=float, help="second-pass denoising strength (default 0.7)")
    g.add_argument("--hires-upscaler", help="Latent (default), Latent (bicubic), ..., Lanczos, or a model")
    g.add_argument("--hires-prompt", help="second-pass prompt (default: the prompt)")
    g.add_argument("--hires-negative", help="second-pass negative prompt (default: the negative prompt)")
    g.add_argument("--hires-sampler", help="second-pass sampler (default: the first pass's)")
    g.add_argument("--hires-scheduler", help="second-pass schedule (default: the first pass's)")
    g.add_argument(
        "--upscaler-dir", action="append", default=[], help="folder of upscaler models (repeatable)"
    )


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    """ControlNet options of `generate` (sdlab.control)."""
    g = parser.add_argument_group("ControlNet", "units applied together, their residuals summed")
    g.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="MODEL:IMAGE[:WEIGHT]",
        help="a ControlNet file, diffusers folder or name in models/ControlNet, its control image and "
        "weight (default 1); repeatable",
    )
    g.add_argument(
        "--control-preprocessor",
        default="none",
        help="made from each control image first: none, canny, threshold, invert, lineart_standard, ...",
    )
    g.add_argument("--control-start", type=float, default=0.0, help="share of the steps where control starts")
    g.add_argument("--control-end", type=float, default=1.0, help="share of the steps where control ends")
    g.add_argument(
        "--control-mode",
        choices=CONTROL_MODES,
        default="balanced",
        help="balanced, prompt (my prompt is more important) or control (ControlNet is more important)",
    )
    g.add_argument(
        "--control-resize", choices=RESIZE_MODES, default="resize", help="how control images are fitted"
    )


def add_fast_arguments(parser: argparse.ArgumentParser) -> None:
    """Fast-mode options of `generate` (sdlab.fast): approximations, recorded in the infotext."""
    g = parser.add_argument_group("fast mode", "faster, not exact (measured in bench/FAST_MODE.md)")
    g.add_argument("--fast", action="store_true", help=f"the preset: {FAST_PRESET.label} (interval/branch)")
    g.add_argument("--cache-interval", type=int, help="DeepCache: the whole U-Net every N steps (1: off)")
    g.add_argument("--cache-branch", type=int, help="DeepCache: the skip level still computed (default 1)")
    g.add_argument("--tome-ratio", type=float, help="ToMe: share of tokens merged in self-attention (0: off)")


def _fast_arg(args: argparse.Namespace) -> FastMode | None:
    """The fast mode --fast and the fine options ask for (these override the preset); None: exact."""
    fields = {"cache_interval": args.cache_interval, "cache_branch": args.cache_branch}
    fields["tome_ratio"] = args.tome_ratio
    given = {k: v for k, v in fields.items() if v is not None}
    if not args.fast and not given:
        return None
    return replace(FAST_PRESET if args.fast else FastMode(), **given)


def _control_args(args: argparse.Namespace, limits: ImageLimits) -> tuple[ControlSpec, ...]:
    """`--control MODEL:IMAGE[:WEIGHT]` units with the shared --control-* settings."""
    units = []
    for value in args.control:
        model, _, rest = value.partition(":")
        image, weight = _lora_arg(rest)
        if not model or not image:
            raise ValueError(f"--control {value!r}: expected MODEL:IMAGE[:WEIGHT]")
        units.append(
            ControlSpec(
                model,
                open_image(image, image, limits),
                weight,
                args.control_start,
                args.control_end,
                args.control_mode,
                args.control_resize,
                args.control_preprocessor,
            )
        )
    return tuple(units)


def add_ip_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """IP-Adapter options of `generate` (sdlab.ip_adapter)."""
    g = parser.add_argument_group("IP-Adapter", "image prompts, each adapter's tokens read beside the text")
    g.add_argument(
        "--ip-adapter",
        action="append",
        default=[],
        metavar="MODEL:IMAGE[:WEIGHT]",
        help="an IP-Adapter file or name in models/ipadapter (or models/ControlNet), its image and weight "
        "(default 1); repeatable",
    )
    g.add_argument(
        "--clip-vision",
        metavar="MODEL",
        help="the CLIP image encoder: a file, diffusers image_encoder folder or name in models/clip_vision "
        "(default: the only one there or next to the adapter)",
    )


def _ip_adapter_args(args: argparse.Namespace, limits: ImageLimits) -> tuple[IPAdapterSpec, ...]:
    """`--ip-adapter MODEL:IMAGE[:WEIGHT]` image prompts with the shared --clip-vision."""
    if args.clip_vision and not args.ip_adapter:
        raise ValueError("--clip-vision: give it with --ip-adapter")
    specs = []
    for value in args.ip_adapter:
        model, _, rest = value.partition(":")
        image, weight = _lora_arg(rest)
        if not model or not image:
            raise ValueError(f"--ip-adapter {value!r}: expected MODEL:IMAGE[:WEIGHT]")
        specs.append(IPAdapterSpec(model, open_image(image, image, limits), weight, args.clip_vision))
    return tuple(specs)


def _lora_arg(value: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` of --lora."""
    path, _, weight = value.rpartition(":")
    try:
        return (path, float(weight)) if path else (value, 1.0)
    except ValueError:
        return value, 1.0


def cmd_upscale(args: argparse.Namespace) -> int:
    from PIL import Image

    from sdlab.images import save_png
    from sdlab.upscale import load_upscaler, rescale, upscale_pixels, upscaler_path
    from sdlab.upscale.named import UnknownUpscaler

    _check_folders(args, "upscaler_dir")
    image = open_image(args.image, args.image, ImageLimits(args.max_image_pixels, args.max_image_bytes))
    try:
        given_file = Path(args.model).is_file()
        path = Path(args.model) if given_file else upscaler_path(args.model, args.upscaler_dir)
    except UnknownUpscaler as e:
        raise FileNotFoundError(f"-m/--model: {e}") from e
    model = load_upscaler(path)

    def step(im: Image.Image) -> Image.Image:  # RGB in, rounded out (ComfyUI's way, not A1111's BGR)
        return upscale_pixels(model, im, convention="comfy", tile=args.tile, overlap=args.overlap)

    out = step(image) if args.scale is None else rescale(image, args.scale, step)
    print(save_png(out, args.output or Path(args.outdir) / f"{Path(args.image).stem}-{path.stem}.png"))
    return 0


def cmd_png_info(args: argparse.Namespace) -> int:
    from sdlab.images import read_parameters

    text = read_parameters(args.image)
    if text is None:
        print(f"{args.image}: no generation parameters", file=sys.stderr)
        return 1
    print(text)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `sdlab CMD: error: ...` (exit 2), like every other error;
    its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sdlab", description="A Stable Diffusion engine written from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "generate", help="make images from a prompt (txt2img, img2img with -i, inpainting with --mask)"
    )
    p.add_argument("prompt")
    p.add_argument("-m", "--model", help="checkpoint file, diffusers folder or installed model name")
    p.add_argument("--vae", help="a standalone VAE file to use instead of the model's")
    add_device_arguments(p)
    p.add_argument("-n", "--negative", default="", help="negative prompt")
    p.add_argument("-W", "--width", type=int, help="image width, a multiple of 8 (default: the model's size)")
    p.add_argument(
        "-H", "--height", type=int, help="image height, a multiple of 8 (default: the model's size)"
    )
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, 20 for SD)")
    p.add_argument(
        "--cfg", type=float, help="classifier-free guidance scale (default: the model's, 7 for SD)"
    )
    p.add_argument(
        "--sampler", default="euler_ancestral", help=f"sampler, ComfyUI or A1111 name: {', '.join(SAMPLERS)}"
    )
    p.add_argument("--scheduler", default="normal", help=f"sigma schedule: {', '.join(SCHEDULES)}")
    p.add_argument("-s", "--seed", type=int, default=-1, help="seed (-1: random)")
    p.add_argument("--batch", type=int, default=1, help="images per run (seeds s, s+1, ...)")
    p.add_argument("--clip-skip", type=int, default=1, help="CLIP layers to skip from the model's default")
    p.add_argument("-i", "--init-image", help="start from this image (img2img)")
    p.add_argument("--strength", type=float, default=0.75, help="img2img denoising strength")
    p.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="resize",
        help="fit the init image: stretch, crop or fill",
    )
    p.add_argument("--mask", help="inpainting mask (white = repaint; with transparency: its alpha)")
    p.add_argument(
        "--inpaint-area",
        choices=("whole", "masked"),
        default="whole",
        help="repaint in the whole picture, or only in a crop around the mask at the full size",
    )
    p.add_argument(
        "--inpaint-padding", type=int, default=32, metavar="N", help="pixels around the mask in that crop"
    )
    p.add_argument(
        "--masked-content",
        choices=MASKED_CONTENT_FLAGS,
        default="original",
        help="start the masked part from: a fill from its surroundings, the original, latent noise or zeros",
    )
    add_image_limit_arguments(p)
    p.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:W]", help="merge a LoRA file (repeatable)"
    )
    p.add_argument(
        "--lora-dir",
        action="append",
        default=[],
        help="folder for <lora:NAME:W> prompt tags (repeatable; then $SDLAB_MODELS_DIR/Lora, models/Lora)",
    )
    p.add_argument(
        "--embeddings-dir",
        action="append",
        default=[],
        help="folder of textual-inversion embeddings named in prompts by file stem (repeatable; then "
        "$SDLAB_MODELS_DIR/embeddings, ./embeddings)",
    )
    p.add_argument("--refiner", help="a second model (SDXL refiner) that finishes the sampling")
    p.add_argument(
        "--refiner-switch",
        type=float,
        default=0.8,
        help="share of the run after which the refiner takes over",
    )
    p.add_argument(
        "--refiner-switch-by-steps",
        action="store_true",
        help="switch by step count (A1111 < 1.8) instead of by timestep",
    )
    add_hires_arguments(p)
    add_control_arguments(p)
    add_ip_adapter_arguments(p)
    add_fast_arguments(p)
    p.add_argument("-o", "--output", help="output PNG (default: outputs/NNNNN-SEED.png)")
    p.add_argument("--outdir", default="outputs", help="folder for outputs when -o is not given")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    add_serve_parser(sub)
    add_vae_parser(sub)
    add_eval_parser(sub)
    add_train_parser(sub)

    p = sub.add_parser("upscale", help="upscale an image with an upscaler model (ESRGAN, SwinIR, ...)")
    p.add_argument("image")
    p.add_argument("-m", "--model", required=True, help="upscaler model file, or its name in --upscaler-dir")
    p.add_argument(
        "--scale",
        type=float,
        help="final factor (A1111's: repeated model passes, then Lanczos to a multiple of 8; "
        "default: one pass at the model's own factor)",
    )
    p.add_argument("--upscaler-dir", action="append", default=[], help="folder of upscaler models")
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels (memory bound)")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels")
    add_image_limit_arguments(p)
    p.add_argument("-o", "--output", help="output PNG (default: OUTDIR/IMAGE-MODEL.png)")
    p.add_argument("--outdir", default="outputs", help="folder for outputs when -o is not given")
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("png-info", help="print the generation parameters stored in a PNG")
    p.add_argument("image")
    p.set_defaults(func=cmd_png_info)

    p = sub.add_parser("tokenize", help="print the CLIP token ids of TEXT (with BOS/EOS) as JSON")
    p.add_argument("text")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("info", help="describe a checkpoint: family, prediction type, parameters, dtype")
    p.add_argument(
        "model", nargs="?", help="a checkpoint file, a diffusers folder or a model name (default: sdlab-mini)"
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert between a single-file checkpoint and a diffusers folder")
    p.add_argument("input", help="a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("output", help="OUT.safetensors for a single file, any other path for a diffusers folder")
    p.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="storage dtype (default: keep)"
    )
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, OSError, NonFiniteError) as e:
        print(f"sdlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
