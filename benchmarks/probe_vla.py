"""Teacher-forced probe of a VLA model: does it know which way to move?

For windows of expert demonstrations (4 from each of N episodes, on training seeds 0+ and held-out
seeds 100,000+), the model gets the current views (with --history 1 also the expert's previous frame
and chunk), decodes its chunk greedily, and we score the first action against the expert's: sign
agreement of dx, dy (where the expert's |value| > 0.3) and grip, and the chunk's mean absolute
error. Similar scores on both seed ranges mean the model underfits; a gap means it overfits. Not a
speed benchmark: no baseline ratio.

    python benchmarks/probe_vla.py runs/vla/emu3-vla [--episodes 25] [--history 1]
"""

from __future__ import annotations

import argparse

import numpy as np

from emu3.action import FASTTokenizer
from emu3.pipeline import Emu3
from emu3.vla import Policy
from emu3.world.build import vla_windows
from emu3.world.table import record


def probe(policy: Policy, seeds, per_episode: int = 4, history: int = 0) -> dict:
    vt, chunk = policy.emu.require_vision(), policy.fast.config.time_horizon
    agree: dict[str, list[bool]] = {"dx": [], "dy": [], "grip": []}
    err = []
    for seed in seeds:
        ep = record(seed)
        for (f0, c0), (f1, c1) in list(vla_windows(ep, chunk, 2))[::7][:per_episode]:
            now = [c.numpy() for c in vt.encode_images([ep.table[f1], ep.wrist[f1]])]
            past = []  # the expert's previous frame and chunk, with --history 1
            if history:
                past = [([c.numpy() for c in vt.encode_images([ep.table[f0], ep.wrist[f0]])], policy.fast.encode(c0))]
            pred, _ = policy.decide(ep.instruction, past, now)
            for name, i in (("dx", 0), ("dy", 1), ("grip", 2)):
                if abs(c1[0, i]) > 0.3:
                    agree[name].append(bool(np.sign(c1[0, i]) == np.sign(pred[0, i])))
            err.append(float(np.abs(c1 - pred).mean()))
    return {k: round(float(np.mean(x)), 3) for k, x in agree.items()} | {"mae": round(float(np.mean(err)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a VLA model folder (emu3 build-vla's OUT/emu3-vla)")
    ap.add_argument("--episodes", type=int, default=25)
    ap.add_argument("--history", type=int, default=0, choices=(0, 1))
    args = ap.parse_args()
    policy = Policy(Emu3.from_pretrained(args.model), FASTTokenizer.from_pretrained(args.model))
    print("training seeds ", probe(policy, range(args.episodes), history=args.history))
    print("held-out seeds ", probe(policy, range(100_000, 100_000 + args.episodes), history=args.history))


if __name__ == "__main__":
    main()
