"""`emu3 eval`: the built-in model's benchmarks, each scored against exact ground truth.

- generation (GenEval-style categories on the shapes world): single object, two objects, counting,
  colours, position and colour attribution; each generated image is parsed by `detect` and checked
  against its prompt; the overall score is the mean of the six category accuracies, as in GenEval.
- understanding: answers to questions about held-out images, exact match; beside them, captions
  (the Stage1 template, no question): the share of objects a caption names by colour and kind.
- video extension: the first 4 frames (one latent frame) of a held-out clip and its caption are the
  prompt; the model writes the next 12 frames; every object in every predicted frame counts as right
  when the detector finds it within `tolerance` pixels of where the world's physics puts it, in its
  colour and kind (and, beside it, in its colour whatever the kind: motion right, shape blurred).
- tokenizer: reconstruction PSNR / SSIM of held-out images and videos, and codebook usage.
Held-out data comes from seeds >= 10,000 (training data uses seed 0 and its record indices).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..errors import InputError
from ..format import MAX_INTERLEAVED_IMAGES, Text
from ..metrics import psnr, ssim
from ..world.motion import sample_clip
from ..world.scenes import COLORS, NUMBERS, SHAPES, Scene, article, plural, questions, relation, render, sample_scene
from .detect import detect

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class Prompt:
    category: str
    text: str
    spec: dict


def geneval_prompts(n_per_category: int, seed: int = 10_000) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    colors, out = list(COLORS), []

    def pick(seq, k=1):
        return [seq[i] for i in rng.choice(len(seq), size=k, replace=False)]

    for _ in range(n_per_category):
        (s,) = pick(SHAPES)
        out.append(Prompt("single_object", f"{article(s)} {s}", {"kind": s}))
        s1, s2 = pick(SHAPES, 2)
        out.append(Prompt("two_object", f"{article(s1)} {s1} and {article(s2)} {s2}", {"kinds": [s1, s2]}))
        (c,), (s,), n = pick(colors), pick(SHAPES), int(rng.integers(2, 5))
        out.append(Prompt("counting", f"{NUMBERS[n]} {c} {plural(s, n)}", {"color": c, "kind": s, "n": n}))
        (c,), (s,) = pick(colors), pick(SHAPES)
        out.append(Prompt("colors", f"{article(c)} {c} {s}", {"color": c, "kind": s}))
        (c1, c2), (s1, s2), (rel,) = pick(colors, 2), pick(SHAPES, 2), pick(RELATIONS)
        out.append(Prompt("position", f"{article(c1)} {c1} {s1} {rel} {article(c2)} {c2} {s2}",
                          {"a": (c1, s1), "b": (c2, s2), "rel": rel}))
        (c1, c2), (s1, s2) = pick(colors, 2), pick(SHAPES, 2)
        out.append(Prompt("color_attr", f"{article(c1)} {c1} {s1} and {article(c2)} {c2} {s2}",
                          {"objects": [(c1, s1), (c2, s2)]}))
    return out


def wanted(prompt: Prompt) -> list[tuple[str | None, str]]:
    """The objects a prompt names, (colour or None, kind), with multiplicity: what the image must hold."""
    sp = prompt.spec
    return {"single_object": lambda: [(None, sp["kind"])],
            "two_object": lambda: [(None, k) for k in sp["kinds"]],
            "counting": lambda: [(sp["color"], sp["kind"])] * sp["n"],
            "colors": lambda: [(sp["color"], sp["kind"])],
            "position": lambda: [tuple(sp["a"]), tuple(sp["b"])],
            "color_attr": lambda: [tuple(o) for o in sp["objects"]]}[prompt.category]()


def score(prompt: Prompt, image: np.ndarray) -> bool:
    """The exact generation score: the image holds the objects the prompt names, with their counts,
    colours and (for position prompts) the world's own relation between them (`relation`: one axis
    dominates and the gap is over 8 px), and nothing else. An extra object, or a blob that fits no shape
    (detect's "unknown"), fails the prompt."""
    return score_found(prompt, detect(image))


def score_found(prompt: Prompt, found: list) -> bool:
    """`score` on the detector's output for the image."""
    want = wanted(prompt)
    if len(found) != len(want):
        return False
    left = list(found)
    for color, kind in sorted(want, key=lambda o: o[0] is None):  # coloured objects first, then any colour
        hit = next((d for d in left if d.kind == kind and (color is None or d.color == color)), None)
        if hit is None:
            return False
        left.remove(hit)
    if prompt.category == "position":
        a = next(d for d in found if (d.color, d.kind) == tuple(prompt.spec["a"]))
        b = next(d for d in found if (d.color, d.kind) == tuple(prompt.spec["b"]))
        return relation(a, b) == prompt.spec["rel"]
    return True


def score_geneval(prompt: Prompt, image: np.ndarray) -> bool:
    """GenEval's looser rule, kept for comparison with published figures: the named objects are there
    (extra objects are ignored), and a position holds when the centres differ by over 3 px on its axis."""
    return geneval_found(prompt, detect(image))


def geneval_found(prompt: Prompt, found: list) -> bool:
    sp = prompt.spec
    have = lambda c, s: [d for d in found if d.kind == s and (c is None or d.color == c)]  # noqa: E731
    if prompt.category == "single_object":
        return len(have(None, sp["kind"])) >= 1
    if prompt.category == "two_object":
        return all(have(None, s) for s in sp["kinds"])
    if prompt.category == "counting":
        return len(have(sp["color"], sp["kind"])) == sp["n"]
    if prompt.category == "colors":
        return len(have(sp["color"], sp["kind"])) >= 1
    if prompt.category == "color_attr":
        return all(have(c, s) for c, s in sp["objects"])
    a, b = have(*sp["a"]), have(*sp["b"])
    if not a or not b:
        return False
    a, b = a[0], b[0]
    dx, dy = b.x - a.x, b.y - a.y
    return {"left of": dx > 3, "right of": dx < -3, "above": dy > 3, "below": dy < -3}[sp["rel"]]


@lru_cache(maxsize=2)
def training_images(n: int = 2000, seed: int = 0) -> tuple[list, ...]:
    """The detector's reading of n rendered training scenes (the build's own draws, emu3.world.build
    rng_for(seed, "images", i)): the pool the constant-image and random-image baselines choose from."""
    from ..world.build import rng_for

    return tuple(detect(render(sample_scene(rng_for(seed, "images", i)))) for i in range(n))


def generation_baselines(prompts: list[Prompt], pool: int = 2000, seed: int = 0) -> dict:
    """What pictures that ignore the prompt score (exact metric, mean of the category accuracies) on these
    prompts: the best single training image shown for every prompt (searched over `pool` rendered training
    scenes), and a random training image per prompt."""
    found = training_images(pool)
    passed = np.array([[score_found(p, f) for p in prompts] for f in found])  # (pool, prompts)
    cats = np.array([p.category for p in prompts])

    def overall(ok: np.ndarray) -> float:
        return float(np.mean([ok[cats == c].mean() for c in CATEGORIES if (cats == c).any()]))

    best = max(range(len(found)), key=lambda i: overall(passed[i]))
    pick = np.random.default_rng(seed).integers(len(found), size=len(prompts))
    return {"constant image": overall(passed[best]), "random image": overall(passed[pick, np.arange(len(prompts))])}


def _none(_k: int = 1) -> None:
    """No progress to report."""


def eval_generation(emu, n_per_category: int = 16, seed: int = 10_000, batch_size: int = 16, tick=_none) -> dict:
    prompts = geneval_prompts(n_per_category, seed)
    images = []
    for start in range(0, len(prompts), batch_size):  # a batch at a time, to report progress
        chunk = prompts[start:start + batch_size]
        images += emu.generate_images([p.text for p in chunk], seed=seed + start, batch_size=batch_size)
        tick(len(chunk))
    ok = {c: [] for c in CATEGORIES}
    loose = {c: [] for c in CATEGORIES}
    for p, g in zip(prompts, images):
        found = detect(g.pixels)
        ok[p.category].append(score_found(p, found))
        loose[p.category].append(geneval_found(p, found))
    result = {c: float(np.mean(v)) for c, v in ok.items()}
    result["overall"] = float(np.mean([result[c] for c in CATEGORIES]))
    result["geneval_overall"] = float(np.mean([np.mean(v) for v in loose.values()]))
    result["prompts"] = len(prompts)
    result["baselines"] = {"overall": generation_baselines(prompts)}
    return result


QUESTION_KINDS = ("count", "color", "existence", "relation", "side")


def question_kind(question: str) -> str:
    """Which of the world's question templates (emu3.world.scenes.questions) asked this."""
    if question.startswith("how many"):
        return "count"
    if question.startswith("what color"):
        return "color"
    if question.startswith("is there"):
        return "existence"
    return "side" if question.endswith("on the left or on the right") else "relation"


def final_answer(text: str) -> str:
    """The answer in a reply: all of a one-word reply, or what follows the last ", so " of a reasoned one
    ("red circle: one, blue square: one, so one"), lower-cased, without a full stop."""
    return text.rsplit(", so ", 1)[-1].strip().strip(".").lower()


_MASK = re.compile(r"\b(" + "|".join(list(COLORS) + [plural(k, 2) for k in SHAPES] + list(SHAPES)) + r")\b")


def masked(question: str) -> str:
    """The question with its colour and kind words replaced by placeholders: what a rule that cannot see
    which objects are asked about (let alone the image) reads."""
    return _MASK.sub(lambda m: "<color>" if m.group(1) in COLORS else "<kind>", question)


@lru_cache(maxsize=2)
def blind_rule(n: int = 5000, seed: int = 0) -> dict[str, str]:
    """The blind baseline's rule, learnt on n training questions (the build's own draws, rng_for(seed,
    "qa", i)): the most common answer of every masked question text, and of every question kind (for a
    text it never saw)."""
    from collections import Counter

    from ..world.build import rng_for

    by_text, by_kind = {}, {}
    for i in range(n):
        rng = rng_for(seed, "qa", i)
        (q, a), = questions(sample_scene(rng), rng, 1)
        by_text.setdefault(masked(q), Counter())[a] += 1
        by_kind.setdefault(question_kind(q), Counter())[a] += 1
    rule = {k: c.most_common(1)[0][0] for k, c in by_kind.items()}
    rule.update({t: c.most_common(1)[0][0] for t, c in by_text.items()})
    return rule


def blind_answer(question: str) -> str:
    """The blind baseline's answer: the most common training answer of the masked question text."""
    rule = blind_rule()
    return rule.get(masked(question), rule.get(question_kind(question), ""))


GREY = Scene([], "grey")  # the image the "grey image" baseline asks about: the world's background, no objects


def eval_understanding(emu, n: int = 200, seed: int = 20_000, max_new_tokens: int | None = None,
                       tick=_none) -> dict:
    """Exact-match accuracy of the final answer (`final_answer`), overall and per question kind (count,
    color, existence, relation, side). Beside each, its baselines on the same questions: "blind" (the most
    common training answer of the question's text with colours and kinds masked: what the wording alone
    gives away) and "grey image" (the model's own answer about a plain grey image: what it says without
    looking). max_new_tokens: the model folder's default unless given (the built-in model's leaves room
    to reason)."""
    rng = np.random.default_rng(seed)
    right = {k: [] for k in QUESTION_KINDS}
    blind = {k: [] for k in QUESTION_KINDS}
    grey = {k: [] for k in QUESTION_KINDS}
    for _ in range(n):
        scene = sample_scene(rng)
        (q, a), = questions(scene, rng, 1)
        kind = question_kind(q)
        right[kind].append(final_answer(emu.chat(render(scene), q, max_new_tokens=max_new_tokens)) == a)
        blind[kind].append(blind_answer(q) == a)
        grey[kind].append(final_answer(emu.chat(render(GREY), q, max_new_tokens=max_new_tokens)) == a)
        tick()
    asked = [k for k in QUESTION_KINDS if right[k]]
    mean = lambda d, k=None: float(np.mean(d[k] if k else sum(d.values(), [])))  # noqa: E731
    out = {"accuracy": mean(right), **{k: mean(right, k) for k in asked}, "questions": n,
           "asked": {k: len(right[k]) for k in asked}}
    out["baselines"] = {m: {"blind": mean(blind, k), "grey image": mean(grey, k)}
                        for m, k in [("accuracy", None)] + [(k, k) for k in asked]}
    return out


def named_objects(text: str) -> set[tuple[str | None, str]]:
    """(colour or None, kind) of every object a caption names: "two red circles and a square" ->
    {("red", "circle"), (None, "square")}."""
    colors, kinds = "|".join(COLORS), "|".join(SHAPES)
    return {(m.group(1), m.group(2)) for m in re.finditer(rf"\b(?:({colors}) )?({kinds})s?\b", text)}


def eval_captions(emu, n: int = 64, seed: int = 20_000, tick=_none) -> dict:
    """Captions of held-out scenes, asked with the Stage1 template and no question: what the model
    perceives, without the one-word bottleneck of a question. Recall: the share of the scenes' objects
    (colour and kind) the captions name; precision: the share of objects they name (a kind without a
    colour counts as naming that kind in any colour) that are in the scene; F1 of the two."""
    from ..format import STAGE1_TEMPLATE
    from ..world.scenes import groups

    rng = np.random.default_rng(seed)
    hits = truths = said = true_said = 0
    for _ in range(n):
        scene = sample_scene(rng)
        named = named_objects(emu.chat(render(scene), "", max_new_tokens=32, template=STAGE1_TEMPLATE))
        there = {(c, k) for _, c, k in groups(scene)}
        hits += len(there & named)
        truths += len(there)
        said += len(named)
        true_said += sum(any(k == tk and (c is None or c == tc) for tc, tk in there) for c, k in named)
        tick()
    recall, precision = hits / truths, true_said / said if said else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"caption_recall": recall, "caption_precision": precision, "caption_f1": f1}


def eval_video(emu, n: int = 24, seed: int = 30_000, tolerance: float = 4.0, tick=_none) -> dict:
    """Extension from one latent frame (4 frames) to four (16 frames): the share of objects in the 12
    predicted frames found within `tolerance` px of where the world's physics puts them. Beside it, on
    the same clips: the vision tokenizer's round trip of the true frames (what a perfect language model
    could reach through this tokenizer) and the 4th frame held still (no motion at all); and, for the
    model and the round trip, the share placed right in their colour whatever kind the detector sees
    (so a blurred shape at the right place counts: this separates motion from shape)."""
    from ..world.motion import describe

    rng = np.random.default_rng(seed)
    hits, ceiling, still = [], [], []
    for i in range(n):
        clip = sample_clip(rng)
        frames = clip.render()
        g = emu.extend_video(frames[:4], describe(clip), new_frames=3, seed=seed + i)
        hits.append(placement(clip, g.pixels, tolerance))
        with torch.no_grad():
            rt = emu.vision.decode_video(emu.vision.encode_video(frames, "causal"), "causal")
        ceiling.append(placement(clip, rt, tolerance))
        still.append(placement(clip, held_still(frames), tolerance)[:, 0])
        tick()
    hits, ceiling = np.concatenate(hits), np.concatenate(ceiling)  # (objects, 2): kind and colour / colour
    still = np.concatenate(still)  # (objects,): kind and colour
    return {"within_tolerance": float(hits[:, 0].mean()), "tokenizer_ceiling": float(ceiling[:, 0].mean()),
            "held_still": float(still.mean()), "within_tolerance_any_kind": float(hits[:, 1].mean()),
            "tokenizer_ceiling_any_kind": float(ceiling[:, 1].mean()), "objects": len(hits),
            "tolerance_px": tolerance, "baselines": {"within_tolerance": {"held still": float(still.mean())}}}


def held_still(frames: np.ndarray) -> np.ndarray:
    """The no-motion yardstick: frames 0-3, then the 4th frame repeated to the clip's length."""
    return np.concatenate([frames[:4], np.repeat(frames[3:4], len(frames) - 4, 0)])


def placement(clip, pixels, tolerance: float) -> np.ndarray:
    """(objects, 2) bool for every object in frames 4.. of `pixels`: is one of its colour and kind within
    tolerance px of its true position; is one of its colour (any kind) there?"""
    out = []
    for t in range(4, len(pixels)):
        found = detect(pixels[t])
        for shape, (x, y) in zip(clip.scene.shapes, clip.positions(t)):
            near = [d for d in found if d.color == shape.color and math.hypot(d.x - x, d.y - y) <= tolerance]
            out.append((any(d.kind == shape.kind for d in near), bool(near)))
    return np.array(out, dtype=bool).reshape(-1, 2)


def eval_inpainting(emu, n: int = 64, seed: int = 50_000, rings: int = 2, tick=_none) -> dict:
    """Held-out scenes with their inside erased: the outer `rings` rings of codes are kept (spiral-in
    order), the model writes the rest from a caption naming every object ("two red circles and a blue
    square"). Scored like generation's counting: right when the detector finds exactly the scene's
    objects (colour and kind, with multiplicity) in the result. Beside it, on the same scenes, the vision
    tokenizer's round trip (the ceiling through the codes) and the border alone over a plain inside."""
    from ..world.scenes import inventory

    rng = np.random.default_rng(seed)
    ok, ceiling, border = [], [], []
    for i in range(n):
        scene = sample_scene(rng)
        image = render(scene)
        g = emu.inpaint(image, inventory(scene), rings, seed=seed + i)
        ok.append(same_objects(scene, g.pixels))
        with torch.no_grad():
            codes = emu.vision.encode_image(image)
            ceiling.append(same_objects(scene, emu.vision.decode_image(codes)))
        border.append(same_objects(scene, erased(image, codes.shape, rings)))
        tick()
    return {"accuracy": float(np.mean(ok)), "tokenizer_ceiling": float(np.mean(ceiling)),
            "border_only": float(np.mean(border)), "scenes": n, "rings": rings,
            "baselines": {"accuracy": {"border only": float(np.mean(border))}}}


def same_objects(scene, pixels: np.ndarray) -> bool:
    """Inpainting's verdict: the detector finds exactly the scene's objects (colour and kind, with
    multiplicity) in the picture."""
    return sorted((d.color, d.kind) for d in detect(pixels)) == sorted((s.color, s.kind) for s in scene.shapes)


def erased(image: np.ndarray, grid: tuple[int, int], rings: int) -> np.ndarray:
    """The image with everything inside the outer `rings` rings of its code grid painted plain grey (the
    border-only yardstick: objects wholly inside are lost, ones across the edge are cut)."""
    h, w = grid
    sy, sx = image.shape[0] // h, image.shape[1] // w  # pixels per code
    out = image.copy()
    out[rings * sy:(h - rings) * sy, rings * sx:(w - rings) * sx] = 200
    return out


@torch.no_grad()
def eval_tokenizer(vision, n: int = 128, seed: int = 40_000, clips: int | None = None) -> dict:
    """Held-out reconstructions: PSNR/SSIM of n images and `clips` videos (default n // 8), codebook
    usage, and how often the detector finds the same objects in an image and its reconstruction."""
    rng = np.random.default_rng(seed)
    images = np.stack([render(sample_scene(rng)) for _ in range(n)])
    codes = torch.stack(vision.encode_images(list(images)))
    recon = vision.decode_image(codes)
    clips = [sample_clip(rng).render() for _ in range(clips or max(1, n // 8))]
    vcodes = [vision.encode_video(c, "causal") for c in clips]
    vrec = [vision.decode_video(c, "causal") for c in vcodes]
    used = torch.unique(torch.cat([codes.flatten()] + [c.flatten() for c in vcodes]))
    objects = lambda img: sorted((d.color, d.kind) for d in detect(img))  # noqa: E731
    same = [objects(a) == objects(b) for a, b in zip(images, recon)]
    return {"image_psnr": psnr(images, recon), "image_ssim": ssim(images, recon),
            "detector_agreement": float(np.mean(same)),
            "video_psnr": psnr(np.concatenate(clips), np.concatenate(vrec)),
            "video_ssim": ssim(np.concatenate(clips), np.concatenate(vrec)),
            "codebook_usage": len(used) / vision.model.config.codebook_size, "images": n, "clips": len(clips)}


# First seeds of the two held-out splits. Every setting this project chose (guidance, top-k, answer formats,
# which recipe part ships) was chosen on "selection"; figures are reported on "report", which nothing was
# tuned on. Each benchmark draws from its own offset: generation +0, understanding +10,000, video +20,000,
# tokenizer +30,000, inpainting +40,000 (training data uses PCG64([0, kind, i]), a different stream).
_STEP2 = re.compile(r"then (an?) (\w+) (\w+) appears (left of|right of|above|below|next to) it\.")
_STEP3 = re.compile(r"finally the (\w+) turns (\w+)\.")


def score_story(first: tuple[str, str], steps: list[tuple[str | None, np.ndarray | None]],
                tolerance: float = 4.0) -> list[bool]:
    """Each step of a 3-step story right or not. `first`: (colour, kind) the prompt named; `steps`: the
    (text, image) of each step as written (step 1's text is the prompt's, so None; an image None when
    missing). Step 1: the image holds exactly that object. Step 2: the text is "then a C K appears REL it."
    (a world colour and kind, the right article), and the image holds exactly the first object, where the
    step before put it (within `tolerance` px, when that image was right), and the new one, REL of it by
    the world's relation ("next to": no relation). Step 3: "finally the K turns C'." with K the first
    object's kind and C' another colour, and the image holds exactly the recoloured first object and the
    second, both where step 2 put them."""
    out, before, now = [], None, None  # before: the previous right image's objects, by role
    color, kind = first

    def near(d, prev):
        return prev is None or math.hypot(d.x - prev.x, d.y - prev.y) <= tolerance

    def pick(found, want, prev):
        """The detection of identity `want` (nearest to `prev`), or None."""
        cands = [d for d in found if (d.color, d.kind) == want]
        if prev is not None:
            cands.sort(key=lambda d: math.hypot(d.x - prev.x, d.y - prev.y))
        return cands[0] if cands else None

    text1, image1 = steps[0] if steps else (None, None)
    found = detect(image1) if image1 is not None else []
    ok = len(found) == 1 and (found[0].color, found[0].kind) == first
    out.append(ok)
    before = {"first": found[0]} if ok else None
    m = _STEP2.fullmatch(steps[1][0].strip()) if len(steps) > 1 and steps[1][0] else None
    ok = False
    second = None
    if m and m.group(2) in COLORS and m.group(3) in SHAPES and m.group(1) == article(m.group(2)):
        second = (m.group(2), m.group(3))
        image = steps[1][1]
        found = detect(image) if image is not None else []
        if len(found) == 2:
            a = pick(found, first, before and before["first"])
            rest = [d for d in found if d is not a]
            b = rest[0] if a is not None else None
            if a is not None and (b.color, b.kind) == second and near(a, before and before["first"]):
                rel = m.group(4)
                ok = (relation(b, a) or "next to") == rel
                if ok:
                    now = {"first": a, "second": b}
    out.append(ok)
    before = now if ok else None
    m = _STEP3.fullmatch(steps[2][0].strip()) if len(steps) > 2 and steps[2][0] else None
    ok = False
    if m and second is not None and m.group(1) == kind and m.group(2) in COLORS and m.group(2) != color:
        image = steps[2][1]
        found = detect(image) if image is not None else []
        if len(found) == 2:
            a = pick(found, (m.group(2), kind), before and before["first"])
            rest = [d for d in found if d is not a]
            ok = (a is not None and (rest[0].color, rest[0].kind) == second and near(a, before and before["first"])
                  and near(rest[0], before and before["second"]))
    out.append(ok)
    return out


def story_steps(segments: list) -> list[tuple[str | None, np.ndarray | None]]:
    """The (text, image) steps of an interleaved answer to a story's first sentence: the first image, then
    each text with the image after it (None where one is missing)."""
    steps, text = [], None
    for s in segments:
        if isinstance(s, Text):
            if text is not None:
                steps.append((text, None))
            text = s.text
        else:
            steps.append((text, s.pixels))
            text = None
    if text is not None:
        steps.append((text, None))
    return steps


def eval_stories(emu, n: int = 48, seed: int = 50_000, batch_size: int = 16, tick=_none) -> dict:
    """Interleaved generation: from a held-out story's first sentence ("first, a red circle appears."), the
    model writes the rest, text and images, deciding itself where each image starts (`score_story`: every
    step's text and image checked against what the story so far implies). Beside it, on the same stories:
    the world's own texts with its first image held for every step (no change at all), another story's
    texts and images (a random answer), and the tokenizer's round trip of the true images with the true
    texts (the ceiling through the codes)."""
    from ..world.build import story

    rng = np.random.default_rng(seed)
    stories = [story(rng) for _ in range(n)]
    firsts = [first_object(s[0][0]) for s in stories]
    answers = emu.generate_interleaved([s[0][0] for s in stories], max_images=MAX_INTERLEAVED_IMAGES,
                                       seed=seed, batch_size=batch_size)
    model, held, other, ceiling, whole, shape = [], [], [], [], [], []
    for i, (st, first, segments) in enumerate(zip(stories, firsts, answers)):
        steps = story_steps(segments)
        model.append(score_story(first, steps))
        whole.append(all(model[-1]) and len(steps) == 3)
        shape.append(len(steps) == 3 and all(t is not None and im is not None for t, im in steps[1:]) and
                     steps[0][1] is not None)
        truth = [(None if k == 0 else t, im) for k, (t, im) in enumerate(st)]
        held.append(score_story(first, [(t, st[0][1]) for t, _ in truth]))
        j = (i + 1) % n
        other.append(score_story(first, [(None if k == 0 else t, im) for k, (t, im) in enumerate(stories[j])]))
        with torch.no_grad():
            codes = emu.vision.encode_images([im for _, im in st])
            ceiling.append(score_story(first, [(t, emu.vision.decode_image(c)) for (t, _), c in zip(truth, codes)]))
        tick()
    mean = lambda rows: float(np.mean([x for r in rows for x in r]))  # noqa: E731
    out = {"steps_right": mean(model), "stories_right": float(np.mean(whole)),
           "well_formed": float(np.mean(shape)),
           **{f"step{k + 1}_right": float(np.mean([r[k] for r in model])) for k in range(3)},
           "first_image_held": mean(held), "random_story": mean(other), "tokenizer_ceiling": mean(ceiling),
           "stories": n}
    out["baselines"] = {"steps_right": {"first image held": out["first_image_held"],
                                        "random story": out["random_story"]}}
    return out


def first_object(sentence: str) -> tuple[str, str]:
    """(colour, kind) a story's first sentence names ("first, a red circle appears.")."""
    m = re.fullmatch(r"first, an? (\w+) (\w+) appears\.", sentence)
    if m is None:
        raise InputError(f"not a story's first sentence: {sentence!r}")
    return m.group(1), m.group(2)


SPLITS = {"selection": 10_000, "report": 110_000}


def seed_sets(split: str) -> tuple[int, int, int]:
    """Three seed sets of a split for scores whose spread over prompts and samples matters: the split's own
    (what `emu3 eval --split` draws) and two more 500 and 1,000 seeds on."""
    if split not in SPLITS:
        raise InputError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    return SPLITS[split], SPLITS[split] + 500, SPLITS[split] + 1_000


def evaluate(emu, generation: int = 16, understanding: int = 200, video: int = 24, tokenizer: int = 128,
             inpainting: int = 64, seed: int | None = None, progress: bool = False, split: str = "report",
             stories: int = 48) -> dict:
    """Every benchmark with a non-zero count, on held-out seeds of `split` (or from `seed`, if given);
    inpainting only for a model trained in the spiral-in order (its emu3_defaults.json says order
    "spiral"), since no other order can keep a border. `progress`: one bar over all items (the benchmark
    running, how many done, time left) on stderr."""
    if split not in SPLITS:
        raise InputError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    seed = SPLITS[split] if seed is None else seed
    for name, n in (("generation", generation), ("understanding", understanding), ("video", video),
                    ("tokenizer", tokenizer), ("inpainting", inpainting), ("stories", stories)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(f"{name}={n!r}: expected a count >= 0 (0 skips it)")
    inpainting = inpainting if emu.defaults.order == "spiral" else 0
    captions = max(1, understanding // 3) if understanding else 0
    # each item weighs about what it costs the built-in model (an image through the tokenizer is ~1/50 of
    # a generated image; a video extension ~3 images), so the time left is roughly right
    total = tokenizer // 50 + 6 * generation + 2 * understanding + captions + 3 * video + inpainting + 3 * stories
    bar = None
    if progress and total:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="item", desc="eval", dynamic_ncols=True, leave=False)

    def stage(name: str, weight: int = 1):
        if bar is None:
            return _none
        bar.set_description(f"eval: {name}")
        return lambda k=1: bar.update(k * weight)

    out = {}
    try:
        if tokenizer:
            stage("tokenizer")
            out["tokenizer"] = eval_tokenizer(emu.vision, tokenizer, seed + 30_000)
            if bar is not None:
                bar.update(tokenizer // 50)
        if generation:
            out["generation"] = eval_generation(emu, generation, seed, tick=stage("generation"))
        if understanding:
            out["understanding"] = eval_understanding(emu, understanding, seed + 10_000, tick=stage("understanding", 2))
            out["understanding"].update(eval_captions(emu, captions, seed + 10_000, tick=stage("captions")))
        if video:
            out["video"] = eval_video(emu, video, seed + 20_000, tick=stage("video", 3))
        if inpainting:
            out["inpainting"] = eval_inpainting(emu, inpainting, seed + 40_000, tick=stage("inpainting"))
        if stories:
            out["stories"] = eval_stories(emu, stories, seed + 50_000, tick=stage("stories", 3))
    finally:
        if bar is not None:
            bar.close()
    return out


TARGETS = {("generation", "overall"): 0.80, ("understanding", "accuracy"): 0.90,
           ("video", "within_tolerance"): 0.80, ("tokenizer", "image_psnr"): 30.0, ("stories", "steps_right"): 0.80}


def table(results: dict) -> str:
    """A markdown table of every figure, its baselines on the same items, and the targets. A target counts
    as met only when the figure reaches it and beats every baseline printed beside it."""
    rows = ["| benchmark | metric | value | baselines (same items) | target |", "|---|---|---|---|---|"]
    for bench, metrics in results.items():
        baselines = dict(metrics.get("baselines", {}))
        for name, value in metrics.items():
            if not isinstance(value, float) or name == "tolerance_px":
                continue
            fmt = (lambda v: f"{v:.2f}") if "psnr" in name else (lambda v: f"{v:.3f}")
            beside = baselines.get(name, {})
            target = TARGETS.get((bench, name))
            verdict = ""
            if target is not None:
                met = value >= target and all(value > b for b in beside.values())
                verdict = f">= {target}: {'met' if met else 'missed'}"
            shown = ", ".join(f"{k} {fmt(v)}" for k, v in beside.items())
            rows.append(f"| {bench} | {name} | {fmt(value)} | {shown} | {verdict} |")
    return "\n".join(rows)
