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
import dataclasses
import platform
import time

import numpy as np
import torch

from emu3 import Emu3
from emu3.eval import bench
from emu3.generate import Sampling


def options(doc: str, windows: list[int]) -> argparse.ArgumentParser:
    """The options this benchmark and bench_rows.py share."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the built-in model)")
    ap.add_argument("--images", type=int, default=16, help="images timed per setting")
    ap.add_argument("--windows", type=int, nargs="+", default=windows, help="bench_jacobi scores the first")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--score-prompts", type=int, default=16, help="prompts per category for the scores (0: skip)")
    ap.add_argument("--scores-only", action="store_true", help="skip the timings")
    return ap


def timed_requests(emu, n: int) -> list:
    """n of `emu3 eval`'s generation prompts (selection seeds) as image requests with the model's defaults."""
    prompts = [p.text for p in bench.geneval_prompts(max(1, n // 6 + 1), 10_000)][:n]
    return [emu.image_request(p, seed=i) for i, p in enumerate(prompts)]


def timings(engine, requests: list, batch: int, settings: list, repeats: int):
    """Per setting (name, Engine.generate's keywords), at this batch size: (name, forward passes per batch,
    seconds per image (best of `repeats`), speed-up over the first setting)."""
    base = None
    for name, kw in settings:
        best, passes = float("inf"), 0
        for _ in range(repeats):
            t0, passes = time.perf_counter(), 0
            for i in range(0, len(requests), batch):
                engine.generate(requests[i:i + batch], **kw)
                passes += engine.passes
            best = min(best, time.perf_counter() - t0)
        per_image = best / len(requests)
        base = base or per_image
        yield name, passes / -(-len(requests) // batch), per_image, base / per_image


def scores(emu, settings: list, seeds, n: int):
    """Per setting, (name, the exact generation score at each seed set, n prompts per category)."""
    d = emu.defaults
    for name, kw in settings:
        d.decoding = kw["decoding"]
        d.jacobi_window = d.rows_window = kw.get("window", 16)
        yield name, np.array([bench.eval_generation(emu, n, s, batch_size=8)["overall"] for s in seeds])
    d.decoding = "plain"


def baselines(seeds, n: int) -> str:
    """What a constant and a random image score on the same prompts (means over the seed sets)."""
    base = [bench.generation_baselines(bench.geneval_prompts(n, s)) for s in seeds]
    return (f"(on these prompts a constant image scores {np.mean([b['constant image'] for b in base]):.3f}, "
            f"a random training image {np.mean([b['random image'] for b in base]):.3f})")


def main() -> None:
    args = options(__doc__, [8, 16]).parse_args()
    torch.set_num_threads(1)  # the built-in model decodes fastest on one thread (docs/threads.md)
    emu = Emu3.from_pretrained(args.model)
    engine = emu.engine
    requests = timed_requests(emu, args.images)
    greedy = [dataclasses.replace(r, visual=Sampling(0.0)) for r in requests[:4]]
    same = [r.tokens.tolist() for r in engine.generate(greedy)] == \
        [r.tokens.tolist() for r in engine.generate(greedy, decoding="jacobi", window=max(args.windows))]
    print(f"# {platform.machine()}, torch {torch.__version__}, 1 thread; greedy tokens identical: {same}")
    assert same, "greedy jacobi tokens differ from plain decoding's"
    print("| batch | decoding | window | passes per image | tokens per pass and image | s / image | speed-up |")
    print("|---|---|---|---|---|---|---|")
    settings = [("plain", {"decoding": "plain"})] + [(f"jacobi {w}", {"decoding": "jacobi", "window": w})
                                                     for w in args.windows]
    tokens = sum(r.steps() for r in requests) / len(requests)
    for batch in () if args.scores_only else (1, 8):
        for name, per_call, per_image, speedup in timings(engine, requests, batch, settings, args.repeats):
            decoding, _, window = name.partition(" ")
            print(f"| {batch} | {decoding} | {window or '-'} | {per_call:.1f} | {tokens / per_call:.2f} | "
                  f"{per_image:.3f} | {speedup:.2f}x |", flush=True)
    if args.score_prompts:
        seeds = bench.seed_sets("report")
        print(f"\n| decoding | exact generation score, seed sets {', '.join(map(str, seeds))} | mean | sd |\n"
              "|---|---|---|---|")
        scored = [("plain", {"decoding": "plain"}),
                  (f"jacobi (window {args.windows[0]})", {"decoding": "jacobi", "window": args.windows[0]})]
        for name, s in scores(emu, scored, seeds, args.score_prompts):
            print(f"| {name} | {', '.join(f'{x:.3f}' for x in s)} | {s.mean():.3f} | {s.std(ddof=1):.3f} |",
                  flush=True)
        print("\n" + baselines(seeds, args.score_prompts))

if __name__ == "__main__":
    main()
