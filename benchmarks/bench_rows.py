"""Parallel rows (ZipAR-style, not lossless) against plain decoding on the built-in model, same run, same
prompts.

For `emu3 eval`'s generation prompts, at batch 1 and 8: forward passes per image and seconds per image
(best of `--repeats`), plain and parallel rows at each window; then the exact generation score
(`emu3 eval`'s, per-category mean) of plain decoding and each window over `--score-prompts` prompts per
category at three seed sets of a split, beside what a constant image gets. Choose the window on the
selection split, report it on the report split.

    python benchmarks/bench_rows.py --split selection            # about 10 minutes on 2 CPU cores
    python benchmarks/bench_rows.py --split report --windows 2
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from emu3 import Emu3
from emu3.eval import bench

SPLITS = {"selection": (10_000, 10_500, 11_000), "report": (110_000, 110_500, 111_000)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the built-in model)")
    ap.add_argument("--images", type=int, default=16, help="images timed per setting")
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--split", choices=list(SPLITS), default="selection")
    ap.add_argument("--score-prompts", type=int, default=16, help="prompts per category for the scores (0: skip)")
    ap.add_argument("--scores-only", action="store_true", help="skip the timings")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the built-in model decodes fastest on one thread (docs/threads.md)
    emu = Emu3.from_pretrained(args.model)
    engine = emu.engine
    settings = [("plain", {"decoding": "plain"})] + [(f"rows, window {k}", {"decoding": "rows", "window": k})
                                                     for k in args.windows]
    print(f"# parallel rows vs plain: {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, 1 thread; grid {emu.grid()}")
    if not args.scores_only:
        prompts = [p.text for p in bench.geneval_prompts(max(1, args.images // 6 + 1), 10_000)][:args.images]
        requests = [emu.image_request(p, seed=i) for i, p in enumerate(prompts)]
        print("\n| batch | decoding | passes per image | s / image | vs plain |")
        print("|---|---|---|---|---|")
        for batch in (1, 8):
            base = None
            for name, kw in settings:
                best, passes = float("inf"), 0
                for _ in range(args.repeats):
                    t0, p = time.perf_counter(), 0
                    for i in range(0, len(requests), batch):
                        engine.generate(requests[i:i + batch], **kw)
                        p += engine.passes
                    best = min(best, (time.perf_counter() - t0) / len(requests))
                    passes = p / (len(requests) / batch)
                base = base or best
                print(f"| {batch} | {name} | {passes:.1f} | {best:.3f} | {base / best:.2f}x |", flush=True)
    if args.score_prompts:
        seeds = SPLITS[args.split]
        print(f"\nexact generation score, {args.split} split, seed sets {seeds}, {args.score_prompts} prompts per "
              "category each:\n")
        print("| decoding | score | per seed set | sd |")
        print("|---|---|---|---|")
        base = []
        for name, kw in settings:
            emu.defaults.decoding = kw["decoding"]
            emu.defaults.rows_window = kw.get("window", emu.defaults.rows_window)
            runs = [bench.eval_generation(emu, args.score_prompts, seed) for seed in seeds]
            s = np.array([r["overall"] for r in runs])
            base = [r["baselines"]["overall"] for r in runs]
            print(f"| {name} | {s.mean():.3f} | {', '.join(f'{x:.3f}' for x in s)} | {s.std(ddof=1):.3f} |",
                  flush=True)
        emu.defaults.decoding = "plain"
        print(f"\n(on these prompts a constant image scores {np.mean([b['constant image'] for b in base]):.3f}, "
              f"a random training image {np.mean([b['random image'] for b in base]):.3f})")

if __name__ == "__main__":
    main()
