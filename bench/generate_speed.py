"""Seconds per sampling step and peak memory: sdlab against diffusers on the same SD1.5-shaped weights.

    python bench/generate_speed.py [--size 512] [--steps 4] [--threads N]

Writes a random-weight SD1.5 checkpoint (fp32) and its local diffusers config once under
`bench/.cache/`, then runs each engine in its own process (so peak RSS is its own) with the same
prompt, seed noise, Euler/Karras schedule and CFG 7, and prints the per-step time, the load time
and the peak resident memory of each, and the ratios sdlab / diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).parent / ".cache"


def prepare() -> tuple[Path, Path]:
    """The checkpoint and diffusers config folder (random weights, seeded; written once)."""
    path, config = CACHE / "sd15-random.safetensors", CACHE / "sd15-config"
    if path.exists() and config.exists():
        return path, config
    import torch

    from sdlab.checkpoints import keymaps
    from sdlab.checkpoints.io import write_json
    from sdlab.checkpoints.load import Checkpoint, save_single_file
    from sdlab.config import SD1
    from sdlab.models.clip import CLIPTextModel
    from sdlab.models.unet import UNetModel
    from sdlab.models.vae import AutoencoderKL
    from sdlab.text.tokenizer import CLIPTokenizer

    torch.manual_seed(0)
    parts = [UNetModel(SD1.unet), AutoencoderKL(SD1.vae), CLIPTextModel(SD1.text[0])]
    sds = [m.state_dict() for m in parts]
    save_single_file(Checkpoint(path, sds[0], sds[1], [sds[2]], ["openai"]), path)
    for rel, content in keymaps.diffusers_configs(SD1).items():
        write_json(content, config / rel)
    CLIPTokenizer.default().save_folder(config / "tokenizer")
    return path, config


def run_sdlab(path: Path, size: int, steps: int) -> dict:
    from sdlab.checkpoints.load import load_model
    from sdlab.pipeline import GenerationRequest, generate

    t0 = time.perf_counter()
    model = load_model(path)
    load = time.perf_counter() - t0
    stamps: list[float] = []
    req = GenerationRequest(
        prompt="a red apple on a table",
        width=size,
        height=size,
        steps=steps,
        cfg_scale=7.0,
        sampler="euler",
        scheduler="karras",
        seed=1,
    )
    start = time.perf_counter()
    generate(model, req, callback=lambda i, n, _: stamps.append(time.perf_counter()))
    return {"load_s": load, "step_s": _per_step(start, stamps), "total_s": time.perf_counter() - start}


def run_diffusers(path: Path, config: Path, size: int, steps: int) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    os.environ["HF_HUB_OFFLINE"] = "1"
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(config),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    stamps: list[float] = []
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    with torch.no_grad():
        pipe(
            "a red apple on a table",
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=7.0,
            latents=latents,
            callback_on_step_end=lambda p, i, t, kw: stamps.append(time.perf_counter()) or kw,
        )
    return {"load_s": load, "step_s": _per_step(start, stamps), "total_s": time.perf_counter() - start}


def _per_step(start: float, stamps: list[float]) -> float:
    """Median step time, the first step (warm-up) excluded when there are several."""
    times = sorted(b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True))
    times = times[1:] if len(times) > 2 else times
    return times[len(times) // 2]


def child(engine: str, size: int, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    path, config = prepare()
    result = run_sdlab(path, size, steps) if engine == "sdlab" else run_diffusers(path, config, size, steps)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", choices=["sdlab", "diffusers"])
    args = ap.parse_args()
    if args.child:
        child(args.child, args.size, args.steps, args.threads)
        return
    prepare()
    results = {}
    for engine in ("sdlab", "diffusers"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            engine,
            "--size",
            str(args.size),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[engine] = json.loads(out)
    print(f"SD1.5 shapes, {args.size}px, {args.steps} steps Euler+Karras CFG 7, {args.threads} thread(s)")
    for key, label in [("step_s", "s/step"), ("load_s", "load s"), ("peak_rss_gib", "peak RSS GiB")]:
        a, b = results["sdlab"][key], results["diffusers"][key]
        print(f"{label:>13}: sdlab {a:8.3f}   diffusers {b:8.3f}   ratio {a / b:5.2f}")


if __name__ == "__main__":
    main()
