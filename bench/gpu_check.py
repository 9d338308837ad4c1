"""The GPU check of issue 12 in one run: sdlab against diffusers (SDPA) in fp16 at the real shapes.

    python bench/gpu_check.py [--dir /tmp/sdlab-gpu-check] [--device cuda] [--dtype fp16] [--only sd1,sdxl]
    python bench/gpu_check.py --device cpu --tiny     # tiny models, 4 steps: checks the script here

Writes, on the machine it runs on (once; reused while the folder lasts), seeded random-weight fp16 single
files at the real shapes (SD1.5 through `tests/reference.py`'s writer, 2.1 GB; SDXL base through
`bench/sdxl_real_size.py`'s, 6.9 GB) and the diffusers folders `sdlab convert` makes of them. Then each
engine runs in a fresh process (so the peak memory is its own): load, one 2-step warm-up call, then
20-step txt2img (Euler, Karras sigmas, CFG 7, seed s, s+1, ... as A1111) at batch 1 and batch 4,
SD1.5 at 512 px and SDXL at 1024 px, timed between CUDA synchronisations, with the peak of
`torch.cuda.max_memory_allocated` (weights included; peak RSS on the CPU). sdlab runs with `--dtype`
as given (fp16: the SDXL VAE too, redone in fp32 only if it overflows); diffusers with `torch_dtype` and
its own VAE upcasting. Then one small request (SD1.5 shapes, 256 px, 6 steps) on the CPU in fp32 and on
the device in fp32 and in the dtype: the PSNR of each device image against the CPU's (issue 12 asks
>= 40 dB in fp32, >= 30 dB in fp16). Prints a markdown table for `bench/RESULTS.md`.

On the lent H200 (torch there, no diffusers): carry the wheels (see /work/.library/device/README.md),
e.g. `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
importlib_metadata==10.2.0`, then run `python3 -m pip install -q --no-index --no-deps --target /tmp/site
.whl/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 bench/gpu_check.py` (about 5 minutes).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests"), str(HERE)]

PROMPT, NEGATIVE, SEED, CFG, STEPS = "a red apple on a wooden table, photograph", "blurry", 1, 7.0, 20
BATCHES = (1, 4)
SIZES = {"sd1": 512, "sdxl": 1024}
SMALL = {"size": 256, "steps": 6}  # the device-against-CPU request
TINY_SIZE, TINY_STEPS = 32, 4


def _steps(args: argparse.Namespace) -> int:
    return TINY_STEPS if args.tiny else STEPS


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# files


def prepare(name: str, folder: Path, tiny: bool) -> tuple[Path, Path]:
    """The model's single file (random weights) and the diffusers folder converted from it."""
    from sdlab.checkpoints.load import convert

    single, diffusers = folder / name / "model.safetensors", folder / name / "diffusers"
    if not single.exists():
        single.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        _write(name, single, tiny)
        log(f"wrote {single} in {time.perf_counter() - start:.0f} s")
    if not (diffusers / "model_index.json").exists():
        convert(single, diffusers)
    return single, diffusers


def _write(name: str, path: Path, tiny: bool) -> None:
    if name == "sdxl":
        from sdxl_real_size import write_checkpoint

        write_checkpoint(path, tiny)
    elif tiny:
        from tiny import write_tiny

        write_tiny("sd1", path)
    else:
        from reference import write_real_size_files

        write_real_size_files("sd1", path.parent)


# ---------------------------------------------------------------------------------------------
# the engines, each in its own process


def _clock(device: str) -> Any:
    """A timer that waits for the device's queued work first."""
    import torch

    def now() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_sdlab(args: argparse.Namespace) -> dict[str, float]:
    from sdlab.devices import Placement
    from sdlab.pipeline import GenerationRequest, generate

    now = _clock(args.device)
    start = now()
    model = Placement(args.device, args.dtype).load(args.single)
    result = {"load_s": now() - start}
    req = GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size, steps=_steps(args),
        cfg_scale=CFG, sampler="euler", scheduler="karras", seed=SEED,
    )  # fmt: skip
    generate(model, replace(req, steps=2))  # warm-up: kernels chosen, memory pools grown
    for batch in BATCHES:
        _reset_peak(args.device)
        start = now()
        images = generate(model, replace(req, batch_size=batch)).images
        result[f"b{batch}_s"], result[f"b{batch}_peak_gib"] = now() - start, _peak_gib(args.device)
        if batch == BATCHES[0]:
            images[0].save(args.png)
    return result


def run_diffusers(args: argparse.Namespace) -> dict[str, float]:
    import os

    import torch
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    from sdlab.devices import DTYPES

    os.environ["HF_HUB_OFFLINE"] = "1"
    dtype = DTYPES[args.dtype]
    now = _clock(args.device)
    start = now()
    extra = {"add_watermarker": False} if args.model == "sdxl" else {}
    pipe = DiffusionPipeline.from_pretrained(
        args.folder, torch_dtype=dtype, local_files_only=True, **extra
    ).to(args.device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    result = {"load_s": now() - start}

    def call(batch: int, steps: int) -> Any:
        side = args.size // pipe.vae_scale_factor
        seeds = [torch.Generator().manual_seed(SEED + i) for i in range(batch)]  # sdlab's (A1111's) seeds
        noise = torch.cat([torch.randn((1, 4, side, side), generator=g) for g in seeds])
        with torch.no_grad():
            return pipe(
                [PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, height=args.size, width=args.size,
                num_inference_steps=steps, guidance_scale=CFG, latents=noise.to(args.device, dtype),
            ).images  # fmt: skip

    call(1, 2)  # warm-up
    for batch in BATCHES:
        _reset_peak(args.device)
        start = now()
        images = call(batch, _steps(args))
        result[f"b{batch}_s"], result[f"b{batch}_peak_gib"] = now() - start, _peak_gib(args.device)
        if batch == BATCHES[0]:
            images[0].save(args.png)
    return result


def run_device_vs_cpu(args: argparse.Namespace) -> dict[str, float]:
    """One small SD1.5 request on the CPU in fp32, and on the device in fp32 and in the dtype: PSNRs."""
    from sdlab.devices import Placement
    from sdlab.pipeline import GenerationRequest, generate
    from sdlab.vae_tools import psnr

    size = TINY_SIZE if args.tiny else SMALL["size"]
    req = GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=size, height=size, steps=SMALL["steps"],
        cfg_scale=CFG, sampler="euler", scheduler="karras", seed=SEED,
    )  # fmt: skip
    reference = generate(Placement("cpu", "fp32").load(args.single), req).images[0]
    result = {}
    for dtype in dict.fromkeys(["fp32", args.dtype]):
        image = generate(Placement(args.device, dtype).load(args.single), req).images[0]
        result[f"psnr_{dtype}_db"] = psnr(image, reference)
    return result


CHILDREN = {"sdlab": run_sdlab, "diffusers": run_diffusers, "device-vs-cpu": run_device_vs_cpu}


def spawn(args: argparse.Namespace, child: str, model: str, single: Path, folder: Path) -> dict[str, float]:
    """Run one child in a fresh process; its result is the JSON on its last line of output."""
    size = TINY_SIZE if args.tiny else SIZES[model]
    png = args.dir / f"{model}-{child}.png"
    png.unlink(missing_ok=True)  # never compare an earlier run's image
    argv = [sys.executable, __file__, "--child", child, "--model", model, "--single", str(single)]
    argv += ["--folder", str(folder), "--size", str(size), "--png", str(png), "--device", args.device]
    argv += ["--dtype", args.dtype, "--dir", str(args.dir), *(["--tiny"] if args.tiny else [])]
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    log(f"{model} {child}: {time.perf_counter() - start:.0f} s")
    if done.returncode != 0:
        return {"error": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the report


def table(args: argparse.Namespace, results: dict[str, dict[str, dict[str, float]]]) -> str:
    from PIL import Image

    from sdlab.vae_tools import psnr

    flags = f"--device {args.device} --dtype {args.dtype}{' --tiny' if args.tiny else ''}"
    lines = [
        f"`python bench/gpu_check.py {flags}` ({time.strftime('%Y-%m-%d')}, {_device_name(args.device)}): "
        f"{_steps(args)} steps, Euler, Karras, CFG {CFG}",
        "",
        "| model | size | batch | sdlab s | diffusers s | ratio | sdlab s/step "
        "| sdlab peak GiB | diffusers peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, runs in results.items():
        ours, theirs = runs.get("sdlab", {}), runs.get("diffusers", {})
        size = TINY_SIZE if args.tiny else SIZES[model]
        for b in BATCHES:
            a, d = ours.get(f"b{b}_s"), theirs.get(f"b{b}_s")
            ratio, per_step = (f"{a / d:.2f}" if a and d else "-"), _num(a and a / _steps(args), 3)
            lines.append(
                f"| {model} | {size} | {b} | {_num(a)} | {_num(d)} | {ratio} | {per_step} | "
                f"{_num(ours.get(f'b{b}_peak_gib'))} | {_num(theirs.get(f'b{b}_peak_gib'))} |"
            )
    lines.append("")
    for model, runs in results.items():
        ours, theirs = runs.get("sdlab", {}), runs.get("diffusers", {})
        load = f"load {_num(ours.get('load_s'))} s vs {_num(theirs.get('load_s'))} s"
        pngs = [args.dir / f"{model}-{engine}.png" for engine in ("sdlab", "diffusers")]
        same = f"{psnr(*(Image.open(p) for p in pngs)):.1f} dB" if all(p.exists() for p in pngs) else "-"
        lines.append(f"- {model}: {load}; batch-1 images sdlab vs diffusers PSNR {same}")
    for key, value in results.get("sd1", {}).get("device-vs-cpu", {}).items():
        dtype = key.split("_")[1]
        lines.append(f"- {args.device} {dtype} vs CPU fp32, one small SD1.5 request: PSNR {_num(value)} dB")
    return "\n".join(lines)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdlab-gpu-check"), help="files and images")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp16 (fp32 on the CPU)")
    ap.add_argument("--only", default="sd1,sdxl", help="models to run, comma-separated")
    ap.add_argument("--tiny", action="store_true", help="tiny models of each family, 32 px, 4 steps")
    ap.add_argument("--child", choices=CHILDREN)
    for flag in ("--model", "--single", "--folder", "--png"):
        ap.add_argument(flag)
    ap.add_argument("--size", type=int)
    args = ap.parse_args()
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    start = time.perf_counter()
    args.dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for model in args.only.split(","):
        single, folder = prepare(model, args.dir, args.tiny)
        children = ["sdlab", "diffusers", *(["device-vs-cpu"] if model == "sd1" else [])]
        results[model] = {child: spawn(args, child, model, single, folder) for child in children}
    print(table(args, results))
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
