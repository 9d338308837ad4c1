"""Seconds from a fresh process to the PNG: `sdlab generate "a red apple"` with the shipped model.

    python bench/mini_generate_time.py [--runs 5]

Each run is a new `sdlab` process (Python start-up, imports, loading the model, sampling at the model's
default steps and guidance, decoding, writing the PNG). Prints every run and the median; the first run
also pays for a cold file cache.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt", default="a red apple")
    args = parser.parse_args()
    exe = shutil.which("sdlab") or sys.exit("sdlab is not installed (bash scripts/setup.sh)")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"{i}.png"
            start = time.perf_counter()
            subprocess.run([exe, "generate", args.prompt, "-s", str(i), "-o", str(out), "-q"], check=True)
            times.append(time.perf_counter() - start)
            print(f"run {i}: {times[-1]:.2f} s  ({out.stat().st_size} bytes)")
    print(f"median {statistics.median(times):.2f} s over {args.runs} fresh processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
