"""How often the built-in model draws the README's first prompt exactly: "two red circles above a blue
square" asks for a count, two colours and a relation at once, more than any one category of `emu3 eval`'s
generation benchmark. Over seeds 0..N-1 (what `emu3 generate --seed S` draws), the detector checks, as the
exact generation score does: two red circles, one blue square, nothing else, and each circle above the
square by the world's own relation (vertical axis dominant, over 8 px); "loose" is the earlier check (the
three objects, others allowed, each circle higher by over 3 px).

    python docs/probes/headline_prompt.py [N]    # default 32 (figures in README)
"""

import sys

import numpy as np

from emu3.assets import builtin_model
from emu3.eval.detect import detect
from emu3.pipeline import Emu3
from emu3.world.scenes import relation

PROMPT = "two red circles above a blue square"


def main(n: int = 32) -> None:
    emu = Emu3.from_pretrained(builtin_model())
    rows = []
    for seed in range(n):
        found = detect(emu.generate_images([PROMPT], seed=seed)[0].pixels)
        circles = [d for d in found if (d.color, d.kind) == ("red", "circle")]
        squares = [d for d in found if (d.color, d.kind) == ("blue", "square")]
        loose = len(circles) == 2 and len(squares) == 1 and all(squares[0].y - c.y > 3 for c in circles)
        exact = len(circles) == 2 and len(squares) == 1 and len(found) == 3 and all(
            relation(c, squares[0]) == "above" for c in circles)
        rows.append((len(circles) == 2, len(squares) == 1, exact, loose))
    rows = np.array(rows)
    print(f"{PROMPT!r}, seeds 0-{n - 1}: two red circles {rows[:, 0].sum()}, one blue square {rows[:, 1].sum()}, "
          f"exactly as asked {rows[:, 2].sum()} (seeds {[s for s in range(n) if rows[s, 2]]}), loose check "
          f"{rows[:, 3].sum()}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
