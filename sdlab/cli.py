"""The `sdlab` command line: argparse in, one call into the library out."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from sdlab.checkpoints.io import CheckpointError
from sdlab.images import RESIZE_MODES
from sdlab.server import add_serve_parser
from sdlab.train.cli import add_train_parser
from sdlab.train.evaluate import add_eval_parser
from sdlab.vae_tools import add_vae_parser


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


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm import tqdm

    from sdlab.checkpoints.load import load_model, resolve_model
    from sdlab.images import next_output_path, save_png
    from sdlab.infotext import request_infotext
    from sdlab.pipeline import GenerationRequest, generate

    model = load_model(resolve_model(args.model), vae=args.vae)
    refiner = load_model(resolve_model(args.refiner)) if args.refiner else None
    size = model.native_size
    init = Image.open(args.init_image) if args.init_image else None
    mask = Image.open(args.mask) if args.mask else None
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
        loras=tuple(_lora_arg(a) for a in args.lora),
        lora_dirs=tuple(args.lora_dir),
        embedding_dirs=tuple(args.embeddings_dir),
        refiner=refiner.name if refiner else None,
        refiner_switch_at=args.refiner_switch,
        refiner_switch_by_steps=args.refiner_switch_by_steps,
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


def _lora_arg(value: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` of --lora."""
    path, _, weight = value.rpartition(":")
    try:
        return (path, float(weight)) if path else (value, 1.0)
    except ValueError:
        return value, 1.0


def cmd_png_info(args: argparse.Namespace) -> int:
    from sdlab.images import read_parameters

    text = read_parameters(args.image)
    if text is None:
        print(f"{args.image}: no generation parameters", file=sys.stderr)
        return 1
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdlab", description="A Stable Diffusion engine written from scratch."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "generate", help="make images from a prompt (txt2img, img2img with -i, inpainting with --mask)"
    )
    p.add_argument("prompt")
    p.add_argument("-m", "--model", help="checkpoint file, diffusers folder or installed model name")
    p.add_argument("--vae", help="a standalone VAE file to use instead of the model's")
    p.add_argument("-n", "--negative", default="", help="negative prompt")
    p.add_argument("-W", "--width", type=int, help="image width, a multiple of 8 (default: the model's size)")
    p.add_argument(
        "-H", "--height", type=int, help="image height, a multiple of 8 (default: the model's size)"
    )
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, 20 for SD)")
    p.add_argument(
        "--cfg", type=float, help="classifier-free guidance scale (default: the model's, 7 for SD)"
    )
    p.add_argument("--sampler", default="euler_ancestral", help="sampler, ComfyUI or A1111 name")
    p.add_argument("--scheduler", default="normal", help="sigma schedule: normal, karras, exponential, ...")
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
    p.add_argument("--mask", help="inpainting mask (white = repaint)")
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
    p.add_argument("-o", "--output", help="output PNG (default: outputs/NNNNN-SEED.png)")
    p.add_argument("--outdir", default="outputs", help="folder for outputs when -o is not given")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    add_serve_parser(sub)
    add_vae_parser(sub)
    add_eval_parser(sub)
    add_train_parser(sub)

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
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, OSError) as e:
        print(f"sdlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
