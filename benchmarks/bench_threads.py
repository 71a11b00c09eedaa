"""CPU threads on an idle and a busy machine: where one thread is fastest, and what emu3's policy gains.

Three conditions, measured in the same run: idle, beside one and beside two other busy PyTorch processes
(each loops `x = tanh(x @ w)` on a (64, 512) x (512, 512) matmul with PyTorch's default threads: what a
test run, a second command or a server's clients look like to the scheduler).

1. The rule (`emu3.threads.TINY_FLOPS`, `LARGE_FLOPS`): single matmuls (16, d) x (d, 4d) of growing size,
   timed at 1 thread and at every core; the ratio says from which size a second thread pays, idle and busy.
2. End to end (median of `--rounds` alternating runs): the built-in model's images/s (`--n 8` images of one
   prompt, as `emu3 generate`) and the built-in VLA policy's actions/s (`emu3 eval-vla`), with PyTorch's
   default threads (one per core) against the policy's choice (`emu3.threads.choose`, which measures the
   other processes' load).

    python benchmarks/bench_threads.py            # 5-15 minutes on 2 cores (the default threads beside
                                                  # busy processes are the slow part)
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

LOADER = ("import torch\nw = torch.randn(512, 512) / 23\nx = torch.randn(64, 512)\n"
          "while True:\n    x = torch.tanh(x @ w)\n")


class Busy:
    """`n` other busy PyTorch processes (default threads) for the duration of a with-block."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "EMU3_THREADS")}
        self.procs = [subprocess.Popen([sys.executable, "-c", LOADER], env=env) for _ in range(self.n)]
        time.sleep(2.0 if self.n else 0.0)  # imported and looping
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def timed(fn, seconds: float) -> float:
    """Mean seconds per call over `seconds` (after one warm-up call). The mean, not the median: beside busy
    processes most calls are fast and some wait a whole time slice at a barrier, and the mean is what a
    long computation pays."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def matmul_sweep(widths, seconds: float, cores: int) -> list[tuple]:
    rows = []
    for d in widths:
        x, w = torch.randn(16, d), torch.randn(d, 4 * d) / d ** 0.5
        flops = 2.0 * 16 * d * 4 * d
        per = {}
        for n in (1, cores):
            torch.set_num_threads(n)
            per[n] = timed(lambda x=x, w=w: x @ w, seconds)
        rows.append((d, flops, per[1], per[cores]))
    return rows


def end_to_end(threads: int, images: int, episodes: int) -> tuple[float, float]:
    from emu3.action import FASTTokenizer
    from emu3.assets import builtin_model, builtin_vla
    from emu3.pipeline import Emu3
    from emu3.vla import Policy, evaluate

    torch.set_num_threads(threads)
    emu = Emu3.from_pretrained(builtin_model())
    emu.generate_images(["two red circles above a blue square"], n=2, seed=0)  # warm-up
    t = time.perf_counter()
    emu.generate_images(["two red circles above a blue square"], n=images, seed=0)
    images_per_s = images / (time.perf_counter() - t)
    vla = builtin_vla()
    policy = Policy(Emu3.from_pretrained(vla), FASTTokenizer.from_pretrained(vla))
    r = evaluate(policy, episodes, horizon=40)
    return images_per_s, r["actions_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--seconds", type=float, default=1.5, help="per matmul timing")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="other busy processes")
    ap.add_argument("--rounds", type=int, default=3, help="end-to-end runs per setting, alternating (median shown)")
    ap.add_argument("--skip-sweep", action="store_true", help="only the end-to-end part")
    args = ap.parse_args()
    from emu3 import threads
    from emu3.assets import builtin_model
    from emu3.checkpoint import load_model

    cores = threads.cores()
    flops = threads.lm_flops(load_model(builtin_model()))
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    print(f"# torch {torch.__version__}, {cores} cores ({isa}, capability {torch.backends.cpu.get_cpu_capability()}); "
          f"TINY_FLOPS {threads.TINY_FLOPS:.0e}, LARGE_FLOPS {threads.LARGE_FLOPS:.0e}; the built-in model's largest "
          f"decoding matmul: {flops / 1e6:.1f} MFLOP")
    if not args.skip_sweep:
        print("\n## 1. One matmul (16, d) x (d, 4d): milliseconds at 1 thread and at every core\n")
        print(f"| busy processes | d | MFLOP | 1 thread (ms, mean) | {cores} threads (ms, mean) | {cores} vs 1 |")
        print("|---|---|---|---|---|---|")
        for busy in args.busy:
            with Busy(busy):
                for d, f, one, many in matmul_sweep(args.widths, args.seconds, cores):
                    print(f"| {busy} | {d} | {f / 1e6:.1f} | {one * 1e3:.3f} | {many * 1e3:.3f} | {one / many:.2f}x |",
                          flush=True)
    print(f"\n## 2. The built-in models: images/s ({args.images} images, 64x64, CFG) and VLA actions/s "
          f"({args.episodes} episodes)\n")
    print("| busy processes | others' load seen by the probe (cores) | threads | images/s | actions/s | vs default |")
    print("|---|---|---|---|---|---|")
    for busy in args.busy:
        with Busy(busy):
            others = threads.busy_elsewhere()
            policy = threads.choose(flops, "auto", others=others)
            runs: dict[int, list] = {cores: [], policy: []}
            for _ in range(args.rounds):
                for n in runs:
                    runs[n].append(end_to_end(n, args.images, args.episodes))
            default, ours = (tuple(float(np.median([r[i] for r in runs[n]])) for i in (0, 1)) for n in (cores, policy))
            print(f"| {busy} | {others:.2f} | {cores} (PyTorch default) | {default[0]:.2f} | {default[1]:.1f} | |",
                  flush=True)
            if policy != cores:
                print(f"| {busy} | | {policy} (emu3 auto) | {ours[0]:.2f} | {ours[1]:.1f} | images "
                      f"{ours[0] / default[0]:.2f}x, actions {ours[1] / default[1]:.2f}x |", flush=True)
            else:
                print(f"| {busy} | | {policy} (emu3 auto: the same) | | | 1.00x |", flush=True)


if __name__ == "__main__":
    main()
