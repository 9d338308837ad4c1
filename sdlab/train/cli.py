"""`sdlab train {vae,text,unet,lora,mini}`: argparse in, one recipe `train(config, out_dir, resume)` out.

Flags left out keep the recipe config's defaults. Under `torchrun --nproc_per_node=N -m sdlab.cli train
...` every command runs data-parallel with the same global batch. Recipes are imported when a command
runs, so registering the parser stays cheap.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdlab.config import unet_config
from sdlab.devices import DEVICE_CHOICES, DTYPES, dtype_flag, resolve_device, resolve_dtype
from sdlab.train.presets import MINI_ATTENTION, MINI_TEXT, MINI_UNET, MINI_VAE

LOOP_FLAGS = {  # flag dest -> LoopConfig field
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "lr_schedule": "lr_schedule",
    "warmup": "warmup_steps",
    "weight_decay": "weight_decay",
    "grad_clip": "grad_clip",
    "ema_decay": "ema_decay",
    "seed": "seed",
    "checkpoint_every": "checkpoint_every",
    "sample_every": "sample_every",
    "log_every": "log_every",
    "workers": "num_workers",
    "device": "device",
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low (a negative step count would train nothing, silently)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value"
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    """Output, resume, data and loop flags every recipe takes."""
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (checkpoints, log, samples, result)"
    )
    p.add_argument(
        "--no-resume", dest="resume", action="store_false", help="refuse to continue a previous run"
    )
    p.add_argument(
        "--data", default=None, help="image folder with same-name .txt captions (default: sdlab-mini)"
    )
    p.add_argument("--resolution", type=_at_least(1), default=None, help="training image side (default 64)")
    p.add_argument("--caption-extension", default=None, help="caption file suffix (default .txt)")
    p.add_argument("--steps", type=_at_least(1), default=None)
    p.add_argument(
        "--batch-size", type=_at_least(1), default=None, help="global batch, split over torchrun processes"
    )
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None)
    p.add_argument("--warmup", type=_at_least(0), default=None, help="linear LR warmup steps")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0 = off)")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA of the weights (0 = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint-every", type=_at_least(0), default=None)
    p.add_argument(
        "--sample-every", type=_at_least(0), default=None, help="sample grid every N steps (0 = never)"
    )
    p.add_argument("--log-every", type=_at_least(1), default=None)
    p.add_argument("--workers", type=_at_least(0), default=None, help="data loader processes")
    _device_flags(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help=f"{DEVICE_CHOICES} (default auto)")
    p.add_argument(
        "--dtype",
        "--precision",
        dest="dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="autocast precision, float32 master weights (default auto: fp32 on the CPU; on a GPU bf16, "
        "or fp16 with a gradient scaler where bf16 is missing)",
    )


def _precision(args: argparse.Namespace) -> str:
    """--dtype on the --device (checked here: one line if absent), `auto` resolved, so that a run's
    config.json records what it trained in."""
    return dtype_flag(resolve_dtype(args.dtype, resolve_device(args.device or "auto")))


def _loop(args: argparse.Namespace, base: Any) -> Any:
    """The recipe's LoopConfig with the given flags."""
    given = {
        field: getattr(args, dest) for dest, field in LOOP_FLAGS.items() if getattr(args, dest) is not None
    }
    return replace(base, progress=args.progress, precision=_precision(args), **given)


def _data(args: argparse.Namespace) -> Any:
    """The DataConfig the flags name (sdlab-mini unless --data)."""
    from sdlab.train.data import DataConfig

    given = {"folder": args.data, "resolution": args.resolution, "caption_extension": args.caption_extension}
    return _set(DataConfig(), **given)


def _set(base: Any, **fields: Any) -> Any:
    """`replace` with the fields that were given (not None)."""
    return replace(base, **{k: v for k, v in fields.items() if v is not None})


def cmd_vae(args: argparse.Namespace) -> int:
    from sdlab.train import vae as vae_recipe

    d = vae_recipe.VAETrainConfig()
    cfg = _set(
        d,
        vae=_set(
            MINI_VAE, ch=args.ch, ch_mult=args.ch_mult, z_channels=args.z_channels, embed_dim=args.z_channels
        ),
        data=_data(args),
        loop=_loop(args, d.loop),
        reconstruction=args.reconstruction,
        kl_weight=args.kl_weight,
        adversarial_weight=args.adversarial_weight,
        adversarial_start=args.adversarial_start,
        init=args.init,
        crop=args.crop,
    )
    return _done(vae_recipe.train(cfg, args.out, args.resume))


def cmd_text(args: argparse.Namespace) -> int:
    from sdlab.train import text as text_recipe

    d = text_recipe.TextTrainConfig()
    width = args.width or MINI_TEXT.width
    text = _set(MINI_TEXT, width=args.width, heads=width // 64 if args.width else None, layers=args.layers)
    text = replace(text, intermediate=4 * text.width)
    cfg = _set(
        d, text=text, data=_data(args), loop=_loop(args, d.loop), embed_dim=args.embed_dim, init=args.init
    )
    return _done(text_recipe.train(cfg, args.out, args.resume))


def cmd_unet(args: argparse.Namespace) -> int:
    from sdlab.checkpoints.detect import detect_text
    from sdlab.train import text as text_recipe
    from sdlab.train import unet as unet_recipe

    d = unet_recipe.UNetTrainConfig(vae=args.vae)
    if args.text:
        sd, layout = text_recipe.read_text_encoder(args.text)
        context = detect_text(sd, layout, args.text).width
    else:
        context = MINI_TEXT.width
    unet = unet_config(
        model_channels=args.model_channels or MINI_UNET.model_channels,
        channel_mult=args.channel_mult or MINI_UNET.channel_mult,
        num_res_blocks=args.num_res_blocks or MINI_UNET.num_res_blocks[0],
        depth_per_level=args.attention or MINI_ATTENTION,
        num_heads=8,
        context_dim=context,
    )
    cfg = _set(
        d,
        text=args.text,
        unet=unet,
        train_text_encoder=args.train_text_encoder or args.text is None,
        prediction=args.prediction,
        diffusion=_diffusion(args, d.diffusion),
        data=_data(args),
        loop=_loop(args, d.loop),
    )
    return _done(unet_recipe.train(cfg, args.out, args.resume))


def _diffusion(args: argparse.Namespace, base: Any) -> Any:
    """The recipe's DiffusionConfig with the given flags."""
    given = _set(base, caption_dropout=args.caption_dropout, min_snr_gamma=args.min_snr_gamma)
    return replace(given, cache_latents=args.cache_latents)


def cmd_lora(args: argparse.Namespace) -> int:
    from sdlab.train import lora as lora_recipe

    d = lora_recipe.LoRATrainConfig(model=args.model)
    cfg = _set(
        d,
        rank=args.rank,
        alpha=args.alpha,
        conv_rank=args.conv_rank,
        conv_alpha=args.conv_alpha,
        train_text_encoder=args.train_text_encoder,
        diffusion=_diffusion(args, d.diffusion),
        data=_data(args),
        loop=_loop(args, d.loop),
    )
    return _done(lora_recipe.train(cfg, args.out, args.resume))


def cmd_mini(args: argparse.Namespace) -> int:
    from sdlab.train import mini as mini_recipe
    from sdlab.train.loop import LoopConfig

    cfg = mini_recipe.MiniConfig()
    stage = {"device": args.device, "num_workers": args.workers, "batch_size": args.batch_size}
    stage["precision"] = _precision(args)

    def loop(base: LoopConfig, steps: int | None) -> LoopConfig:
        return _set(base, steps=steps, progress=args.progress, **stage)

    def optional(base: LoopConfig | None, steps: int | None, off: LoopConfig) -> LoopConfig | None:
        """An optional stage's loop: `--X-steps 0` drops the stage, `--X-steps N` runs a stage the
        defaults leave out (from the loop `off`)."""
        if steps == 0 or (base is None and steps is None):
            return None
        return loop(base or off, steps)

    cfg = replace(
        cfg,
        vae_loop=loop(cfg.vae_loop, args.vae_steps),
        unet_loop=loop(cfg.unet_loop, args.unet_steps),
        text_loop=optional(cfg.text_loop, args.text_steps, mini_recipe.TEXT_LOOP),
        decoder_loop=optional(cfg.decoder_loop, args.decoder_steps, mini_recipe.DECODER_LOOP),
    )
    if args.smoke:
        cfg = mini_recipe.smoke(cfg)
    return _done(mini_recipe.train_mini(cfg, args.out, args.resume))


def _done(path: Path) -> int:
    """Print the result (once under torchrun) and leave the process group."""
    from sdlab.train.loop import shutdown_ranks

    if int(os.environ.get("RANK", "0")) == 0:
        print(path)
    shutdown_ranks()
    return 0


def add_train_parser(subparsers: Any) -> None:
    """Register `train` and its recipes on the `sdlab` command's subparsers."""
    train = subparsers.add_parser(
        "train", help="train a VAE, text encoder, U-Net or LoRA, or the sdlab-mini model"
    )
    recipes = train.add_subparsers(dest="recipe", required=True)

    p = recipes.add_parser("vae", help="VAE: reconstruction + KL (+ optional patch GAN)")
    _common(p)
    p.add_argument("--ch", type=int, default=None, help=f"base channels (default {MINI_VAE.ch})")
    p.add_argument("--ch-mult", type=_ints, default=None, help="per-level multipliers, e.g. 1,2,2 (4x down)")
    p.add_argument("--z-channels", type=int, default=None)
    p.add_argument("--reconstruction", choices=["l1", "mse"], default=None)
    p.add_argument("--kl-weight", type=float, default=None)
    p.add_argument("--adversarial-weight", type=float, default=None, help="patch-GAN weight (0 = none)")
    p.add_argument("--adversarial-start", type=int, default=None, help="step the GAN term starts")
    p.add_argument("--init", default=None, help="start from this VAE or checkpoint")
    p.add_argument("--crop", type=int, default=None, help="train on random crops of this side (0 = whole)")
    p.set_defaults(func=cmd_vae)

    p = recipes.add_parser("text", help="text encoder: CLIP-style contrastive training")
    _common(p)
    p.add_argument("--width", type=int, default=None, help="multiple of 64 (64 channels per head)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--init", default=None, help="start from this text encoder or checkpoint")
    p.set_defaults(func=cmd_text)

    p = recipes.add_parser("unet", help="U-Net on VAE latents; writes a whole single-file model")
    _common(p)
    p.add_argument("--vae", required=True, help="VAE file (`sdlab train vae` output) or checkpoint")
    p.add_argument(
        "--text", default=None, help="text encoder file or checkpoint (default: new, trained jointly)"
    )
    p.add_argument("--train-text-encoder", action="store_true", help="train the given text encoder too")
    p.add_argument("--prediction", choices=["eps", "v"], default=None)
    p.add_argument("--model-channels", type=int, default=None)
    p.add_argument("--channel-mult", type=_ints, default=None)
    p.add_argument("--num-res-blocks", type=int, default=None)
    p.add_argument("--attention", type=_ints, default=None, help="transformer depth per level, e.g. 0,1,1")
    _diffusion_flags(p)
    p.set_defaults(func=cmd_unet)

    p = recipes.add_parser("lora", help="LoRA for a model's U-Net (and text encoder), kohya format")
    _common(p)
    p.add_argument("--model", required=True, help="base checkpoint (single file or diffusers folder)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None, help="update scale is alpha/rank")
    p.add_argument("--conv-rank", type=int, default=None, help="LoCon rank for 3x3 convs (0 = none)")
    p.add_argument("--conv-alpha", type=float, default=None)
    p.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder too")
    _diffusion_flags(p)
    p.set_defaults(func=cmd_lora)

    p = recipes.add_parser("mini", help="the sdlab-mini model: VAE -> (text) -> U-Net -> one checkpoint")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage (CI)")
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument(
        "--text-steps", type=int, default=None, help="contrastive text stage steps (0: none, joint training)"
    )
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument(
        "--decoder-steps", type=int, default=None, help="add a decoder fine-tuning stage of N steps"
    )
    p.add_argument("--batch-size", type=_at_least(1), default=None)
    p.add_argument("--workers", type=_at_least(0), default=None)
    _device_flags(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_mini)


def _diffusion_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--caption-dropout", type=float, default=None, help="empty-caption share for CFG")
    p.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR weighting (0 = off, 5 typical)")
    p.add_argument(
        "--no-cache-latents", dest="cache_latents", action="store_false", help="re-encode images every step"
    )
