"""The synthetic attribute world: scenes with independent visual attributes, their
images and their captions.

A scene is a dict {attribute: value}. Each attribute is one of the kinds below; the
world spec chooses which kinds exist, their values, how often a training caption
mentions each, and which MMVP-style pattern (question type) tests it. Kinds not in the
spec stay at a fixed default and are never mentioned.

| kind        | values                                                     | caption phrase        |
|-------------|------------------------------------------------------------|-----------------------|
| background  | colour names                                               | "on a red background" |
| color       | colour names (object colour; disjoint from background's)   | "red"                 |
| shape       | circle square triangle diamond cross star hexagon          | "triangles"           |
| count       | 1..6                                                       | "three"               |
| position    | left right top bottom center top-left ... bottom-right     | "on the left"         |
| orientation | up down left right (a stick on each object points there)   | "pointing up"         |
| size        | small medium large                                         | "small"               |

An attribute left out of a training caption (probability 1 - mention) is replaced by a
generic word ("some ... shapes"), so no other word leaks it. Benchmark statements
mention every attribute. Everything is drawn from numpy Generators: same seed, same
scene, same pixels.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageColor, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
POSITIONS = {  # unit box (x0, y0, x1, y1) and caption phrase; a gap keeps halves apart
    "left": ((0.0, 0.0, 0.45, 1.0), "on the left"),
    "right": ((0.55, 0.0, 1.0, 1.0), "on the right"),
    "top": ((0.0, 0.0, 1.0, 0.45), "at the top"),
    "bottom": ((0.0, 0.55, 1.0, 1.0), "at the bottom"),
    "center": ((0.25, 0.25, 0.75, 0.75), "in the center"),
    "top-left": ((0.0, 0.0, 0.45, 0.45), "in the top left corner"),
    "top-right": ((0.55, 0.0, 1.0, 0.45), "in the top right corner"),
    "bottom-left": ((0.0, 0.55, 0.45, 1.0), "in the bottom left corner"),
    "bottom-right": ((0.55, 0.55, 1.0, 1.0), "in the bottom right corner"),
}
WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)
ORIENTATIONS = {"up": (0.0, -1.0), "down": (0.0, 1.0), "left": (-1.0, 0.0), "right": (1.0, 0.0)}
SIZES = {"small": 0.06, "medium": 0.09, "large": 0.12}  # object radius / image side
KINDS = ("background", "color", "shape", "count", "position", "orientation", "size")
DEFAULT_PATTERNS = {
    "background": "Background",
    "color": "Color",
    "shape": "Structural Character",
    "count": "Quantity",
    "position": "Spatial",
    "orientation": "Orientation",
    "size": "Size",
}
SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges, like a photo rather than pixel art


@dataclass(frozen=True)
class Attribute:
    kind: str
    values: tuple
    mention: float = 1.0  # probability that a training caption names the value
    pattern: str = ""  # MMVP question type (and image folder) that tests this attribute


@dataclass(frozen=True)
class WorldSpec:
    attributes: tuple[Attribute, ...]
    image_size: int = 64
    caption_prefix: str = "a photo of "
    color_jitter: int = 10  # +- per RGB channel, per image
    jpeg_quality: int = 90
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [a.kind for a in self.attributes]

    def attribute(self, kind: str) -> Attribute:
        for a in self.attributes:
            if a.kind == kind:
                return a
        raise KeyError(kind)

    def to_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "caption_prefix": self.caption_prefix,
            "color_jitter": self.color_jitter,
            "jpeg_quality": self.jpeg_quality,
            "attributes": {
                a.kind: {"values": list(a.values), "mention": a.mention, "pattern": a.pattern}
                for a in self.attributes
            },
        }


def spec_from_dict(d: Mapping[str, Any], source: str = "world spec") -> WorldSpec:
    """Build and validate a WorldSpec from its YAML/JSON form; errors name the key."""
    known = {"image_size", "caption_prefix", "color_jitter", "jpeg_quality", "attributes"}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; expected {sorted(known)}")
    attrs_in = d.get("attributes")
    if not isinstance(attrs_in, Mapping) or not attrs_in:
        raise ValueError(f"{source}: 'attributes' must be a non-empty mapping of kind -> {{values, mention}}")
    attributes = []
    for kind, a in attrs_in.items():
        where = f"{source}: attributes.{kind}"
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown attribute kind; expected one of {list(KINDS)}")
        if not isinstance(a, Mapping) or "values" not in a:
            raise ValueError(f"{where}: needs 'values'")
        values = tuple(a["values"])
        if len(values) < 2 or len(set(values)) != len(values):
            raise ValueError(f"{where}.values: need at least 2 distinct values, got {list(values)}")
        for v in values:
            _check_value(kind, v, where)
        mention = float(a.get("mention", 1.0))
        if not 0.0 <= mention <= 1.0:
            raise ValueError(f"{where}.mention: must be in [0, 1], got {mention}")
        pattern = str(a.get("pattern", DEFAULT_PATTERNS[kind]))
        if not pattern or "/" in pattern:
            raise ValueError(f"{where}.pattern: must be a non-empty folder name, got {pattern!r}")
        attributes.append(Attribute(kind, values, mention, pattern))
    patterns = [a.pattern for a in attributes]
    if len(set(patterns)) != len(patterns):
        raise ValueError(f"{source}: two attributes share a pattern name: {patterns}")
    spec = WorldSpec(
        attributes=tuple(attributes),
        image_size=int(d.get("image_size", 64)),
        caption_prefix=str(d.get("caption_prefix", "a photo of ")),
        color_jitter=int(d.get("color_jitter", 10)),
        jpeg_quality=int(d.get("jpeg_quality", 90)),
    )
    if spec.image_size < 16:
        raise ValueError(f"{source}: image_size must be >= 16, got {spec.image_size}")
    bg = set(spec.attribute("background").values) if "background" in spec.names else {"black"}
    if "color" in spec.names:
        clash = bg & set(spec.attribute("color").values)
        if clash:
            raise ValueError(f"{source}: colours {sorted(clash)} are both background and object colours "
                             "(objects would vanish)")
    return WorldSpec(**{**spec.__dict__, "defaults": _defaults(bg)})


def _check_value(kind: str, v: Any, where: str) -> None:
    ok = {
        "shape": lambda: v in SHAPES,
        "count": lambda: isinstance(v, int) and v in COUNT_WORDS,
        "position": lambda: v in POSITIONS,
        "orientation": lambda: v in ORIENTATIONS,
        "size": lambda: v in SIZES,
        "background": lambda: _is_colour(v),
        "color": lambda: _is_colour(v),
    }[kind]()
    if not ok:
        allowed = {"shape": SHAPES, "count": list(COUNT_WORDS), "position": list(POSITIONS),
                   "orientation": list(ORIENTATIONS), "size": list(SIZES)}.get(kind, "PIL colour names")
        raise ValueError(f"{where}.values: {v!r} is not a valid {kind}; allowed: {allowed}")


def _is_colour(v: Any) -> bool:
    try:
        ImageColor.getrgb(str(v))
        return isinstance(v, str)
    except ValueError:
        return False


def _defaults(background_values: set) -> dict:
    obj = next(c for c in ("white", "black", "gray", "yellow") if c not in background_values)
    return {"background": "black", "color": obj, "shape": "circle", "count": 1,
            "position": None, "orientation": None, "size": "medium"}


# --- scenes and captions -----------------------------------------------------------


def sample_scene(spec: WorldSpec, rng: np.random.Generator) -> dict:
    return {a.kind: a.values[rng.integers(len(a.values))] for a in spec.attributes}


def sample_mentions(spec: WorldSpec, rng: np.random.Generator) -> dict:
    return {a.kind: bool(rng.random() < a.mention) for a in spec.attributes}


def describe(spec: WorldSpec, scene: Mapping, mentioned: Mapping[str, bool] | None = None) -> str:
    """Caption text (without prefix) naming the attributes marked as mentioned."""
    said = {k: v for k, v in scene.items() if mentioned is None or mentioned.get(k, False)}
    words = []
    count = said.get("count")
    words.append(COUNT_WORDS[count] if count is not None else "some")
    if "size" in said:
        words.append(said["size"])
    if "color" in said:
        words.append(said["color"])
    noun = said.get("shape", "shape")
    plural = count is None or count > 1
    words.append(_plural(noun) if plural else noun)
    if "orientation" in said:
        words.append(f"pointing {said['orientation']}")
    if "position" in said:
        words.append(POSITIONS[said["position"]][1])
    if "background" in said:
        bg = said["background"]
        words.append(f"on {'an' if bg[0] in 'aeiou' else 'a'} {bg} background")
    return " ".join(words)


def caption(spec: WorldSpec, scene: Mapping, mentioned: Mapping[str, bool] | None = None) -> str:
    return spec.caption_prefix + describe(spec, scene, mentioned)


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


# --- rendering ----------------------------------------------------------------------


def render(spec: WorldSpec, scene: Mapping, rng: np.random.Generator) -> Image.Image:
    """Draw the scene; layout jitter and colour jitter come from `rng`."""
    full = {**spec.defaults, **scene}
    side = spec.image_size * SUPERSAMPLE
    bg = _jitter(ImageColor.getrgb(full["background"]), spec.color_jitter, rng)
    fg = _jitter(ImageColor.getrgb(full["color"]), spec.color_jitter, rng)
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    radius = SIZES[full["size"]] * side
    box = POSITIONS[full["position"]][0] if full["position"] else WHOLE_IMAGE
    for cx, cy in _layout(int(full["count"]), box, side, radius, rng):
        if full["orientation"]:
            dx, dy = ORIENTATIONS[full["orientation"]]
            draw.line([(cx, cy), (cx + dx * 1.9 * radius, cy + dy * 1.9 * radius)],
                      fill=fg, width=max(SUPERSAMPLE, int(radius / 2.5)))
        _draw_shape(draw, full["shape"], cx, cy, radius, fg)
    return img.resize((spec.image_size, spec.image_size), Image.Resampling.BOX)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _jitter(rgb: tuple, amount: int, rng: np.random.Generator) -> tuple:
    if amount <= 0:
        return tuple(rgb)
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(np.clip(c + x, 0, 255)) for c, x in zip(rgb, d))


def _layout(n: int, box: tuple, side: float, radius: float, rng: np.random.Generator) -> list:
    """Centres of n objects in a grid of cells inside `box`, n cells drawn at random."""
    margin = radius * 1.2
    x0, y0 = box[0] * side + margin, box[1] * side + margin
    x1, y1 = box[2] * side - margin, box[3] * side - margin
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    rows = max(range(1, n + 1), key=lambda r: min(w / math.ceil(n / r), h / r))
    cols = math.ceil(n / rows)
    cw, ch = w / cols, h / rows
    cells = rng.permutation(rows * cols)[:n]
    centres = []
    for c in sorted(cells.tolist()):
        r, k = divmod(c, cols)
        jx = max(cw / 2 - radius * 1.1, 0.0)
        jy = max(ch / 2 - radius * 1.1, 0.0)
        cx = x0 + (k + 0.5) * cw + rng.uniform(-jx, jx)
        cy = y0 + (r + 0.5) * ch + rng.uniform(-jy, jy)
        centres.append((cx, cy))
    return centres


def _regular(cx, cy, r, n, phase=0.0):
    return [(cx + r * math.cos(phase + 2 * math.pi * i / n), cy + r * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.89  # same area as the circle, roughly
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon(_regular(cx, cy + r * 0.15, r * 1.15, 3, -math.pi / 2), fill=fill)
    elif shape == "diamond":
        draw.polygon(_regular(cx, cy, r * 1.15, 4, -math.pi / 2), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular(cx, cy, r * 1.05, 6), fill=fill)
    elif shape == "star":
        outer = _regular(cx, cy, r * 1.25, 5, -math.pi / 2)
        inner = _regular(cx, cy, r * 0.5, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=fill)
    elif shape == "cross":
        a, b = r, r * 0.35
        draw.rectangle([cx - a, cy - b, cx + a, cy + b], fill=fill)
        draw.rectangle([cx - b, cy - a, cx + b, cy + a], fill=fill)
    else:  # validated by spec_from_dict
        raise ValueError(f"unknown shape {shape!r}")


def load_spec(path: str) -> WorldSpec:
    """Read a world spec from a YAML or JSON file."""
    from common.io import read_yaml

    d = read_yaml(path, "world spec")
    if not isinstance(d, Mapping):
        raise ValueError(f"{path}: a world spec must be a mapping")
    if "world" in d and isinstance(d["world"], Mapping):  # a whole run config also works
        d = d["world"]
    return spec_from_dict(d, source=path)


def add_world_argument(parser) -> None:
    parser.add_argument("--world", default="configs/worlds/default.yaml", help="world spec (YAML)")


def spec_from_args(args) -> WorldSpec:
    """The --world spec of a command line; errors as UsageError (one line, exit 2)."""
    from common.cli import UsageError

    try:
        return load_spec(args.world)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
