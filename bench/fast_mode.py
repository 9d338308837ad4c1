"""Fast mode's measured cost: each technique's speed-up over sdlab's exact run, and the PSNR/SSIM of its
images against the exact ones, on the same prompts and seeds.

    python bench/fast_mode.py                      # the shipped sdlab-mini model, held-out prompts
    python bench/fast_mode.py --arch sd15 --size 256 --prompts 2 --steps 10   # SD1.5 shapes, random weights

Exact and fast runs alternate (A B C ... A B C ..., `--repeats` times per prompt) and the fastest run of
each counts, so a machine shared with other work disturbs each alike; the speed-up is the ratio of the
summed sampling times (VAE decode and text encoding excluded: fast mode changes only the U-Net).
Results are recorded in bench/FAST_MODE.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from sdlab.checkpoints.load import default_model_path, load_model  # noqa: E402
from sdlab.fast import FAST_PRESET, FastMode  # noqa: E402
from sdlab.pipeline import GenerationRequest, generate  # noqa: E402
from sdlab.train.evaluate import eval_seeds, heldout_scenes, psnr  # noqa: E402
from sdlab.train.mini_data import caption  # noqa: E402

VARIANTS = {
    "deepcache 2/1": FastMode(cache_interval=2, cache_branch=1),
    "deepcache 2/0": FastMode(cache_interval=2, cache_branch=0),
    "deepcache 2/0, tome 0.5 (--fast)": FAST_PRESET,
    "deepcache 3/1": FastMode(cache_interval=3, cache_branch=1),
    "deepcache 3/0": FastMode(cache_interval=3, cache_branch=0),
    "deepcache 5/1": FastMode(cache_interval=5, cache_branch=1),
    "tome 0.5": FastMode(tome_ratio=0.5),
    "deepcache 3/1, tome 0.5": FastMode(cache_interval=3, cache_branch=1, tome_ratio=0.5),
}


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Mean SSIM (Wang et al. 2004) of the 8-bit luma, 11-tap Gaussian window σ 1.5, K1 0.01, K2 0.03."""
    x, y = (torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float64))[None, None] for im in (a, b))
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def sd15_model():  # noqa: ANN201 - a StableDiffusion with random weights
    """SD1.5 shapes with seeded random weights (the file bench/compare.py writes)."""
    from compare import prepare

    return load_model(prepare()[0])


def requests(args: argparse.Namespace, size: int, steps: int, cfg: float) -> list[GenerationRequest]:
    """One request per held-out sdlab-mini prompt, with the evaluation seeds."""
    scenes, seeds = heldout_scenes(args.prompts), eval_seeds(args.prompts)
    return [
        GenerationRequest(
            prompt=caption(s), width=size, height=size, steps=steps, cfg_scale=cfg, seed=seed,
            sampler=args.sampler, scheduler=args.scheduler,
        )
        for s, seed in zip(scenes, seeds, strict=True)
    ]  # fmt: skip


def timed(model, req: GenerationRequest) -> tuple[Image.Image, float]:  # noqa: ANN001
    """The image and the seconds from the first to the last sampling step (plus one step's share)."""
    stamps: list[float] = []
    image = generate(model, req, callback=lambda *_: stamps.append(time.perf_counter())).images[0]
    per_step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    return image, stamps[-1] - stamps[0] + per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("mini", "sd15"), default="mini")
    p.add_argument("--size", type=int, help="image side (default: 64 mini, 256 sd15)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--sampler", default="euler")  # deterministic: the images differ only by fast mode
    p.add_argument("--scheduler", default="karras")
    p.add_argument("--only", action="append", help="variant names to run (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="runs per prompt and variant; the fastest counts")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    mini = args.arch == "mini"
    size = args.size or (64 if mini else 256)
    model = load_model(default_model_path()) if mini else sd15_model()
    reqs = requests(args, size, args.steps, model.default_cfg if mini else 7.0)
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    times: dict[str, float] = {"exact": 0.0, **dict.fromkeys(variants, 0.0)}
    images: dict[str, list[Image.Image]] = {k: [] for k in times}
    generate(model, replace(reqs[0], steps=2))  # warm-up
    for req in reqs:
        best, drawn = dict.fromkeys(times, math.inf), {}
        for _ in range(args.repeats):  # the fastest of the repeats: the least disturbed by other work
            for name, fast in {"exact": None, **variants}.items():
                drawn[name], seconds = timed(model, replace(req, fast=fast))  # the same image each time
                best[name] = min(best[name], seconds)
        for name in times:
            times[name] += best[name]
            images[name].append(drawn[name])
        print(f"{len(images['exact'])}/{len(reqs)} prompts", file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
    exact = times["exact"] / len(reqs)
    print(f"# {args.arch} {size}x{size}, {args.steps} steps {args.sampler}/{args.scheduler}, "
          f"{len(reqs)} held-out sdlab-mini prompts and seeds, exact {exact:.3f} s/image")  # fmt: skip
    print("| variant | speed-up | PSNR (dB) | SSIM min / mean |")
    print("|---|---|---|---|")
    for name in variants:
        scores = [ssim(a, b) for a, b in zip(images["exact"], images[name], strict=True)]
        db = psnr(images["exact"], images[name])
        print(f"| {name} | {times['exact'] / times[name]:.2f}x | {db:.1f} | "
              f"{min(scores):.3f} / {sum(scores) / len(scores):.3f} |")  # fmt: skip
    assert all(math.isfinite(t) for t in times.values())


if __name__ == "__main__":
    main()
