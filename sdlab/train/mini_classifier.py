"""Object identity for the sdlab-mini evaluator: a small CNN that names which of the 72 core emoji an
image shows, from the 3x32x32 `mini_eval.object_crop` of the image.

It learns from ground-truth renders of the dataset's train split, degraded the way a generative model
degrades pictures (blur, resampling softness, JPEG, noise, colour drift, objects a little off in scale,
angle and position) and read through `read_scene` + `object_crop` exactly as generated images are, so it
sees at training time what it sees at evaluation. The weights ship as package data (fp16 safetensors);
`python -m sdlab.train.mini_classifier` retrains them deterministically and prints held-out accuracy.
"""

from __future__ import annotations

import argparse
import functools
import io
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import Tensor, nn

from sdlab.checkpoints.io import read_metadata, read_state_dict, write_safetensors
from sdlab.train.mini_data import ANCHORS, CORE_OBJECTS, PALETTE, Scene, render, split_scenes
from sdlab.train.mini_eval import ImageLike, object_crop, read_scene

CLASSIFIER_PATH = Path(__file__).resolve().parent.parent / "assets" / "mini-classifier.safetensors"
NUM_CLASSES = len(CORE_OBJECTS)
WIDTHS = (24, 48, 96)  # channels per resolution: 32x32, 16x16, 8x8
SIDES = (64, 64, 96)  # image sides the training renders are drawn at (64 is the model's native size)
CLEAN_SHARE = 0.2  # training crops left undegraded
DEGRADED_FACTOR = 4  # the held-out "degraded" check: down- then up-sampled by this factor
TRAIN_STEPS = 1500


class ObjectClassifier(nn.Module):
    """Two 3x3 conv-BN-ReLU layers per resolution, max-pooled between, global average, linear head."""

    def __init__(self, widths: Sequence[int] = WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            for c_in in (channels, width):
                layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, NUM_CLASSES)

    def forward(self, crops: Tensor) -> Tensor:
        """Crops (B, 3, 32, 32) in [-1, 1] -> logits (B, 72) over CORE_OBJECTS."""
        return self.head(self.features(crops))


# ---------------------------------------------------------------------------------------------
# Degradations a generated image may show


def downup(image: Image.Image, factor: float) -> Image.Image:
    """Down-sample by `factor` and back up: the softness of a decoder that lost the fine detail."""
    side = image.width
    small = image.resize((max(1, round(side / factor)),) * 2, Image.Resampling.BILINEAR, reducing_gap=None)
    return small.resize((side, side), Image.Resampling.BICUBIC)


def _jitter_geometry(image: Image.Image, scene: Scene, rng: random.Random) -> Image.Image:
    """Scale, rotate and shift the object a little about its anchor, as a generator misplaces it."""
    side = image.width
    cx, cy = (a * side for a in ANCHORS[scene.place or "center"])
    scale = rng.uniform(0.88, 1.12 if scene.size == "small" else 1.06)
    angle = np.radians(rng.uniform(-8, 8))
    dx, dy = (rng.uniform(-0.03, 0.03) * side for _ in range(2))
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    # inverse map output -> input: x_in = A (x_out - c - d) + c
    ox, oy = cx + dx, cy + dy
    coeffs = (cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy)
    return image.transform(
        image.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC, fillcolor=PALETTE[scene.colour]
    )


def _soften(image: Image.Image, rng: random.Random) -> Image.Image:
    """Some of: Gaussian blur, down/up resampling, JPEG compression."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5) * image.width / 64))
    if rng.random() < 0.5:
        image = downup(image, rng.uniform(1.5, 5.0))
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randrange(30, 90))
        image = Image.open(buffer).convert("RGB")
    return image


def _drift(arr: np.ndarray, rng: random.Random) -> np.ndarray:
    """Per-channel gain and offset (colour drift) and Gaussian pixel noise, back to uint8."""
    gain = np.array([rng.uniform(0.9, 1.1) for _ in range(3)])
    offset = np.array([rng.uniform(-12, 12) for _ in range(3)])
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(0, 8), arr.shape)
    return np.clip(arr * gain + offset + noise, 0, 255).round().astype(np.uint8)


def degrade(image: Image.Image, scene: Scene, rng: random.Random) -> np.ndarray:
    """A ground-truth render made to look generated: geometry jitter, softness, colour drift, noise."""
    return _drift(np.asarray(_soften(_jitter_geometry(image, scene, rng), rng), dtype=np.float64), rng)


def crop(image: ImageLike) -> Tensor:
    """The classifier's input for an image: its object crop (3, 32, 32), found as the evaluator finds it."""
    return object_crop(image, read_scene(image))


# ---------------------------------------------------------------------------------------------
# Data, training, accuracy


def training_crops(count: int, seed: int) -> tuple[Tensor, Tensor]:
    """`count` degraded train-split crops as uint8 (N, 3, 32, 32) and their labels (N,); index-seeded."""
    scenes = split_scenes("train")
    crops, labels = torch.empty((count, 3, 32, 32), dtype=torch.uint8), torch.empty(count, dtype=torch.long)
    for i in range(count):
        rng = random.Random(f"sdlab-mini-classifier:{seed}:{i}")
        scene = scenes[rng.randrange(len(scenes))]
        image = render(scene, rng.choice(SIDES))
        arr = np.asarray(image) if rng.random() < CLEAN_SHARE else degrade(image, scene, rng)
        crops[i] = ((crop(arr) + 1) * 127.5).round().to(torch.uint8)
        labels[i] = scene.obj
    return crops, labels


def _augment(batch: Tensor, generator: torch.Generator, pad: int = 2, cutout: float = 0.25) -> Tensor:
    """uint8 crops -> floats in [-1, 1], each shifted by up to `pad` px (edge-replicated), and a share
    `cutout` of them with an 8-px square painted in the background colour (a part the generator left out)."""
    padded = F.pad(batch.float() / 127.5 - 1, (pad,) * 4, mode="replicate")
    x, y = torch.randint(0, 2 * pad + 1, (2, len(batch)), generator=generator).tolist()
    out = torch.stack([p[:, b : b + 32, a : a + 32] for p, a, b in zip(padded, x, y, strict=True)])
    cut = (torch.rand(len(batch), generator=generator) < cutout).tolist()
    x, y = torch.randint(4, 21, (2, len(batch)), generator=generator).tolist()
    for image, c, a, b in zip(out, cut, x, y, strict=True):
        if c:
            image[:, b : b + 8, a : a + 8] = image[:, :1, :1]  # the corner pixel is background padding
    return out


def train_classifier(
    out_path: str | Path = CLASSIFIER_PATH,
    steps: int = TRAIN_STEPS,
    seed: int = 0,
    *,
    pool: int = 20_000,
    batch_size: int = 128,
    lr: float = 3e-3,
    log: Callable[[str], None] = print,
) -> Path:
    """Train the classifier from scratch (deterministic given `seed`) and save it as fp16 safetensors to a
    new file: an existing `out_path` is refused before any training, not after."""
    if Path(out_path).exists():
        raise FileExistsError(f"{out_path}: already exists; not overwriting it (choose another --out)")
    torch.manual_seed(seed)
    start = time.time()
    crops, labels = training_crops(pool, seed)
    log(f"{pool} training crops in {time.time() - start:.0f}s")
    model = ObjectClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(0, pool, (batch_size,), generator=generator)
        loss = F.cross_entropy(model(_augment(crops[idx], generator)), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            log(f"step {step}/{steps}  loss {loss.item():.3f}  {time.time() - start:.0f}s")
    return save_classifier(model.eval(), out_path, {"steps": steps, "seed": seed, "pool": pool})


def save_classifier(model: ObjectClassifier, path: str | Path, info: dict[str, int]) -> Path:
    """fp16 weights with the widths (and how they were trained) in the safetensors metadata, in a new file."""
    widths = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)][1::2]
    metadata = {"sdlab.widths": ",".join(map(str, widths)), **{f"sdlab.{k}": str(v) for k, v in info.items()}}
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return write_safetensors(tensors, path, metadata=metadata)


@functools.cache
def load_classifier(path: str | Path = CLASSIFIER_PATH) -> ObjectClassifier:
    """The shipped (or given) classifier in eval mode, fp32; loaded once per path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no object classifier (train it: python -m sdlab.train.mini_classifier)"
        )
    widths = tuple(int(w) for w in read_metadata(path)["sdlab.widths"].split(","))
    model = ObjectClassifier(widths)
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(path).items()}
    )
    return model.eval().requires_grad_(False)


def classify(crops: Tensor, model: ObjectClassifier | None = None) -> Tensor:
    """Top-1 object index (into CORE_OBJECTS) of each crop (B, 3, 32, 32)."""
    with torch.inference_mode():
        return (model or load_classifier())(crops).argmax(1)


def _downup_degraded(image: Image.Image, scene: Scene) -> Image.Image:
    """The fixed harsh check: DEGRADED_FACTOR down/up sampling, far softer than a good VAE decodes."""
    return downup(image, DEGRADED_FACTOR)


def _randomly_degraded(image: Image.Image, scene: Scene) -> np.ndarray:
    """The training degradations, drawn from a generator of their own per scene."""
    return degrade(image, scene, random.Random(f"sdlab-mini-classifier:heldout:{scene}"))


HELDOUT_CHECKS: dict[str, Callable[[Image.Image, Scene], ImageLike] | None] = {
    "clean": None,
    f"{DEGRADED_FACTOR}x down/up": _downup_degraded,
    "randomly degraded": _randomly_degraded,
}


def heldout_accuracy(
    model: ObjectClassifier | None = None,
    alter: Callable[[Image.Image, Scene], ImageLike] | None = None,
    side: int = 64,
    limit: int | None = None,
) -> float:
    """Top-1 accuracy on renders of the held-out test-split scenes, each altered by `alter` if given."""
    scenes = split_scenes("test")[:limit]
    images = [render(s, side) for s in scenes]
    crops = torch.stack([crop(alter(im, s) if alter else im) for im, s in zip(images, scenes, strict=True)])
    predicted = classify(crops, model)
    return float((predicted == torch.tensor([s.obj for s in scenes])).float().mean())


def main(argv: Sequence[str] | None = None) -> None:
    """Retrain the classifier into a new file on one thread and print its held-out accuracy."""
    parser = argparse.ArgumentParser(prog="python -m sdlab.train.mini_classifier", description=main.__doc__)
    shipped = f"a new file (the shipped one: {CLASSIFIER_PATH})"
    parser.add_argument("--out", type=Path, required=True, help=shipped)
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    path = train_classifier(args.out, args.steps, args.seed, log=functools.partial(print, flush=True))
    model = load_classifier(path)
    print(f"trained in {time.time() - start:.0f}s: {path} ({path.stat().st_size / 1024:.0f} KiB)")
    for name, alter in HELDOUT_CHECKS.items():
        print(f"held-out accuracy, {name}: {heldout_accuracy(model, alter):.4f}")


if __name__ == "__main__":
    main()
