"""The `sdlab` command line: argparse in, one call into the library out."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from sdlab.checkpoints.io import CheckpointError


def cmd_tokenize(args: argparse.Namespace) -> int:
    from sdlab.text.tokenizer import CLIPTokenizer

    print(json.dumps(CLIPTokenizer.default().encode(args.text, max_length=None)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from sdlab.checkpoints.load import describe, read_checkpoint

    print(describe(read_checkpoint(args.model)))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sdlab.checkpoints.load import convert

    out = convert(args.input, args.output, dtype=args.dtype)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdlab", description="A Stable Diffusion engine written from scratch."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenize", help="print the CLIP token ids of TEXT (with BOS/EOS) as JSON")
    p.add_argument("text")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("info", help="describe a checkpoint: family, prediction type, parameters, dtype")
    p.add_argument("model", help="a .safetensors/.ckpt file or a diffusers folder")
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
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"sdlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
