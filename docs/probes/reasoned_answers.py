"""Probe of a model trained on reasoned answers (emu3.world.scenes.questions with reasons: "red circle: one,
blue square: one, green circle: two, so two"): over emu3 eval's 200 held-out questions (seed 20,000), per
question kind, how often the final answer is right, how often the reasoning before ", so " is exactly the
true one, how often the final answer is the one the model's own reasoning implies, and how often that
implied answer is right (count, colour and existence; relation and side answers are one word).

    python docs/probes/reasoned_answers.py MODEL_DIR
"""

import copy
import sys

import numpy as np

from emu3.eval.bench import final_answer, question_kind
from emu3.pipeline import Emu3
from emu3.world.scenes import questions, render, sample_scene


def implied(kind: str, question: str, reasoning: str) -> str | None:
    """The answer the reasoning implies: a count's last tally, the colour of the object a colour question's
    scan stopped at, whether an existence question's scan stopped at the asked object."""
    last = reasoning.split(", ")[-1]
    if kind == "count":
        return last.split(": ")[-1] if ": " in last else None
    if kind == "color":
        words = last.split()
        return words[0] if len(words) == 2 and words[1] == question.split()[-1] else None
    if kind == "existence":
        return "yes" if last == " ".join(question.split()[-2:]) else "no"
    return None


def main(model: str) -> None:
    emu = Emu3.from_pretrained(model)
    rng = np.random.default_rng(20_000)
    stats: dict[str, list[int]] = {}
    for _ in range(200):
        scene = sample_scene(rng)
        (_, truth), = questions(scene, copy.deepcopy(rng), 1, reasons=True)
        (q, a), = questions(scene, rng, 1)  # the evaluator's draw
        reply = emu.chat(render(scene), q)
        kind = question_kind(q)
        if kind in ("relation", "side"):
            continue
        reasoning = reply.rsplit(", so ", 1)[0]
        s = stats.setdefault(kind, [0, 0, 0, 0, 0])  # questions, right, reasoning exact, follows it, it's right
        s[0] += 1
        s[1] += final_answer(reply) == a
        s[2] += reasoning == truth.rsplit(", so ", 1)[0]
        s[3] += final_answer(reply) == implied(kind, q, reasoning)
        s[4] += implied(kind, q, reasoning) == a
    for kind, (n, right, exact, follows, read) in stats.items():
        print(f"{kind:10s} {n:3d} questions: right {right / n:.2f}, reasoning exact {exact / n:.2f}, "
              f"answer follows its reasoning {follows / n:.2f}, answer the reasoning implies right {read / n:.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
