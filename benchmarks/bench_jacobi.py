"""Speculative Jacobi decoding against plain decoding on the built-in model, same run, same prompts.

For `emu3 eval`'s generation prompts (selection seeds), at batch 1 and 8: forward passes per image (after
the prefill), tokens accepted per pass, and seconds per image (best of `--repeats`), plain and jacobi at
each window; then the exact generation score (`emu3 eval`'s, per-category mean) of plain and jacobi
sampling over `--score-prompts` prompts per category at three seed sets of the report split (their spread
says what sampling noise alone moves), since jacobi must draw from plain decoding's distribution. Greedy
runs of both are checked to give identical tokens first.

    python benchmarks/bench_jacobi.py                 # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from emu3 import Emu3
from emu3.eval import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the built-in model)")
    ap.add_argument("--images", type=int, default=16, help="images timed per setting")
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 16], help="the first one is scored")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--score-prompts", type=int, default=16, help="prompts per category for the scores (0: skip)")
    ap.add_argument("--scores-only", action="store_true", help="skip the timings")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the built-in model decodes fastest on one thread (docs/threads.md)
    emu = Emu3.from_pretrained(args.model)
    engine = emu.engine
    prompts = [p.text for p in bench.geneval_prompts(max(1, args.images // 6 + 1), 10_000)][:args.images]
    requests = [emu.image_request(p, seed=i) for i, p in enumerate(prompts)]
    greedy = [emu.image_request(p, seed=i, temperature=0.0) for i, p in enumerate(prompts[:4])]
    same = [r.tokens.tolist() for r in engine.generate(greedy)] == \
        [r.tokens.tolist() for r in engine.generate(greedy, decoding="jacobi", window=max(args.windows))]
    print(f"# {platform.machine()}, torch {torch.__version__}, 1 thread; greedy tokens identical: {same}")
    assert same, "greedy jacobi tokens differ from plain decoding's"
    print("| batch | decoding | window | passes per image | tokens per pass and image | s / image | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for batch in () if args.scores_only else (1, 8):
        base = None
        for decoding, window in [("plain", 0)] + [("jacobi", w) for w in args.windows]:
            best, passes = float("inf"), 0
            for _ in range(args.repeats):
                t0, passes = time.perf_counter(), 0
                for i in range(0, len(requests), batch):
                    engine.generate(requests[i:i + batch], decoding=decoding, window=window or 16)
                    passes += engine.passes
                best = min(best, time.perf_counter() - t0)
            per_image = best / len(requests)
            base = base or per_image
            calls = -(-len(requests) // batch)
            per_call = passes / calls  # the passes it takes to write the images of one batch
            tokens = sum(r.steps() for r in requests) / len(requests)
            print(f"| {batch} | {decoding} | {window or '-'} | {per_call:.1f} | {tokens / per_call:.2f} | "
                  f"{per_image:.3f} | {base / per_image:.2f}x |", flush=True)
    if args.score_prompts:
        seeds = (110_000, 110_500, 111_000)  # the report split's prompts (emu3 eval --split report) and two more sets
        print(f"\n| decoding | exact generation score, seed sets {', '.join(map(str, seeds))} | mean | sd |\n"
              "|---|---|---|---|")
        for decoding, window in [("plain", 0), ("jacobi", args.windows[0])]:
            emu.defaults.decoding, emu.defaults.jacobi_window = decoding, window or 16
            scores = [bench.eval_generation(emu, args.score_prompts, s, batch_size=8)["overall"] for s in seeds]
            print(f"| {decoding}{f' (window {window})' if window else ''} | {', '.join(f'{x:.3f}' for x in scores)} "
                  f"| {np.mean(scores):.3f} | {np.std(scores, ddof=1):.3f} |", flush=True)

if __name__ == "__main__":
    main()
