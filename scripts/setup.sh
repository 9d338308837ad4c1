#!/usr/bin/env bash
# Install sdlab for use: the CPU build of torch first (so nothing pulls a multi-GB CUDA build),
# the emoji font the shipped model's training data needs, then sdlab itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
python3 -c "import torch" 2>/dev/null || $PIP install -q torch==2.13.0
if [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq fonts-noto-color-emoji) >/dev/null 2>&1 ||
    echo "note: could not install fonts-noto-color-emoji (only training the mini model needs it)" >&2
fi
$PIP install -q -e ".[serve]"
