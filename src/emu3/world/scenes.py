"""The shapes world: scenes of 1-4 coloured shapes on plain or textured backgrounds, rendered at
64x64, with captions, questions and answers whose ground truth is known exactly.

Everything is a pure function of a seed (numpy PCG64), so a dataset, a held-out test set and an
evaluation are reproducible. Shapes never overlap and keep a margin from each other, so colour
segmentation recovers every object (emu3.eval.detect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {  # saturated, far apart in hue: easy to tell from the light, grey-ish backgrounds
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 20), "purple": (145, 55, 200), "orange": (245, 130, 20),
}
BACKGROUNDS = ("grey", "white", "beige", "sky", "striped", "checkered", "gradient")
_PLAIN = {"grey": (200, 200, 200), "white": (245, 245, 245), "beige": (232, 222, 196), "sky": (196, 218, 236)}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
SUPERSAMPLE = 4


@dataclass
class Shape:
    kind: str
    color: str
    x: float  # centre, pixels
    y: float
    r: float  # half-size, pixels

    def phrase(self, with_color: bool = True) -> str:
        return f"{self.color} {self.kind}" if with_color else self.kind


@dataclass
class Scene:
    shapes: list[Shape]
    background: str = "grey"
    size: int = SIZE
    tags: dict = field(default_factory=dict)


def fits(shapes: list[Shape], s: Shape, size: int, margin: float = 3.0) -> bool:
    """Whether shape s lies inside the canvas with its centre over 1.2 x (the radii's sum) + `margin`
    pixels from every one of `shapes`."""
    if not (s.r + 1 <= s.x <= size - 1 - s.r and s.r + 1 <= s.y <= size - 1 - s.r):
        return False
    return all(math.hypot(s.x - o.x, s.y - o.y) > (s.r + o.r) * 1.2 + margin for o in shapes)


def sample_scene(rng: np.random.Generator, n: int | None = None, kinds=None, colors=None,
                 backgrounds=BACKGROUNDS, size: int = SIZE, tries: int = 200) -> Scene:
    """A random scene; `kinds` / `colors` (lists of length n) pin objects, None = random."""
    n = n if n is not None else int(rng.integers(1, 5))
    for _ in range(tries):
        shapes: list[Shape] = []
        for i in range(n):
            kind = kinds[i] if kinds else SHAPES[int(rng.integers(len(SHAPES)))]
            color = colors[i] if colors else list(COLORS)[int(rng.integers(len(COLORS)))]
            for _ in range(50):
                r = float(rng.uniform(5.0, 9.5))
                s = Shape(kind, color, float(rng.uniform(r + 1, size - 1 - r)), float(rng.uniform(r + 1, size - 1 - r)),
                          r)
                if fits(shapes, s, size):
                    shapes.append(s)
                    break
        if len(shapes) == n:
            return Scene(shapes, backgrounds[int(rng.integers(len(backgrounds)))], size)
    raise RuntimeError(f"could not place {n} shapes")


def render(scene: Scene) -> np.ndarray:
    """(size, size, 3) uint8, anti-aliased by supersampling."""
    s = scene.size * SUPERSAMPLE
    img = Image.new("RGB", (s, s), _PLAIN.get(scene.background, (200, 200, 200)))
    d = ImageDraw.Draw(img)
    if scene.background == "striped":
        for x in range(0, s, 16 * SUPERSAMPLE):
            d.rectangle([x, 0, x + 8 * SUPERSAMPLE - 1, s], fill=(218, 218, 206))
    elif scene.background == "checkered":
        for y in range(0, s, 8 * SUPERSAMPLE):
            for x in range(0, s, 8 * SUPERSAMPLE):
                if (x // (8 * SUPERSAMPLE) + y // (8 * SUPERSAMPLE)) % 2:
                    d.rectangle([x, y, x + 8 * SUPERSAMPLE - 1, y + 8 * SUPERSAMPLE - 1], fill=(214, 214, 214))
                else:
                    d.rectangle([x, y, x + 8 * SUPERSAMPLE - 1, y + 8 * SUPERSAMPLE - 1], fill=(186, 186, 186))
    elif scene.background == "gradient":
        for y in range(s):
            v = int(235 - 50 * y / s)
            d.line([0, y, s, y], fill=(v, v, min(255, v + 10)))
    for sh in scene.shapes:
        draw_shape(d, sh)
    return np.asarray(img.resize((scene.size, scene.size), Image.BOX), dtype=np.uint8)  # area average


def draw_shape(d: ImageDraw.ImageDraw, sh: Shape, offset: float = 0.0) -> None:
    """One shape on a SUPERSAMPLE-times canvas (`offset`: canvas pixels added to both coordinates)."""
    cx, cy = sh.x * SUPERSAMPLE + offset, sh.y * SUPERSAMPLE + offset
    r, c = sh.r * SUPERSAMPLE, COLORS[sh.color]
    if sh.kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif sh.kind == "square":
        a = r * 0.88  # similar area to the circle
        d.rectangle([cx - a, cy - a, cx + a, cy + a], fill=c)
    else:  # upward triangle
        h = r * 1.15
        d.polygon([(cx, cy - h), (cx - h * 0.95, cy + h * 0.8), (cx + h * 0.95, cy + h * 0.8)], fill=c)


# --------------------------------------------------------------------------------------------
# Language


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(kind: str, n: int) -> str:
    return kind if n == 1 else kind + "s"


def count_phrase(n: int, color: str | None, kind: str) -> str:
    noun = f"{color + ' ' if color else ''}{plural(kind, n)}"
    return f"{article(noun) if n == 1 else NUMBERS[n]} {noun}"


def groups(scene: Scene, with_color: bool = True) -> list[tuple[int, str | None, str]]:
    """(count, colour or None, kind), in order of first appearance from left to right."""
    out: dict[tuple, int] = {}
    for s in sorted(scene.shapes, key=lambda s: s.x):
        key = (s.color if with_color else None, s.kind)
        out[key] = out.get(key, 0) + 1
    return [(n, c, k) for (c, k), n in out.items()]


def relation(a: Shape, b: Shape) -> str | None:
    """'left of' / 'right of' / 'above' / 'below' when one axis clearly dominates, else None."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= 1.5 * abs(dy) and abs(dx) > 8:
        return "left of" if dx > 0 else "right of"
    if abs(dy) >= 1.5 * abs(dx) and abs(dy) > 8:
        return "above" if dy > 0 else "below"
    return None


def join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def inventory(scene: Scene) -> str:
    """Every object by count, colour and kind, from left to right: "a red circle and two blue squares"."""
    return join([count_phrase(n, c, k) for n, c, k in groups(scene)])


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A varied description that pins every object: counts, colours, a relation for two objects."""
    with_color = rng.random() > 0.1
    g = groups(scene, with_color)
    text = join([count_phrase(n, c, k) for n, c, k in g])
    if len(scene.shapes) == 2 and rng.random() < 0.6:
        a, b = sorted(scene.shapes, key=lambda s: rng.random())
        rel = relation(a, b)
        if rel is not None:
            pa, pb = a.phrase(with_color), b.phrase(with_color)
            text = f"{article(pa)} {pa} {rel} {article(pb)} {pb}"
    if rng.random() < 0.25:
        text += f" on {article(scene.background)} {scene.background} background"
    return text


def questions(scene: Scene, rng: np.random.Generator, k: int = 1, reasons: bool = False) -> list[tuple[str, str]]:
    """k (question, one-word answer) pairs: count, colour, existence, relation, position.

    No question's wording tells its answer (tests/test_world.py checks it on thousands of questions): an
    existence question asks about a present and an absent object equally often; a relation question is
    asked in both orders of a pair (so "left of" is as often yes as no); a count question asks, with equal
    chance, for each count the scene has (not mostly for a kind that is absent, as asking per kind would).

    With `reasons`, the same questions (the same draws from rng) answered the way the built-in model does
    from part 5 on: count, colour and existence answers first go through the scene's objects one by one
    from left to right, naming each by colour and kind, and end in the one-word answer after ", so "
    (emu3.eval.bench.final_answer reads it). A count keeps a running tally after every object ("red
    circle: one, blue square: one, green circle: two, so two"); a colour question stops at the object of
    the asked kind ("red circle, blue square, so blue"), an existence one at the asked object or after the
    last ("red circle, blue triangle, so no"). So every step looks only at the image, the question and the
    words just written. Relation and side answers stay one word."""
    pool = []
    scan = sorted(scene.shapes, key=lambda s: s.x)

    def until(hit) -> str | None:  # objects from the left up to the first hit, or all of them
        if not reasons:
            return None
        upto = next((i + 1 for i, s in enumerate(scan) if hit(s)), len(scan))
        return ", ".join(s.phrase() for s in scan[:upto])

    counts = {kind: int(sum(s.kind == kind for s in scan)) for kind in SHAPES}
    values = sorted(set(counts.values()))  # a count question: each answer this scene has, equally often
    value = values[int(rng.integers(len(values)))]
    asked = [kind for kind in SHAPES if counts[kind] == value]
    kind = asked[int(rng.integers(len(asked)))]
    tally = np.cumsum([s.kind == kind for s in scan])
    why = ", ".join(f"{s.phrase()}: {NUMBERS.get(int(n), 'zero')}" for s, n in zip(scan, tally)) if reasons \
        else None
    pool.append((f"how many {plural(kind, 2)} are there", NUMBERS.get(value, "zero"), why))
    for kind in SHAPES:  # in a fixed order: a set's order changes with PYTHONHASHSEED, and the draws with it
        same = [s for s in scene.shapes if s.kind == kind]
        if len(same) == 1:
            pool.append((f"what color is the {kind}", same[0].color, until(lambda s, k=kind: s.kind == k)))
    present = sorted({(s.color, s.kind) for s in scene.shapes})
    absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
    for _ in range(2):  # existence: yes and no equally often, whatever the scene
        ask_present = bool(present) and rng.random() < 0.5
        choices = present if ask_present else absent
        color, kind = choices[int(rng.integers(len(choices)))]
        pool.append((f"is there {article(color)} {color} {kind}", "yes" if ask_present else "no",
                     until(lambda s, c=color, k=kind: (s.color, s.kind) == (c, k))))
    unique = [s for s in scene.shapes if sum(o.color == s.color and o.kind == s.kind for o in scene.shapes) == 1]
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for a in unique:
        for b in unique:
            if a is not b and (rel := relation(a, b)) is not None:
                # both orders of every pair: each phrasing is asked as often with yes as with no
                pool.append((f"is the {a.phrase()} {rel} the {b.phrase()}", "yes", None))
                pool.append((f"is the {a.phrase()} {opposite[rel]} the {b.phrase()}", "no", None))
        side = "left" if a.x < SIZE / 2 else "right"
        if abs(a.x - SIZE / 2) > 6:
            pool.append((f"is the {a.phrase()} on the left or on the right", side, None))
    picks = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
    return [(q, f"{why}, so {a}" if why else a) for q, a, why in (pool[int(i)] for i in picks)]
