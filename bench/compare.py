"""sdlab against diffusers on seeded random weights at SD1.5 or SDXL shapes, each in its own process.

    python bench/compare.py [--arch sd1|sdxl] [--repeats 2] [--threads N] [--device cpu|cuda]
                            [--dtype fp32|fp16]

Writes the fp16 checkpoint once under `bench/.cache/<arch>/` (SD1.5: `tests/reference.py`'s, with its local
diffusers config; SDXL: `bench/sdxl_real_size.py`'s, 6.9 GB, with the diffusers folder `sdlab convert` makes
of it, which diffusers loads), then runs the engines alternately (A B A B ...), each in a fresh process so
that load time and peak RSS are its own, and prints the medians and the ratios sdlab / diffusers of: load to
the first sampling step (from the load call to the U-Net's first call: reading the file, building the
networks, encoding the prompt), one guided (CFG 7) step at 256 and at 512 px (the median of the steps after
the first of a 20-step run at 256 px and a 4-step run at 512 px), a 20-step txt2img at 256 px (Euler, Karras
sigmas), the same with sdlab's `--fast` preset (set against diffusers' exact run), a VAE decode at 512 px and
the peak RSS (peak VRAM on CUDA); then the PSNR between the two engines' 20-step images, and between sdlab's
fast and exact images. sdlab runs as `sdlab generate` would (`--dtype auto`: fp32 maths on the CPU with the
file's fp16 weights kept fp16), diffusers with `torch_dtype` = the compute dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
PROMPT, NEGATIVE, SEED, CFG = "a red apple on a wooden table, photograph", "blurry", 1, 7.0
METRICS = [
    ("load_to_first_step_s", "load to first step s"),
    ("step_256_s", "guided step 256 px s"),
    ("step_512_s", "guided step 512 px s"),
    ("txt2img_256_s", "20-step txt2img 256 s"),
    ("vae_decode_512_s", "VAE decode 512 px s"),
    ("peak_mem_gib", "peak RSS/VRAM GiB"),
    ("fast_txt2img_256_s", "20-step txt2img 256, sdlab --fast s"),
]


ARCHS = {"sd1": "SD1.5", "sdxl": "SDXL"}


def prepare(arch: str) -> tuple[Path, Path]:
    """The real-size checkpoint (fp16, seeded random weights) and what diffusers reads, written once: for
    SD1.5 a config folder beside the single file, for SDXL the diffusers folder converted from it."""
    path = CACHE / arch / "model.safetensors"
    config = path.parent / ("config" if arch == "sd1" else "diffusers")
    if arch == "sd1" and not (path.exists() and config.exists()):
        sys.path.insert(0, str(HERE.parent / "tests"))
        from reference import write_real_size_files

        path.parent.mkdir(parents=True, exist_ok=True)
        write_real_size_files("sd1", path.parent)
    if arch == "sdxl" and not path.exists():
        sys.path.insert(0, str(HERE))
        from sdxl_real_size import write_checkpoint

        path.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(path, tiny=False)
    if arch == "sdxl" and not (config / "model_index.json").exists():
        from sdlab.checkpoints.load import convert

        convert(path, config)
    return path, config


def _median_step(start: float, stamps: list[float]) -> float:
    """Median step time, the first (warm-up) step left out when there are more than two."""
    times = sorted(b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True))
    times = times[1:] if len(times) > 2 else times
    return times[len(times) // 2]


def _first_call(unet: object) -> list[float]:
    """A list that gets the time of the network's first call: loading and prompt encoding are done then."""
    stamps: list[float] = []
    unet.register_forward_pre_hook(lambda *_: None if stamps else stamps.append(time.perf_counter()))
    return stamps


def run_sdlab(path: Path, device: str, dtype: str, out: Path) -> dict:
    import torch

    from sdlab.devices import Placement
    from sdlab.fast import FAST_PRESET
    from sdlab.pipeline import GenerationRequest, generate
    from sdlab.vae_tools import decode_pixels

    t0 = time.perf_counter()
    model = Placement(device, dtype).load(path)
    first: list[float] = []
    req = GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=512, height=512, steps=4, cfg_scale=CFG,
        sampler="euler", scheduler="karras", seed=SEED,
    )  # fmt: skip
    started = _first_call(model.unet)
    generate(model, req, callback=lambda i, n, _: first.append(time.perf_counter()))
    load_to_first = started[0] - t0
    step_512 = _median_step(started[0], first)
    stamps: list[float] = []
    start = time.perf_counter()
    req = GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=256, height=256, steps=20, cfg_scale=CFG,
        sampler="euler", scheduler="karras", seed=SEED,
    )  # fmt: skip
    result = generate(model, req, callback=lambda i, n, _: stamps.append(time.perf_counter()))
    total = time.perf_counter() - start
    result.images[0].save(out)
    t_fast = time.perf_counter()
    generate(model, replace(req, fast=FAST_PRESET)).images[0].save(out.with_suffix(".fast.png"))
    fast_total = time.perf_counter() - t_fast
    latents = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(SEED))
    t1 = time.perf_counter()
    with torch.inference_mode():
        decode_pixels(model.vae, latents)
    decode = time.perf_counter() - t1
    return {
        "load_to_first_step_s": load_to_first,
        "step_256_s": _median_step(start, stamps),
        "step_512_s": step_512,
        "txt2img_256_s": total,
        "vae_decode_512_s": decode,
        "fast_txt2img_256_s": fast_total,
        "fast_label": FAST_PRESET.label,
    }


def run_diffusers(path: Path, config: Path, device: str, dtype: str, out: Path) -> dict:
    import torch
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    t0 = time.perf_counter()
    if config.name == "config":  # SD1.5: the single file, as sdlab reads it
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, safety_checker=None,
            requires_safety_checker=False, torch_dtype=torch_dtype,
        ).to(device)  # fmt: skip
    else:  # SDXL: its diffusers folder
        pipe = DiffusionPipeline.from_pretrained(
            str(config), torch_dtype=torch_dtype, local_files_only=True, add_watermarker=False
        ).to(device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)

    def run(size: int, steps: int, stamps: list[float]):  # noqa: ANN202
        gen = torch.Generator().manual_seed(SEED)
        latents = torch.randn((1, 4, size // 8, size // 8), generator=gen).to(device, torch_dtype)
        with torch.no_grad():
            return pipe(
                PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=steps,
                guidance_scale=CFG, latents=latents,
                callback_on_step_end=lambda p, i, t, kw: stamps.append(time.perf_counter()) or kw,
            )  # fmt: skip

    first: list[float] = []
    started = _first_call(pipe.unet)
    run(512, 4, first)
    stamps: list[float] = []
    start = time.perf_counter()
    image = run(256, 20, stamps).images[0]
    total = time.perf_counter() - start
    image.save(out)
    latents = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(SEED))
    t1 = time.perf_counter()
    with torch.no_grad():
        pipe.vae.decode(latents.to(device, torch_dtype) / pipe.vae.config.scaling_factor)
    decode = time.perf_counter() - t1
    return {
        "load_to_first_step_s": started[0] - t0,
        "step_256_s": _median_step(start, stamps),
        "step_512_s": _median_step(started[0], first),
        "txt2img_256_s": total,
        "vae_decode_512_s": decode,
    }


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    path, config = prepare(args.arch)
    out = Path(args.out)
    if args.child == "sdlab":
        result = run_sdlab(path, args.device, args.dtype, out)
    else:
        result = run_diffusers(path, config, args.device, args.dtype, out)
    if args.device.startswith("cuda"):
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))


def psnr(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=list(ARCHS), default="sd1", help="the model's shapes (default sd1)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each engine (alternating)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="fp32 (CPU default) or fp16 (CUDA default)")
    ap.add_argument("--child", choices=["sdlab", "diffusers"])
    ap.add_argument("--out")
    args = ap.parse_args()
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    if args.child:
        child(args)
        return
    path, _ = prepare(args.arch)
    with path.open("rb") as f:  # into the page cache, so that the first child does not pay for the disk
        while f.read(1 << 24):
            pass
    results: dict[str, list[dict]] = {"sdlab": [], "diffusers": []}
    tag = f"{args.arch}-{args.device.replace(':', '')}-{args.dtype}"
    images = {e: CACHE / f"{e}-{tag}.png" for e in results}
    for _ in range(args.repeats):
        for engine in results:
            cmd = [sys.executable, __file__, "--child", engine, "--arch", args.arch]
            cmd += ["--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype]
            cmd += ["--out", str(images[engine])]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{engine} failed:\n{done.stderr[-3000:]}")
            results[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(engine, results[engine][-1], file=sys.stderr, flush=True)
    print(
        f"{ARCHS[args.arch]} shapes (random weights, fp16 file), {args.device} {args.dtype}, "
        f"{args.threads} thread(s), "
        f"median of {args.repeats} alternating runs, load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| measure | sdlab | diffusers | sdlab / diffusers |\n|---|---:|---:|---:|")
    for key, label in METRICS:
        a = statistics.median(r[key] for r in results["sdlab"])
        # fast mode has no diffusers twin: it is set against diffusers' exact 20-step run
        b = statistics.median(r[key.removeprefix("fast_")] for r in results["diffusers"])
        print(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    same = psnr(images["sdlab"], images["diffusers"])
    print(f"\nPSNR sdlab vs diffusers (20-step 256 px image): {same:.1f} dB")
    fast = psnr(images["sdlab"].with_suffix(".fast.png"), images["sdlab"])
    print(
        f"PSNR sdlab --fast vs sdlab exact (same image, {results['sdlab'][0]['fast_label']}): {fast:.1f} dB"
    )


if __name__ == "__main__":
    main()
