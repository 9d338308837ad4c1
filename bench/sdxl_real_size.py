"""SDXL at its real size on this machine: load time, one guided 1024x1024 step, peak memory.

    python bench/sdxl_real_size.py [--dir /tmp/sdlab-sdxl-real-size] [--size 1024] [--threads N] [--keep]

Writes (once; reused when present) an SDXL base single-file `.safetensors` at the real shapes
(`sdlab.config.SDXL`: 2.57 G-parameter U-Net, CLIP-L + OpenCLIP bigG text encoders, SDXL VAE), stored
fp16, with seeded random weights (norm weights 1 + 0.05 N, other 1-D parameters 0.05 N, the rest
N / sqrt(fan-in), as the tests' `randomize`). Each component is built on the meta device and each tensor
drawn on its own and cast to fp16, so the writer holds about the fp16 file's worth (7.3 GiB peak).

Then, in a fresh process (so its RSS is its own), times `load_model` (memory-mapped file -> fp32
modules) and one `generate` call at --size with steps=1, CFG 7, Euler: text encoding, the single
U-Net call (cond and uncond batched, with its FLOPs counted on the meta device), the VAE decode and the
whole call, with the RSS after load, the peak RSS of the process and that of the generate call alone
(the peak is reset through /proc/self/clear_refs after the load). The file is deleted at the end
unless --keep. `--tiny` runs the same on a small SDXL-shaped model, to check the script in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path("/tmp/sdlab-sdxl-real-size")
PROMPT = "a lighthouse on a cliff at sunset, dramatic clouds, highly detailed"
NEGATIVE = "blurry"
GIB = 2**30


def _config(tiny: bool) -> Any:
    """The real SDXL configuration, or a small one of the same family (detected as sdxl)."""
    from sdlab.config import SDXL, ModelConfig, TextConfig, VAEConfig, unet_config

    if not tiny:
        return SDXL
    openai = TextConfig(width=128, layers=2, heads=2, intermediate=256)
    openclip = TextConfig(
        width=128,
        layers=3,
        heads=2,
        intermediate=256,
        act="gelu",
        layout="openclip",
        pad_token=0,
        projection_dim=128,
    )
    unet = unet_config(
        model_channels=64,
        channel_mult=(1, 2),
        num_res_blocks=1,
        depth_per_level=(0, 2),
        num_heads=-1,
        num_head_channels=64,
        context_dim=256,
        use_linear_in_transformer=True,
        adm_in_channels=128 + 6 * 256,
        transformer_depth_middle=2,
    )
    vae = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.13025)
    return ModelConfig(family="sdxl", unet=unet, vae=vae, text=(openai, openclip), clip_skip_default=2)


def _rss_gib() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / GIB


def _rss_anon_gib() -> float:
    """The anonymous part of the resident memory now (RSS less the memory-mapped file pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def _peak_rss_gib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _available_gib() -> float:
    """MemAvailable of the machine."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


# ---------------------------------------------------------------------------------------------
# writing the checkpoint


def random_state_dict(module_cls: type, cfg: object, seed: int) -> dict[str, Any]:
    """A module's state dict with seeded random fp16 weights, never materialising it in fp32: the module
    is built on the meta device for its names and shapes, and each tensor is drawn on its own."""
    import torch

    from sdlab.checkpoints.load import empty_modules

    with empty_modules():
        module = module_cls(cfg)
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    out: dict[str, torch.Tensor] = {}
    for prefix, m in module.named_modules():
        for name, p in m.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g)  # fp32, one tensor at a time
            if isinstance(m, norms) and name == "weight":
                noise.mul_(0.05).add_(1.0)
            elif p.ndim == 1:
                noise.mul_(0.05)
            else:  # fan-in scaled, so activations keep their size through the depth
                noise.div_(p[0].numel() ** 0.5)
            out[f"{prefix}.{name}" if prefix else name] = noise.to(torch.float16)
    expected = module.state_dict()
    if set(out) != set(expected):
        raise RuntimeError(f"{module_cls.__name__}: buffers or shared parameters not covered")
    return out


def write_checkpoint(path: Path, tiny: bool) -> dict[str, float]:
    """Write the random-weight SDXL file (fp16, bigG in the OpenCLIP layout); seconds and peak RSS."""
    import torch

    from sdlab.checkpoints.load import Checkpoint, save_single_file
    from sdlab.models.clip import CLIPTextModel
    from sdlab.models.unet import UNetModel
    from sdlab.models.vae import AutoencoderKL

    cfg = _config(tiny)
    start = time.perf_counter()
    unet = random_state_dict(UNetModel, cfg.unet, seed=11)
    vae = random_state_dict(AutoencoderKL, cfg.vae, seed=12)
    text = [random_state_dict(CLIPTextModel, t, seed=13 + i) for i, t in enumerate(cfg.text)]
    drawn = time.perf_counter() - start
    layouts = [t.layout for t in cfg.text]  # ["openai", "openclip"]: bigG is written with OpenCLIP keys
    ckpt = Checkpoint(path, unet, vae, text, layouts, cfg.prediction)
    save_single_file(ckpt, path, dtype=torch.float16)
    return {"draw_s": drawn, "write_s": time.perf_counter() - start, "peak_rss_gib": _peak_rss_gib()}


# ---------------------------------------------------------------------------------------------
# the measured run


def _timed(fn: Callable[..., Any], times: dict[str, float], key: str) -> Callable[..., Any]:
    """`fn`, adding its wall time to times[key]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - start

    return wrapper


def measure(path: Path, size: int, threads: int) -> dict[str, Any]:
    """Load the file and run one guided step at size x size; times, memory and the image's statistics."""
    import numpy as np
    import torch

    import sdlab.pipeline as pipeline
    from sdlab.checkpoints.load import load_model

    torch.set_num_threads(threads)
    rss_start = _rss_gib()
    start = time.perf_counter()
    model = load_model(path)
    load_s = time.perf_counter() - start
    after_load = {
        "rss_after_load_gib": _rss_gib(),
        "rss_anon_after_load_gib": _rss_anon_gib(),
        "peak_rss_load_gib": _peak_rss_gib(),
    }
    try:  # reset the peak (VmHWM, which ru_maxrss reads) so the generate call's own peak shows
        Path("/proc/self/clear_refs").write_text("5")
        generate_peak = True
    except OSError:
        generate_peak = False

    # The stages of `generate`, timed where it calls them (this process only; the module is not changed).
    times: dict[str, float] = {}
    pipeline.encode_prompt_pair = _timed(pipeline.encode_prompt_pair, times, "text_s")
    pipeline.sample = _timed(pipeline.sample, times, "unet_s")
    pipeline.decode = _timed(pipeline.decode, times, "decode_s")
    unet_calls = []
    unet_forward = model.unet.forward
    model.unet.forward = _timed(unet_forward, times, "unet_forward_s")
    model.unet.register_forward_pre_hook(lambda m, args: unet_calls.append(tuple(args[0].shape)))

    request = pipeline.GenerationRequest(
        PROMPT,
        negative_prompt=NEGATIVE,
        width=size,
        height=size,
        steps=1,
        cfg_scale=7,
        sampler="euler",
        seed=1,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    result = pipeline.generate(model, request)
    total_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start

    pixels = np.asarray(result.images[0], dtype=np.float64)
    return {
        "rss_start_gib": rss_start,
        "load_s": load_s,
        **after_load,
        **times,
        "generate_s": total_s,
        "generate_cpu_s": cpu_s,
        "unet_calls": unet_calls,
        "peak_rss_generate_gib": _peak_rss_gib() if generate_peak else None,
        "peak_rss_gib": max(_peak_rss_gib(), after_load["peak_rss_load_gib"]),
        "latents_finite": bool(torch.isfinite(result.latents).all()),
        "image_size": list(result.images[0].size),
        "image_mean": float(pixels.mean()),
        "image_std": float(pixels.std()),
        "unet_params": sum(p.numel() for p in model.unet.parameters()),
        "total_params": sum(
            p.numel() for m in (model.unet, model.vae, *model.text_encoders) for p in m.parameters()
        ),
        "threads": torch.get_num_threads(),
    }


def count_flops(size: int, tiny: bool) -> dict[str, float]:
    """FLOPs of the batched U-Net call and of the VAE decode at size x size (counted on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdlab.checkpoints.load import empty_modules
    from sdlab.models.unet import UNetModel
    from sdlab.models.vae import AutoencoderKL

    cfg = _config(tiny)
    with empty_modules():
        unet, vae = UNetModel(cfg.unet), AutoencoderKL(cfg.vae)
    side = size // cfg.vae.downscale
    with torch.device("meta"), torch.inference_mode():
        latents = torch.empty(2, cfg.unet.in_channels, side, side)
        context = torch.empty(2, 77, cfg.unet.context_dim)
        with FlopCounterMode(display=False) as unet_flops:
            unet(latents, torch.empty(2), context, torch.empty(2, cfg.unet.adm_in_channels))
        with FlopCounterMode(display=False) as vae_flops:
            vae.decode(torch.empty(1, cfg.vae.z_channels, side, side))
    return {"unet": unet_flops.get_total_flops(), "vae": vae_flops.get_total_flops()}


# ---------------------------------------------------------------------------------------------
# driver


def _child(*options: str) -> dict[str, Any]:
    """Run this script in a fresh process with `options`; its JSON result (last line of stdout)."""
    out = subprocess.run([sys.executable, __file__, *options], capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"child {' '.join(options)} failed with exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_for_resources(folder: Path, need_ram_gib: float, need_disk_gib: float, tries: int) -> None:
    """Wait (60 s at a time) until the machine has the memory and disk the run needs, else exit."""
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(tries + 1):
        ram, disk = _available_gib(), shutil.disk_usage(folder).free / GIB
        if ram >= need_ram_gib and disk >= need_disk_gib:
            print(f"available: {ram:.1f} GiB memory, {disk:.0f} GiB disk in {folder}", flush=True)
            return
        print(
            f"waiting: {ram:.1f} GiB memory available (need {need_ram_gib:.0f}), "
            f"{disk:.1f} GiB disk (need {need_disk_gib:.0f}); try {attempt + 1}/{tries}",
            flush=True,
        )
        if attempt < tries:
            time.sleep(60)
    raise SystemExit("not enough free memory or disk for the run; try again later")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the checkpoint is written")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    parser.add_argument("--tiny", action="store_true", help="a small SDXL-shaped model (checks the script)")
    parser.add_argument("--min-ram-gib", type=float, default=18.0, help="memory available before the run")
    parser.add_argument("--wait-tries", type=int, default=5, help="minutes to wait for memory and disk")
    parser.add_argument("--child", choices=["write", "measure"], help=argparse.SUPPRESS)  # internal
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "write":
        print(json.dumps(write_checkpoint(args.path, args.tiny)))
        return
    if args.child == "measure":
        print(json.dumps(measure(args.path, args.size, args.threads)))
        return

    path = args.dir / ("sdxl-tiny-random-fp16.safetensors" if args.tiny else "sdxl-random-fp16.safetensors")
    need_disk = 0.0 if path.exists() or args.tiny else 10.0
    wait_for_resources(args.dir, 0.0 if args.tiny else args.min_ram_gib, need_disk, args.wait_tries)
    try:
        written = None
        if path.exists():
            print(f"reusing {path}", flush=True)
        else:
            print(f"writing {path} ...", flush=True)
            written = _child("--child", "write", "--path", str(path), *(["--tiny"] if args.tiny else []))
        info = subprocess.run(
            [sys.executable, "-m", "sdlab.cli", "info", str(path)], capture_output=True, text=True, check=True
        ).stdout
        print(info, flush=True)
        family = next(line.split()[1] for line in info.splitlines() if line.startswith("family:"))
        if family != "sdxl":
            raise SystemExit(f"{path}: detected as {family}, not sdxl")
        print(
            f"measuring in a fresh process ({args.size}x{args.size}, {args.threads} thread(s)) ...",
            flush=True,
        )
        r = _child(
            "--child",
            "measure",
            "--path",
            str(path),
            "--size",
            str(args.size),
            "--threads",
            str(args.threads),
        )
        size_gb = path.stat().st_size / 1e9
        flops = count_flops(args.size, args.tiny)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                args.dir.rmdir()  # when empty

    unet_batches = ", ".join("x".join(map(str, s)) for s in r["unet_calls"])
    print()
    print(
        f"sdlab, SDXL base shapes{' (TINY)' if args.tiny else ''}: "
        f"U-Net {r['unet_params'] / 1e9:.3f} G params, "
        f"all networks {r['total_params'] / 1e9:.3f} G; random weights, fp16 file -> fp32 modules, CPU, "
        f"{r['threads']} thread(s)"
    )
    print(
        f"one guided step: {args.size}x{args.size}, steps=1, Euler, CFG 7, negative prompt; "
        f"U-Net input {unet_batches}"
    )
    gen = r["peak_rss_generate_gib"]
    rows = [("file size (fp16 .safetensors)", f"{size_gb:.2f} GB")]
    if written:
        rows.append(
            (
                "write the file (once)",
                f"{written['write_s']:.1f} s, writer peak RSS {written['peak_rss_gib']:.2f} GiB",
            )
        )
    rows += [
        ("load_model (mmap -> fp32)", f"{r['load_s']:.1f} s"),
        (
            "RSS after load",
            f"{r['rss_after_load_gib']:.2f} GiB ({r['rss_anon_after_load_gib']:.2f} anonymous; "
            f"peak during load {r['peak_rss_load_gib']:.2f} GiB, mapped file pages included)",
        ),
        ("text encoding (CLIP-L + bigG, pos+neg)", f"{r['text_s']:.1f} s"),
        (
            "U-Net step (cond+uncond batched)",
            f"{r['unet_s']:.1f} s (U-Net forward {r['unet_forward_s']:.1f} s; "
            f"{flops['unet'] / 1e12:.1f} TFLOP, {flops['unet'] / r['unet_forward_s'] / 1e9:.0f} GFLOP/s)",
        ),
        (
            f"VAE decode {args.size}x{args.size}",
            f"{r['decode_s']:.1f} s ({flops['vae'] / 1e12:.1f} TFLOP, "
            f"{flops['vae'] / r['decode_s'] / 1e9:.0f} GFLOP/s)",
        ),
        ("generate() total", f"{r['generate_s']:.1f} s wall, {r['generate_cpu_s']:.1f} s CPU"),
        ("peak RSS (whole process)", f"{r['peak_rss_gib']:.2f} GiB"),
        ("peak RSS during generate()", "n/a" if gen is None else f"{gen:.2f} GiB"),
        (
            "image",
            f"{r['image_size'][0]}x{r['image_size'][1]}, mean {r['image_mean']:.1f}, "
            f"std {r['image_std']:.1f} (0-255), latents finite: {r['latents_finite']}",
        ),
    ]
    for label, value in rows:
        print(f"  {label:40s} {value}")
    if not r["latents_finite"] or r["image_std"] < 1.0:
        raise SystemExit("the image is NaN or flat")


if __name__ == "__main__":
    main()
