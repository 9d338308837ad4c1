#!/usr/bin/env bash
# Install sdlab with the test-only reference oracles (diffusers, transformers, k-diffusion).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PIP="python3 -m pip"
$PIP install -q -e ".[test,serve,queue]"
# The web UI test drives Debian's Chromium through playwright (no browser download).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 ||
    echo "note: could not install chromium; the browser test will be skipped" >&2
fi
# The PostgreSQL queue tests start a throw-away server from Debian's binaries (tests/conftest.py).
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq postgresql) >/dev/null 2>&1 ||
    echo "note: could not install postgresql; the PostgreSQL queue tests will be skipped" >&2
fi
# k-diffusion's sampling functions are the oracle for the samplers; its package __init__ needs far
# more than its sampling module, so install it and its maths dependencies without their extras.
$PIP install -q --no-deps k-diffusion torchsde torchdiffeq trampoline
# spandrel's upscaler architectures are the oracle for sdlab.upscale; it requires torchvision, and no
# torchvision wheel matches the CPU torch, so install it without dependencies (the tests stub the two
# torchvision functions it imports for architectures they never run).
$PIP install -q --no-deps spandrel einops
# comfy-catapult pins websockets 12 (sdlab serve needs a newer one): installed without its pins; its other
# pure-Python dependencies as usual (tests/test_comfy_catapult.py).
$PIP install -q --no-deps comfy-catapult==3.0.0
$PIP install -q "aiofiles>=23,<24" "aioshutil>=1,<2" "pydash>=7,<8" "python-slugify>=8,<9" rich-argparse toml aiohttp
