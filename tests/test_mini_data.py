"""The sdlab-mini dataset and its readers: object table, rendering geometry, captions, splits, readers."""

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlab.train import mini_data as md
from sdlab.train.data import MiniData, collate
from sdlab.train.mini_data import (
    ANCHORS,
    CAMOUFLAGED,
    COLOURS,
    CORE_OBJECTS,
    FORMS,
    LAYOUTS,
    NAMES,
    OBJECTS,
    PALETTE,
    SIZES,
    MiniDataConfig,
    Scene,
    caption,
    parse_prompt,
    render,
    sample,
    split_scenes,
)
from sdlab.train.mini_eval import object_crop, read_scene

needs_font = pytest.mark.skipif(
    not Path(md.FONT_PATH).is_file(), reason="emoji font missing: apt-get install fonts-noto-color-emoji"
)
N_CORE = len(CORE_OBJECTS)


def test_object_table():
    assert len(CORE_OBJECTS) == 72 and OBJECTS[:72] == CORE_OBJECTS
    assert CORE_OBJECTS[0] == ("🍎", "red apple") and CORE_OBJECTS[-1] == ("☕", "hot beverage")
    assert len(set(NAMES)) == len(NAMES) and len({e for e, _ in OBJECTS}) == len(OBJECTS)
    assert all(n == n.strip().lower() and "," not in n for n in NAMES)


def test_names_are_cldr_short_names():
    emoji = pytest.importorskip("emoji", reason="pip install emoji to check the names")
    for char, name in OBJECTS:
        assert emoji.demojize(char).strip(":").replace("_", " ").lower() == name, char


def test_missing_font_says_what_to_install():
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        md.glyph(0, "/nonexistent/NotoColorEmoji.ttf")


@needs_font
def test_every_object_renders_a_colour_glyph():
    grey = set()
    for obj in range(len(OBJECTS)):
        g = np.asarray(md.glyph(obj))
        rgb = g[g[..., 3] > 0][:, :3].astype(int)
        assert max(g.shape[:2]) > 90 and len(rgb) > 1000, NAMES[obj]
        assert len(np.unique(rgb, axis=0)) > 1, f"{NAMES[obj]}: a one-colour (non-emoji font) glyph"
        if (rgb.max(1) - rgb.min(1)).max() < 40:
            grey.add(NAMES[obj])
    assert grey == {"soccer ball"}  # black and white in the artwork itself


def _object_box(scene: Scene, side: int) -> tuple[int, int, int, int]:
    """Exact object box: pixels that differ from the background on a white or on a black canvas."""
    on = [np.asarray(render(Scene(scene.obj, c, scene.place, scene.size), side)) for c in ("white", "black")]
    mask = (on[0] != PALETTE["white"]).any(-1) | (on[1] != PALETTE["black"]).any(-1)
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@needs_font
@pytest.mark.parametrize("side", [64, 96])
def test_render_geometry(side):
    for obj, (size, place) in itertools.product(range(N_CORE), LAYOUTS):
        scene = Scene(obj, "gray", place, size)
        x0, y0, x1, y1 = _object_box(scene, side)
        ax, ay = ANCHORS[place or "center"]
        assert abs(max(x1 - x0, y1 - y0) - SIZES[size] * side) <= 1, scene
        assert abs((x0 + x1) / 2 - ax * side) <= 1 and abs((y0 + y1) / 2 - ay * side) <= 1, scene


@needs_font
def test_render_canvas():
    image = render(Scene(3, "cyan", "top left", "small"), 80)
    assert image.mode == "RGB" and image.size == (80, 80)
    assert image.getpixel((79, 79)) == PALETTE["cyan"]
    with pytest.raises(ValueError):
        render(Scene(3, "cyan", None, "large"), 31)
    with pytest.raises(ValueError):
        Scene(3, "cyan", None, "small")


def _fixed(scene: Scene, form: str) -> dict:
    """The attributes a caption form states."""
    keys = {"full": "obj colour size place", "colour": "obj colour", "layout": "obj size place", "empty": ""}
    return {k: getattr(scene, k) for k in keys.get(form, "obj").split()}


def test_captions_round_trip():
    objs = [0, 9, 28, 36, 68, N_CORE - 1, len(OBJECTS) - 1]  # with multi-word names and variation selectors
    for obj, colour, (size, place), form in itertools.product(objs, COLOURS, LAYOUTS, FORMS):
        scene = Scene(obj, colour, place, size)
        assert parse_prompt(caption(scene, form)) == _fixed(scene, form), caption(scene, form)
    assert all(parse_prompt(name) == {"obj": i} for i, name in enumerate(NAMES))


def test_caption_grammar():
    assert (
        caption(Scene(0, "blue", "top left", "small")) == "a small red apple in the top left, blue background"
    )
    assert caption(Scene(71, "red", None, "large")) == "a large hot beverage, red background"
    assert caption(Scene(0, "blue", None, "large"), "colour") == "a red apple on a blue background"
    assert caption(Scene(0, "blue", None, "large"), "empty") == ""


def test_parser_tolerance_and_errors():
    scene = {"obj": 0, "colour": "blue", "size": "small", "place": "top left"}
    assert parse_prompt("  A Small  RED Apple in the Top   left ,Blue background. ") == scene
    assert parse_prompt("a red apple") == {"obj": 0}
    assert parse_prompt("an avocado on a grey background") == {"obj": 67, "colour": "gray"}
    assert parse_prompt("a small cat face in the centre") == {"obj": 14, "size": "small", "place": "center"}
    assert parse_prompt("a large cat face") == {"obj": 14, "size": "large", "place": None}
    assert parse_prompt("   ") == {}
    for bad in (
        "a cat",
        "a small cat face",
        "a large cat face on the left",
        "a blue cat face",
        "cat face, red",
    ):
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_splits_are_disjoint_and_cover_every_pair():
    train, test = set(split_scenes("train")), set(split_scenes("test"))
    everything = {
        Scene(o, c, p, s)
        for o in range(N_CORE)
        for c in COLOURS
        for s, p in LAYOUTS
        if (NAMES[o], c) not in CAMOUFLAGED
    }
    assert not train & test and train | test == everything
    assert 0.07 < len(test) / len(everything) < 0.13
    assert all(md.is_heldout(s) for s in test)
    for attrs in (("obj", "colour"), ("obj", "place", "size"), ("colour", "place", "size")):
        seen = {tuple(getattr(s, a) for a in attrs) for s in train}
        assert all(tuple(getattr(s, a) for a in attrs) in seen for s in test), attrs


@needs_font
def test_sample_is_deterministic():
    config = MiniDataConfig(seed=7, size=48)
    image, text, scene = sample(123, config)
    again = sample(123, config)
    assert torch.equal(image, again[0]) and (text, scene) == again[1:]
    assert (
        image.shape == (3, 48, 48) and image.dtype == torch.float32 and -1 <= image.min() < image.max() <= 1
    )
    draws = [sample(i, config)[1:] for i in range(2000)]
    assert len({s for _, s in draws}) > 1000
    assert 0.07 < sum(t == "" for t, _ in draws) / len(draws) < 0.13
    assert all(all(getattr(s, k) == v for k, v in parse_prompt(t).items()) for t, s in draws)
    assert all(md.is_heldout(sample(i, MiniDataConfig(split="test"))[2]) for i in range(200))


@needs_font
def test_dataset_batches():
    dataset = MiniData(MiniDataConfig(epoch_size=10))
    batch = collate([dataset[i] for i in range(4)])
    assert len(dataset) == 10 and batch["image"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4
    assert torch.equal(batch["image"][1], sample(1)[0]) and batch["key"][1] == sample(1)[2]


def _contrast(obj: int, colour: str) -> float:
    """Fraction of a large object's pixels more than 20 levels (max channel) from the background."""
    g = np.asarray(md.scaled_glyph(obj, "large", 64)).astype(np.float64)
    alpha, bg = g[..., 3:] / 255, np.array(PALETTE[colour])
    seen = np.abs(g[..., :3] * alpha + bg * (1 - alpha) - bg).max(-1) > 20
    return seen[alpha[..., 0] > 0.5].mean()


@needs_font
def test_camouflaged_pairs_are_exactly_the_invisible_ones():
    low = {(NAMES[o], c) for o in range(len(OBJECTS)) for c in COLOURS if _contrast(o, c) < 0.15}
    assert low == CAMOUFLAGED


def _scenes(side: int, seed: int) -> list[Scene]:
    """Every colour x layout, three times over, with random visible objects."""
    rng = random.Random(seed)
    scenes = []
    for colour, (size, place), _ in itertools.product(COLOURS, LAYOUTS, range(3)):
        obj = rng.randrange(len(OBJECTS))
        while (NAMES[obj], colour) in CAMOUFLAGED:
            obj = rng.randrange(len(OBJECTS))
        scenes.append(Scene(obj, colour, place, size))
    return scenes


@needs_font
@pytest.mark.parametrize("side, noise", [(64, 0), (96, 0), (32, 0), (64, 6)])
def test_readers_read_ground_truth(side, noise):
    rng = np.random.default_rng(side)
    for scene in _scenes(side, seed=side + noise):
        image = np.asarray(render(scene, side))
        if noise:  # a generated image is never flat: the readers must ignore mild pixel noise
            image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
        reading = read_scene(image)
        assert (reading.colour, reading.size, reading.place) == (scene.colour, scene.size, scene.place), scene


@needs_font
def test_object_crop_normalises_size_and_place():
    crops = []
    for obj, (side, place, size) in itertools.product(
        (0, 41), ((64, "top left", "small"), (96, None, "large"))
    ):
        image = render(Scene(obj, "pink", place, size), side)
        crops.append(object_crop(image, read_scene(image)))
    assert crops[0].shape == (3, 32, 32) and -1 <= crops[0].min() and crops[0].max() <= 1
    same, other = (crops[0] - crops[1]).abs().mean(), (crops[0] - crops[2]).abs().mean()
    assert same < 0.1 < other
