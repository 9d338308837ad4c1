"""The sdlab-mini dataset: emoji composited on flat backgrounds, with captions (shared/MINI_DATASET.md).

A scene is one object (index into `OBJECTS`), a palette background, and a layout: small at one of nine
anchors, or large and centred. Everything is derived from (seed, index), so any sample is reproducible
and nothing is stored on disk; the glyphs are rendered once from the Noto Color Emoji font and cached
per output size.

Camouflaged (object, colour) pairs, where the object cannot be seen, are left out of both splits.
Held-out split: a fixed `HELDOUT_PERCENT` of the (object, colour, layout) combinations, chosen by a
SHA-256 of their names (so it is stable when objects are added), never appears in the `train` split;
the `test` split draws only from those, so evaluation measures composition of attributes the model
has seen separately but never together.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from sdlab.images import to_tensor

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_PX = 109  # the only bitmap strike Noto Color Emoji has
MIN_SIZE = 32

# (emoji, CLDR short name) in the order MINI_DATASET.md lists them.
CORE_OBJECTS: tuple[tuple[str, str], ...] = (
    ("🍎", "red apple"), ("🍏", "green apple"), ("🍌", "banana"), ("🍇", "grapes"),
    ("🍉", "watermelon"), ("🍒", "cherries"), ("🍓", "strawberry"), ("🍍", "pineapple"),
    ("🥕", "carrot"), ("🌶️", "hot pepper"), ("🍄", "mushroom"), ("🍕", "pizza"),
    ("🍔", "hamburger"), ("🍩", "doughnut"), ("🐱", "cat face"), ("🐶", "dog face"),
    ("🐭", "mouse face"), ("🐰", "rabbit face"), ("🦊", "fox"), ("🐻", "bear"),
    ("🐼", "panda"), ("🐸", "frog"), ("🐷", "pig face"), ("🐮", "cow face"),
    ("🐧", "penguin"), ("🐙", "octopus"), ("🐟", "fish"), ("🐠", "tropical fish"),
    ("🌹", "rose"), ("🌻", "sunflower"), ("🌲", "evergreen tree"), ("🌴", "palm tree"),
    ("🌵", "cactus"), ("🍁", "maple leaf"), ("🌞", "sun with face"), ("🌙", "crescent moon"),
    ("❄️", "snowflake"), ("🔥", "fire"), ("💧", "droplet"), ("🌈", "rainbow"),
    ("🚀", "rocket"), ("🚗", "automobile"), ("🚲", "bicycle"), ("⛵", "sailboat"),
    ("🏠", "house"), ("⏰", "alarm clock"), ("🎸", "guitar"), ("⚽", "soccer ball"),
    ("🏀", "basketball"), ("❤️", "red heart"), ("💛", "yellow heart"), ("⭐", "star"),
    ("💡", "light bulb"), ("🎁", "wrapped gift"), ("🎈", "balloon"), ("👑", "crown"),
    ("👓", "glasses"), ("☂️", "umbrella"), ("🔑", "key"), ("🔔", "bell"),
    ("📚", "books"), ("🦋", "butterfly"), ("🐝", "honeybee"), ("🐢", "turtle"),
    ("🐍", "snake"), ("🦀", "crab"), ("🍋", "lemon"), ("🥑", "avocado"),
    ("🍦", "soft ice cream"), ("🎂", "birthday cake"), ("🍪", "cookie"), ("☕", "hot beverage"),
)  # fmt: skip

# More objects the spec welcomes; used when `MiniDataConfig.num_objects` exceeds the core 72.
EXTRA_OBJECTS: tuple[tuple[str, str], ...] = (
    ("🍑", "peach"), ("🍐", "pear"), ("🍊", "tangerine"), ("🥝", "kiwi fruit"),
    ("🍅", "tomato"), ("🍆", "eggplant"), ("🌽", "ear of corn"), ("🥦", "broccoli"),
    ("🍞", "bread"), ("🧀", "cheese wedge"), ("🍰", "shortcake"), ("🍭", "lollipop"),
    ("🐵", "monkey face"), ("🐯", "tiger face"), ("🦁", "lion"), ("🐴", "horse face"),
    ("🦄", "unicorn"), ("🐔", "chicken"), ("🦉", "owl"), ("🐳", "spouting whale"),
    ("🐞", "lady beetle"), ("🌷", "tulip"), ("🍀", "four leaf clover"), ("⛄", "snowman without snow"),
    ("⚡", "high voltage"), ("✈️", "airplane"), ("🚂", "locomotive"), ("🐘", "elephant"),
)  # fmt: skip

OBJECTS = CORE_OBJECTS + EXTRA_OBJECTS
NAMES = tuple(name for _, name in OBJECTS)
NAME_TO_OBJ = {name: i for i, name in enumerate(NAMES)}

PALETTE: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240), "black": (25, 25, 25), "gray": (128, 128, 128),
    "red": (200, 30, 30), "orange": (240, 130, 20), "yellow": (240, 220, 50),
    "green": (40, 160, 60), "blue": (30, 80, 200), "purple": (130, 50, 180),
    "pink": (240, 140, 190), "brown": (120, 75, 35), "cyan": (40, 190, 210),
}  # fmt: skip
COLOURS = tuple(PALETTE)

SIZES = {"small": 0.40, "large": 0.75}  # longer side of the object as a fraction of S
ANCHORS: dict[str, tuple[float, float]] = {  # object centre (x, y) as fractions of S
    "center": (0.50, 0.50), "left": (0.27, 0.50), "right": (0.73, 0.50),
    "top": (0.50, 0.27), "bottom": (0.50, 0.73), "top left": (0.27, 0.27),
    "top right": (0.73, 0.27), "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73),
}  # fmt: skip
PLACE_PHRASES = {
    "center": "in the center", "left": "on the left", "right": "on the right",
    "top": "at the top", "bottom": "at the bottom", "top left": "in the top left",
    "top right": "in the top right", "bottom left": "in the bottom left",
    "bottom right": "in the bottom right",
}  # fmt: skip
LAYOUTS: tuple[tuple[str, str | None], ...] = (*(("small", p) for p in ANCHORS), ("large", None))

# (object, colour) pairs left out of both splits: the object is invisible on that background. The
# Noto star's fill (253, 216, 53) is within 13 of yellow in every channel, so 91% of a large star
# reads as background; every other pair keeps enough contrast to be read (tests/test_mini_data.py).
CAMOUFLAGED = frozenset({("star", "yellow")})

FORMS = ("full", "name", "a_name", "colour", "layout", "empty")
HELDOUT_PERCENT = 10
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Scene:
    """One composition: object index, background colour, anchor (None for large objects) and size."""

    obj: int
    colour: str
    place: str | None
    size: str

    def __post_init__(self) -> None:
        if (
            not 0 <= self.obj < len(OBJECTS)
            or self.colour not in PALETTE
            or (self.size, self.place) not in LAYOUTS
        ):
            raise ValueError(f"invalid scene {self}")


# ---------------------------------------------------------------------------------------------
# Rendering


@functools.cache
def _font(font_path: str) -> ImageFont.FreeTypeFont:
    """The emoji font at its bitmap size; a clear hint when it is not installed."""
    if not Path(font_path).is_file():
        raise FileNotFoundError(
            f"emoji font not found at {font_path}: apt-get install fonts-noto-color-emoji, or pass font_path"
        )
    return ImageFont.truetype(font_path, FONT_PX)


@functools.cache
def glyph(obj: int, font_path: str = FONT_PATH) -> Image.Image:
    """The object's colour glyph as RGBA, cropped to its alpha bounding box (rendered once)."""
    font, char = _font(font_path), OBJECTS[obj][0]
    left, top, right, bottom = font.getbbox(char)
    canvas = Image.new("RGBA", (right - left, bottom - top))
    ImageDraw.Draw(canvas).text((-left, -top), char, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise ValueError(f"{font_path} has no glyph for {char!r} ({NAMES[obj]})")
    return canvas.crop(box)


@functools.cache
def scaled_glyph(obj: int, size_class: str, side: int, font_path: str = FONT_PATH) -> Image.Image:
    """The glyph resized so its longer side is SIZES[size_class]·side, cached per output size."""
    g = glyph(obj, font_path)
    scale = round(SIZES[size_class] * side) / max(g.size)
    w, h = (max(1, round(d * scale)) for d in g.size)
    return g.resize((w, h), Image.Resampling.LANCZOS)  # Pillow resizes RGBA with premultiplied alpha


def render(scene: Scene, size: int = 64, font_path: str = FONT_PATH) -> Image.Image:
    """Compose the scene as an RGB image of side `size`: background, then the object alpha-blended."""
    if size < MIN_SIZE:
        raise ValueError(f"image side {size} < {MIN_SIZE}")
    obj = scaled_glyph(scene.obj, scene.size, size, font_path)
    ax, ay = ANCHORS[scene.place or "center"]
    image = Image.new("RGB", (size, size), PALETTE[scene.colour])
    image.paste(obj, (round(ax * size - obj.width / 2), round(ay * size - obj.height / 2)), obj)
    return image


# ---------------------------------------------------------------------------------------------
# Captions and the prompt grammar


def caption(scene: Scene, form: str = "full") -> str:
    """The scene's caption in one of FORMS; partial forms leave the dropped attributes unsaid."""
    name = NAMES[scene.obj]
    layout = f"a small {name} {PLACE_PHRASES[scene.place]}" if scene.place else f"a large {name}"
    captions = {
        "full": f"{layout}, {scene.colour} background",
        "name": name,
        "a_name": f"a {name}",
        "colour": f"a {name} on a {scene.colour} background",
        "layout": layout,
        "empty": "",
    }
    if form not in captions:
        raise ValueError(f"unknown caption form {form!r}; expected one of {', '.join(FORMS)}")
    return captions[form]


def _alternation(words: tuple[str, ...]) -> str:
    """A regex alternation of `words`, longest first."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PLACE = _alternation(tuple(PLACE_PHRASES.values()))
_COLOUR = _alternation(COLOURS)
_PATTERNS = tuple(  # most specific first; a match counts only if its name is an object's name
    re.compile(p)
    for p in (
        rf"an? small (?P<name>.+?) (?P<place>{_PLACE}), (?P<colour>{_COLOUR}) background",
        rf"an? (?P<large>large) (?P<name>.+?), (?P<colour>{_COLOUR}) background",
        rf"an? (?P<name>.+?) on an? (?P<colour>{_COLOUR}) background",
        rf"an? small (?P<name>.+?) (?P<place>{_PLACE})",
        r"an? (?P<large>large) (?P<name>.+?)",
        r"an? (?P<name>.+)",
        r"(?P<name>.+)",
    )
)
_PHRASE_TO_PLACE = {phrase: place for place, phrase in PLACE_PHRASES.items()}
_ALIASES = {"centre": "center", "grey": "gray"}


def _normalise(text: str) -> str:
    """Lower case, single spaces, ', ' commas, no trailing full stop, British spellings mapped."""
    text = re.sub(r"\s*,\s*", ", ", " ".join(text.lower().split())).strip(" .")
    return " ".join(_ALIASES.get(w, w) for w in text.split(" "))


def parse_prompt(text: str) -> dict[str, int | str | None]:
    """The attributes a grammar prompt fixes, as a partial Scene: {obj, colour, place, size} subset.

    A large object fixes place None (always centred); the empty prompt fixes nothing. Raises
    ValueError for text outside the grammar, so an evaluator never scores a misread prompt.
    """
    text = _normalise(text)
    if not text:
        return {}
    for pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m and m["name"] in NAME_TO_OBJ:
            return _fixed(m.groupdict())
    raise ValueError(f"not an sdlab-mini prompt (see MINI_DATASET.md): {text!r}")


def _fixed(groups: dict[str, str | None]) -> dict[str, int | str | None]:
    """Regex groups -> the partial scene they fix."""
    out: dict[str, int | str | None] = {"obj": NAME_TO_OBJ[groups["name"]]}
    if groups.get("colour"):
        out["colour"] = groups["colour"]
    if groups.get("place"):
        out |= {"size": "small", "place": _PHRASE_TO_PLACE[groups["place"]]}
    elif groups.get("large"):
        out |= {"size": "large", "place": None}
    return out


# ---------------------------------------------------------------------------------------------
# Splits, sampling and the torch Dataset


def is_heldout(scene: Scene) -> bool:
    """Whether the scene's (object, colour, layout) combination belongs to the held-out test split."""
    key = f"{NAMES[scene.obj]}|{scene.colour}|{scene.size}|{scene.place}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100 < HELDOUT_PERCENT


@functools.cache
def split_scenes(split: str, num_objects: int = len(CORE_OBJECTS)) -> tuple[Scene, ...]:
    """All combinations of the first `num_objects` objects that fall in `split` ("train" or "test")."""
    if split not in SPLITS or not 0 < num_objects <= len(OBJECTS):
        raise ValueError(f"bad split {split!r} or num_objects {num_objects}")
    every = (
        Scene(obj, colour, place, size)
        for obj in range(num_objects)
        for colour in COLOURS
        for size, place in LAYOUTS
    )
    visible = (s for s in every if (NAMES[s.obj], s.colour) not in CAMOUFLAGED)
    return tuple(s for s in visible if is_heldout(s) == (split == "test"))


@dataclass(frozen=True)
class CaptionMix:
    """Probability of each caption form; ~10% empty captions train classifier-free guidance."""

    full: float = 0.5
    name: float = 0.05
    a_name: float = 0.1
    colour: float = 0.1
    layout: float = 0.15
    empty: float = 0.1

    def weights(self) -> tuple[float, ...]:
        """The probabilities in FORMS order."""
        return tuple(getattr(self, form) for form in FORMS)


@dataclass(frozen=True)
class MiniDataConfig:
    """What `sample` draws: image side, seed, split, how many of OBJECTS, caption mix, epoch length."""

    size: int = 64
    seed: int = 0
    split: str = "train"
    num_objects: int = len(CORE_OBJECTS)
    captions: CaptionMix = CaptionMix()
    epoch_size: int = 100_000
    font_path: str = FONT_PATH


def sample(index: int, config: MiniDataConfig = MiniDataConfig()) -> tuple[Tensor, str, Scene]:
    """Sample `index` of the stream: (3, S, S) float32 image in [-1, 1], its caption, its scene.

    The draw depends only on (config.seed, index), so any sample is reproducible on its own.
    """
    rng = random.Random(f"sdlab-mini:{config.seed}:{index}")
    scenes = split_scenes(config.split, config.num_objects)
    scene = scenes[rng.randrange(len(scenes))]
    form = rng.choices(FORMS, weights=config.captions.weights())[0]
    return to_tensor(render(scene, config.size, config.font_path))[0], caption(scene, form), scene
