"""Probe of a model trained on reasoned answers ("a red circle and two blue squares, so zero"): over
emu3 eval's 200 held-out questions (seed 20,000), per question kind, how often the final answer is right,
how often the listing before ", so " is exactly the scene's inventory, and how often the final answer is
the one that listing implies, and how often that implied answer is right (count, colour and existence).

    python docs/probes/reasoned_answers.py MODEL_DIR
"""

import re
import sys

import numpy as np

from emu3.eval.bench import final_answer, question_kind
from emu3.pipeline import Emu3
from emu3.world.scenes import NUMBERS, inventory, questions, render, sample_scene

WORDS = {"a": 1, "an": 1, **{v: k for k, v in NUMBERS.items()}}


def implied(kind: str, question: str, listing: str) -> str | None:
    if kind == "count":
        shape = question.split()[2][:-1]
        n = sum(WORDS[m.group(1)] for m in re.finditer(rf"\b(a|an|one|two|three|four)(?: \w+)? {shape}s?\b", listing))
        return NUMBERS.get(n, "zero")
    if kind == "color":
        m = re.search(rf"\b(\w+) {question.split()[-1]}\b", listing)
        return m.group(1) if m else None
    if kind == "existence":
        return "yes" if re.search(rf"\b{' '.join(question.split()[-2:])}s?\b", listing) else "no"
    return None


def main(model: str) -> None:
    emu = Emu3.from_pretrained(model)
    rng = np.random.default_rng(20_000)
    stats: dict[str, list[int]] = {}
    for _ in range(200):
        scene = sample_scene(rng)
        (q, a), = questions(scene, rng, 1)
        reply = emu.chat(render(scene), q)
        listing = reply.rsplit(", so ", 1)[0]
        kind = question_kind(q)
        s = stats.setdefault(kind, [0, 0, 0, 0, 0])  # questions, right, listing exact, follows listing, listing right
        s[0] += 1
        s[1] += final_answer(reply) == a
        s[2] += listing == inventory(scene)
        s[3] += final_answer(reply) == implied(kind, q, listing)
        s[4] += implied(kind, q, listing) == a
    for kind, (n, right, exact, follows, read) in stats.items():
        print(f"{kind:10s} {n:3d} questions: right {right / n:.2f}, listing exact {exact / n:.2f}, "
              f"answer follows its listing {follows / n:.2f}, answer the listing implies right {read / n:.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
