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

import platform

import torch
from bench_jacobi import baselines, options, scores, timed_requests, timings  # the same protocol as Jacobi decoding's

from emu3 import Emu3
from emu3.eval import bench


def main() -> None:
    ap = options(__doc__, [1, 2, 4])
    ap.add_argument("--split", choices=list(bench.SPLITS), default="selection")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the built-in model decodes fastest on one thread (docs/threads.md)
    emu = Emu3.from_pretrained(args.model)
    settings = [("plain", {"decoding": "plain"})] + [(f"rows, window {k}", {"decoding": "rows", "window": k})
                                                     for k in args.windows]
    print(f"# parallel rows vs plain: {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, 1 thread; grid {emu.grid()}")
    if not args.scores_only:
        requests = timed_requests(emu, args.images)
        print("\n| batch | decoding | passes per image | s / image | vs plain |")
        print("|---|---|---|---|---|")
        for batch in (1, 8):
            for name, passes, per_image, speedup in timings(emu.engine, requests, batch, settings, args.repeats):
                print(f"| {batch} | {name} | {passes:.1f} | {per_image:.3f} | {speedup:.2f}x |", flush=True)
    if args.score_prompts:
        seeds = bench.seed_sets(args.split)
        print(f"\nexact generation score, {args.split} split, seed sets {seeds}, {args.score_prompts} prompts per "
              "category each:\n")
        print("| decoding | score | per seed set | sd |")
        print("|---|---|---|---|")
        for name, s in scores(emu, settings, seeds, args.score_prompts):
            print(f"| {name} | {s.mean():.3f} | {', '.join(f'{x:.3f}' for x in s)} | {s.std(ddof=1):.3f} |",
                  flush=True)
        print("\n" + baselines(seeds, args.score_prompts))


if __name__ == "__main__":
    main()
