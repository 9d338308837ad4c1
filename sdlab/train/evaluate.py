"""`sdlab eval mini`: how well a model draws what sdlab-mini prompts ask for (the bar of issue 4).

Prompts are full captions (colour + place or size + object) of held-out (object, colour, layout)
combinations, the dataset's test split, which training never shows; `seed` picks them without
replacement. Prompt i is generated with pipeline seed EVAL_SEED_BASE + seed·MAX_PROMPTS + i, at least
10⁶: training draws its noise from its own generators, never from pipeline seeds (its sample grids use
seeds 0 and 1), so evaluation noise is disjoint from it and every run is deterministic. Each image is read
with `mini_eval` (background colour; object box -> size and place) and the object classifier (top-1 among
the 72 core emoji), and scored against the prompt's scene.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sdlab.checkpoints.load import StableDiffusion
from sdlab.images import to_pil, to_tensor
from sdlab.pipeline import GenerationRequest, decode_pixels, encode_pixels, generate
from sdlab.train.mini_classifier import classify
from sdlab.train.mini_data import NAMES, Scene, caption, render, split_scenes
from sdlab.train.mini_eval import ImageLike, Reading, as_array, object_crop, place_of, read_scene

EVAL_SEED_BASE = 1_000_000
MAX_PROMPTS = 10_000  # prompts per evaluation seed, so that the seeds of different runs never overlap
TARGETS = {"background": 0.95, "place": 0.90, "size": 0.90, "object": 0.60}  # issue 4
PSNR_TARGET = 28.0
GRID_TILE = 128  # px per grid tile (images are enlarged with nearest-neighbour)
GRID_GAP = 6  # px between tiles

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class Sampling:
    """How evaluation images are generated; `sdlab generate`'s defaults unless told otherwise."""

    steps: int
    cfg: float
    sampler: str = GenerationRequest.sampler
    scheduler: str = GenerationRequest.scheduler
    size: int = 64

    @classmethod
    def for_model(cls, model: StableDiffusion, **given: Any) -> Sampling:
        """The model's defaults (file metadata: steps, cfg, native size) overridden by non-None `given`."""
        defaults = cls(model.default_steps, model.default_cfg, size=model.native_size)
        return replace(defaults, **{k: v for k, v in given.items() if v is not None})

    def request(self, prompt: str, seed: int) -> GenerationRequest:
        """The generation request of one evaluation image."""
        return GenerationRequest(
            prompt=prompt,
            width=self.size,
            height=self.size,
            steps=self.steps,
            cfg_scale=self.cfg,
            sampler=self.sampler,
            scheduler=self.scheduler,
            seed=seed,
        )


def heldout_scenes(n: int, seed: int = 0) -> list[Scene]:
    """`n` distinct scenes of the held-out test split, chosen by `seed`."""
    scenes = split_scenes("test")
    if not 0 < n <= min(len(scenes), MAX_PROMPTS):
        raise ValueError(f"the number of prompts must be between 1 and {len(scenes)}, got {n}")
    return random.Random(f"sdlab-eval:{seed}").sample(scenes, n)


def eval_seeds(n: int, seed: int = 0) -> list[int]:
    """Pipeline seeds of the `n` images of evaluation run `seed` (never used in training)."""
    start = EVAL_SEED_BASE + seed * MAX_PROMPTS
    return list(range(start, start + n))


# ---------------------------------------------------------------------------------------------
# Reading and scoring


@dataclass(frozen=True)
class Scored:
    """One evaluation image: the scene asked for, its pipeline seed, and what the readers saw.

    `place` is the anchor nearest the object box's centre whatever size was read, so that a size error
    does not count as a place error too; it is judged for small objects only (large ones are centred).
    """

    scene: Scene
    seed: int
    reading: Reading
    place: str | None  # None when no object was found
    predicted: int  # classifier top-1, an index into CORE_OBJECTS

    @property
    def prompt(self) -> str:
        """The full caption the image was generated from."""
        return caption(self.scene)

    def checks(self) -> dict[str, bool]:
        """Right or wrong per judged attribute."""
        checks = {
            "background": self.reading.colour == self.scene.colour,
            "size": self.reading.size == self.scene.size,
            "object": self.predicted == self.scene.obj,
        }
        if self.scene.size == "small":
            checks["place"] = self.place == self.scene.place
        return checks

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record: prompt, seed, attributes asked for and read, and the checks."""
        s, r = self.scene, self.reading
        asked = {"object": NAMES[s.obj], "colour": s.colour, "size": s.size, "place": s.place}
        read = {"object": NAMES[self.predicted], "colour": r.colour, "size": r.size, "place": self.place}
        extra = {"background_rgb": list(r.background), "box": list(r.box) if r.box else None}
        return {
            "prompt": self.prompt,
            "seed": self.seed,
            "asked": asked,
            "read": read | extra,
            "right": self.checks(),
        }


def score_images(scenes: Sequence[Scene], images: Sequence[ImageLike], seeds: Sequence[int]) -> list[Scored]:
    """Read every image and classify its object (one batch), paired with the scene it should show."""
    arrays = [as_array(im) for im in images]
    readings = [read_scene(a) for a in arrays]
    predicted = classify(torch.stack([object_crop(a, r) for a, r in zip(arrays, readings, strict=True)]))
    return [
        Scored(scene, seed, r, place_of(r.box, a.shape[0]) if r.box else None, int(p))
        for scene, seed, a, r, p in zip(scenes, seeds, arrays, readings, predicted.tolist(), strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# The report


def tally(records: Sequence[Scored]) -> dict[str, tuple[int, int]]:
    """(right, judged) per attribute, and for `all` (every judged attribute right)."""
    checks = [r.checks() for r in records]
    counts = {a: (sum(c.get(a, False) for c in checks), sum(a in c for c in checks)) for a in TARGETS}
    return counts | {"all": (sum(all(c.values()) for c in checks), len(checks))}


def _summary(counts: dict[str, tuple[int, int]]) -> dict[str, dict[str, Any]]:
    """Counts -> JSON-ready right, judged, accuracy (None when nothing was judged) and target."""
    return {
        a: {"right": r, "judged": j, "accuracy": r / j if j else None, "target": TARGETS.get(a)}
        for a, (r, j) in counts.items()
    }


@dataclass(frozen=True)
class VAECheck:
    """VAE round trips of held-out ground-truth renders: their PSNR, and (right, judged) per attribute
    when the evaluator reads them back, the ceiling that generation through this VAE can reach."""

    psnr: float
    readback: dict[str, tuple[int, int]]

    def format(self) -> str:
        """Two lines: PSNR against its target, read-back accuracy per attribute."""
        ok = "ok" if self.psnr >= PSNR_TARGET else "BELOW"
        shares = ", ".join(f"{a} {r / j:.1%}" for a, (r, j) in self.readback.items() if j)
        return (
            f"{'VAE PSNR':<12}{self.psnr:>23.2f} dB{PSNR_TARGET:>5.0f} dB  {ok}\n"
            f"VAE round trips of {self.readback['all'][1]} held-out renders read back: {shares}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready PSNR, its target and the read-back summary."""
        return {"psnr": self.psnr, "psnr_target": PSNR_TARGET, "readback": _summary(self.readback)}


@dataclass(frozen=True)
class EvalReport:
    """Per-prompt outcomes of one evaluation run, with its settings, timing and (optionally) a VAE check."""

    model: str
    sampling: Sampling
    seed: int
    records: tuple[Scored, ...]
    generate_seconds: float
    read_seconds: float
    vae: VAECheck | None = None

    def counts(self) -> dict[str, tuple[int, int]]:
        """(right, judged) per attribute, and for `all`."""
        return tally(self.records)

    def accuracy(self) -> dict[str, float]:
        """Share right per attribute (NaN where nothing was judged)."""
        return {a: right / judged if judged else math.nan for a, (right, judged) in self.counts().items()}

    def format(self) -> str:
        """A small text table: counts, accuracy and issue 4's target per attribute, VAE check, timing."""
        s, n = self.sampling, len(self.records)
        lines = [
            f"{self.model}: {n} held-out prompts, seed {self.seed}, {s.sampler}/{s.scheduler}, "
            f"{s.steps} steps, cfg {s.cfg:g}, {s.size} px",
            f"{'attribute':<12}{'right':>7} /{'judged':>7}{'accuracy':>10}{'target':>8}",
        ]
        acc = self.accuracy()
        for attr, (right, judged) in self.counts().items():
            target = TARGETS.get(attr)
            verdict = f"{target:>8.0%}  {'ok' if acc[attr] >= target else 'BELOW'}" if target else ""
            lines.append(f"{attr:<12}{right:>7} /{judged:>7}{acc[attr]:>10.1%}{verdict}")
        if self.vae is not None:
            lines.append(self.vae.format())
        lines.append(
            f"time: {self.generate_seconds / n:.2f} s/prompt generating, "
            f"{1000 * self.read_seconds / n:.1f} ms/prompt reading"
        )
        return "\n".join(lines)

    def to_json(self) -> str:
        """The whole report as JSON: settings, accuracies with counts and targets, VAE check, timing,
        and every record."""
        return json.dumps(
            {
                "model": self.model,
                "sampling": asdict(self.sampling),
                "seed": self.seed,
                "prompts": len(self.records),
                "accuracy": _summary(self.counts()),
                "vae": self.vae.to_dict() if self.vae else None,
                "generate_seconds": self.generate_seconds,
                "read_seconds": self.read_seconds,
                "records": [r.to_dict() for r in self.records],
            },
            indent=1,
        )


# ---------------------------------------------------------------------------------------------
# Evaluating a model


def evaluate_model(
    model: StableDiffusion,
    *,
    n_prompts: int = 200,
    seed: int = 0,
    steps: int | None = None,
    cfg: float | None = None,
    sampler: str | None = None,
    scheduler: str | None = None,
    size: int | None = None,
    progress: Progress | None = None,
) -> EvalReport:
    """Generate one image per held-out prompt and score it (settings left None: the model's defaults)."""
    sampling = Sampling.for_model(
        model, steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, size=size
    )
    scenes, seeds = heldout_scenes(n_prompts, seed), eval_seeds(n_prompts, seed)
    start = time.perf_counter()
    images = []
    for scene, image_seed in zip(scenes, seeds, strict=True):
        images.append(generate(model, sampling.request(caption(scene), image_seed)).images[0])
        if progress:
            progress(len(images), n_prompts)
    generated = time.perf_counter()
    records = score_images(scenes, images, seeds)
    read = time.perf_counter() - generated
    return EvalReport(model.name, sampling, seed, tuple(records), generated - start, read)


def vae_round_trip(
    model: StableDiffusion, images: Sequence[Image.Image], batch: int = 16
) -> list[Image.Image]:
    """Images through the model's VAE: encoded to the posterior mode, decoded, rounded to 8 bits."""
    pixels = torch.cat([to_tensor(im) for im in images])
    with torch.inference_mode():
        return [
            im
            for chunk in pixels.split(batch)
            for im in to_pil(decode_pixels(model.vae, encode_pixels(model.vae, chunk)).cpu())
        ]


def psnr(originals: Sequence[ImageLike], copies: Sequence[ImageLike]) -> float:
    """PSNR in dB over 8-bit RGB, from the mean squared error of all images together (a set-level
    figure, at most the mean of per-image PSNRs, so outliers count)."""
    a, b = (np.stack([as_array(im) for im in ims]).astype(np.float64) for ims in (originals, copies))
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(255**2 / mse) if mse else math.inf


def check_vae(model: StableDiffusion, n: int = 100, seed: int = 0, size: int | None = None) -> VAECheck:
    """Round-trip `n` held-out compositions (renders at `size`, default native) through the VAE: PSNR,
    and how the evaluator reads the reconstructions."""
    scenes = heldout_scenes(n, seed)
    side = size or model.native_size
    originals = [render(s, side) for s in scenes]
    copies = vae_round_trip(model, originals)
    return VAECheck(psnr(originals, copies), tally(score_images(scenes, copies, eval_seeds(n, seed))))


def vae_psnr(model: StableDiffusion, n: int = 100, seed: int = 0, size: int | None = None) -> float:
    """VAE round-trip PSNR (dB, 8-bit RGB) on `n` held-out compositions (see `check_vae`)."""
    return check_vae(model, n, seed, size).psnr


# ---------------------------------------------------------------------------------------------
# Picture grid


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width` px long in `font`."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def grid_image(images: Sequence[Image.Image], captions: Sequence[str], columns: int = 4) -> Image.Image:
    """Images as GRID_TILE-px tiles, `columns` a row, each with its caption wrapped below it."""
    font = ImageFont.load_default()
    wrapped = [_wrap(c, font, GRID_TILE - 4) for c in captions]
    line = font.getbbox("Ag")[3] + 2
    cell = (GRID_TILE + GRID_GAP, GRID_TILE + line * max(map(len, wrapped), default=0) + GRID_GAP)
    rows = -(-len(images) // columns)
    size = (cell[0] * min(columns, len(images)) - GRID_GAP, cell[1] * rows)
    grid = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        x, y = (i % columns) * cell[0], (i // columns) * cell[1]
        grid.paste(image.resize((GRID_TILE, GRID_TILE), Image.Resampling.NEAREST), (x, y))
        draw.multiline_text((x + 2, y + GRID_TILE + 2), "\n".join(lines), fill="black", font=font, spacing=2)
    return grid


def write_grid(
    model: StableDiffusion,
    prompts: Sequence[str],
    seeds: Sequence[int],
    path: str | Path,
    sampling: Sampling | None = None,
) -> Path:
    """Generate one image per (prompt, seed) and save them as a captioned PNG grid (for the README)."""
    sampling = sampling or Sampling.for_model(model)
    images = [generate(model, sampling.request(p, s)).images[0] for p, s in zip(prompts, seeds, strict=True)]
    path = Path(path)
    grid_image(images, prompts).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Command line


def cmd_eval_mini(args: argparse.Namespace) -> int:
    """`sdlab eval mini`: evaluate, print the table, optionally write JSON and a picture grid."""
    from tqdm import tqdm

    from sdlab.checkpoints.load import load_model, resolve_model

    model = load_model(resolve_model(args.model))
    with tqdm(total=args.prompts, desc="generating", unit="prompt", disable=args.quiet) as bar:
        report = evaluate_model(
            model,
            n_prompts=args.prompts,
            seed=args.seed,
            steps=args.steps,
            cfg=args.cfg,
            sampler=args.sampler,
            scheduler=args.scheduler,
            size=args.size,
            progress=lambda done, _total: bar.update(done - bar.n),
        )
    if args.vae_images:
        report = replace(report, vae=check_vae(model, args.vae_images, args.seed, report.sampling.size))
    print(report.format())
    if args.json:
        args.json.write_text(report.to_json())
    if args.grid:
        shown = report.records[: args.grid_count]
        write_grid(model, [r.prompt for r in shown], [r.seed for r in shown], args.grid, report.sampling)
    return 0


def add_eval_parser(subparsers: Any) -> None:
    """Register `eval mini` on the `sdlab` command's subparsers."""
    suites = subparsers.add_parser("eval", help="measure a model's quality").add_subparsers(
        dest="suite", required=True
    )
    p = suites.add_parser(
        "mini", help="attribute accuracy on held-out sdlab-mini prompts, and VAE PSNR (issue 4's bar)"
    )
    p.add_argument("-m", "--model", help="model to evaluate (default: the shipped sdlab-mini)")
    p.add_argument("--prompts", type=int, default=200, help="held-out prompts, one image each")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--sampler", help=f"sampler (default: {GenerationRequest.sampler})")
    p.add_argument("--scheduler", help=f"sigma schedule (default: {GenerationRequest.scheduler})")
    p.add_argument("--size", type=int, help="image side (default: the model's native size)")
    p.add_argument("-s", "--seed", type=int, default=0, help="picks the prompts and the noise seeds")
    p.add_argument(
        "--vae-images", type=int, default=100, help="held-out renders for the VAE round-trip check (0: skip)"
    )
    p.add_argument("--grid", type=Path, help="write a PNG grid of the first evaluation images here")
    p.add_argument("--grid-count", type=int, default=16, help="images in the grid")
    p.add_argument("--json", type=Path, help="write the full report (every prompt) as JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval_mini)
