"""Tiled against untiled VAE encode/decode at real SD size: max abs difference, wall time, peak memory.

    python bench/vae_tiling.py [--width 1024] [--height 512] [--threads 1] [--device cpu]

Builds the SD VAE (`AutoencoderKL(VAEConfig())`, 83M parameters) with seeded random weights (norms
included, fan-in scaled, as the tests' `randomize`), a smooth random image in [-1, 1] (upsampled noise)
and, as its latent, the untiled posterior mean. Each of the four runs (encode, tiled encode, decode, tiled
decode, with vae_tools' default tiles) is its own process, so its peak RSS is its own; outputs pass
through a temporary folder and the differences are printed at the end. Times are wall clock and CPU
time of the process (the latter unaffected by other work on the machine); on CUDA the peak GPU memory
allocated is printed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = ("encode", "encode_tiled", "decode", "decode_tiled")


def _rss_mib() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _model_and_image(args: argparse.Namespace):
    import torch
    import torch.nn.functional as F

    from sdlab.config import VAEConfig
    from sdlab.models.vae import AutoencoderKL

    torch.set_num_threads(args.threads)
    vae = AutoencoderKL(VAEConfig())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the tests' `randomize`: every parameter matters, activations keep their size
        for m in vae.modules():
            for name, p in m.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(m, torch.nn.GroupNorm) and name == "weight":
                    p.copy_(1.0 + 0.05 * noise)
                elif p.ndim == 1:
                    p.copy_(0.05 * noise)
                else:
                    p.copy_(noise / p[0].numel() ** 0.5)
    vae = vae.eval().requires_grad_(False).to(args.device)
    noise = torch.rand(1, 3, args.height // 32, args.width // 32, generator=torch.Generator().manual_seed(1))
    image = F.interpolate(noise, size=(args.height, args.width), mode="bicubic").clamp(0, 1) * 2 - 1
    return vae, image.to(args.device)


def child(args: argparse.Namespace) -> None:
    """One run: write its output tensors and figures to `args.folder`."""
    import torch

    from sdlab import vae_tools

    vae, image = _model_and_image(args)
    folder = Path(args.folder)
    if args.run.startswith("decode"):
        z = torch.load(folder / "encode.pt")["mean"].to(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if args.run == "encode":
            posterior = vae.encode(image)
        elif args.run == "encode_tiled":
            posterior = vae_tools.encode_tiled(vae, image)
        elif args.run == "decode":
            pixels = vae.decode(z)
        else:
            pixels = vae_tools.decode_tiled(vae, z)
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    if args.run.startswith("encode"):
        out = {"mean": posterior.mean.cpu(), "logvar": posterior.logvar.cpu()}
    else:
        out = {"pixels": pixels.cpu()}
    torch.save(out, folder / f"{args.run}.pt")
    figures = {"seconds": seconds, "cpu_seconds": cpu_seconds, "rss_before_mib": before, "rss_peak_mib": peak}
    if cuda:
        figures["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (folder / f"{args.run}.json").write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # internal: one child run
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is not None:
        return child(args)

    import torch

    from sdlab import vae_tools

    print(
        f"SD VAE, random weights, {args.width}x{args.height} image, {args.threads} thread(s), {args.device}; "
        f"tiles: encode {vae_tools.ENCODE_TILE}/{vae_tools.ENCODE_OVERLAP} px, "
        f"decode {vae_tools.DECODE_TILE}/{vae_tools.DECODE_OVERLAP} latent px (tile/overlap)"
    )
    with tempfile.TemporaryDirectory() as folder:
        figures = {}
        for run in RUNS:
            options = ["--width", str(args.width), "--height", str(args.height), "--device", args.device]
            command = [sys.executable, __file__, *options, "--threads", str(args.threads), "--run", run]
            subprocess.run([*command, "--folder", folder], check=True)
            figures[run] = json.loads((Path(folder) / f"{run}.json").read_text())
            f = figures[run]
            extra = f" GPU peak {f['cuda_peak_mib']:8.0f} MiB" if "cuda_peak_mib" in f else ""
            print(
                f"{run:13s} {f['seconds']:7.1f} s wall, {f['cpu_seconds']:7.1f} s CPU   "
                f"peak RSS {f['rss_peak_mib']:6.0f} MiB, "
                f"{f['rss_peak_mib'] - f['rss_before_mib']:+6.0f} MiB over the RSS before the call{extra}",
                flush=True,
            )
        out = {run: torch.load(Path(folder) / f"{run}.pt") for run in RUNS}
    print("max abs difference, tiled - untiled (the issue asks < 1e-2):")
    for run, key in [("encode", "mean"), ("encode", "logvar"), ("decode", "pixels")]:
        whole, tiled = out[run][key].double(), out[f"{run}_tiled"][key].double()
        diff = float((tiled - whole).abs().max())
        print(f"  {run} {key:7s} {diff:.2e}   (untiled values up to {float(whole.abs().max()):.2f})")


if __name__ == "__main__":
    main()
