"""How often the built-in model draws the README's first prompt exactly: "two red circles above a blue
square" asks for a count, two colours and a relation at once, more than any one category of `emu3 eval`'s
generation benchmark. Over seeds 0..N-1 (what `emu3 generate --seed S` draws), the detector checks: two red
circles, one blue square, and both circles above it (by more than 3 px, as the benchmark's position test).

    python docs/probes/headline_prompt.py [N]    # default 32; measured (README): 8 of 32, seed 0 not one
"""

import sys

import numpy as np

from emu3.assets import builtin_model
from emu3.eval.detect import detect
from emu3.pipeline import Emu3

PROMPT = "two red circles above a blue square"


def main(n: int = 32) -> None:
    emu = Emu3.from_pretrained(builtin_model())
    rows = []
    for seed in range(n):
        found = detect(emu.generate_images([PROMPT], seed=seed)[0].pixels)
        circles = [d for d in found if (d.color, d.kind) == ("red", "circle")]
        squares = [d for d in found if (d.color, d.kind) == ("blue", "square")]
        above = len(circles) == 2 and len(squares) == 1 and all(squares[0].y - c.y > 3 for c in circles)
        rows.append((len(circles) == 2, len(squares) == 1, above))
    rows = np.array(rows)
    print(f"{PROMPT!r}, seeds 0-{n - 1}: two red circles {rows[:, 0].sum()}, one blue square {rows[:, 1].sum()}, "
          f"all of it {rows[:, 2].sum()} (seeds {[s for s in range(n) if rows[s, 2]]})")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
