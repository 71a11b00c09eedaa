"""How many CPU threads PyTorch uses: chosen from the work and from what else the machine is doing.

PyTorch starts one OpenMP thread per core, and every parallel kernel ends at a barrier where the team
waits for its slowest member. On an idle machine that is right for all but the smallest operations. When
other processes keep the cores busy (a test run beside a command, a server beside its clients), a member
is descheduled for a whole time slice while the others spin: on a 2-core machine beside two busy PyTorch
processes, a (2, 64) x (64, 64) linear took 24 ms instead of 11 us, and `emu3 generate --n 8` 84 s
instead of 17 s with one thread (issue 27). Only operations of a billion floating-point operations or more
gain from a second thread there.

The policy (`auto`), from `benchmarks/bench_threads.py` (docs/threads.md has the figures):
- the largest single operation of the work is below `TINY_FLOPS`: one thread (a second one gains nothing
  even on an idle machine);
- at or above `LARGE_FLOPS`: every core this process may run on (`os.sched_getaffinity`, not
  `os.cpu_count`, so a container or `taskset` limit counts);
- in between: every core on an idle machine; when other processes use the cores (measured over
  `PROBE_SECONDS` from /proc/stat, once, when the work starts), the cores they leave free, at least one.
An explicit choice always wins: `--threads N`, else `EMU3_THREADS`, else `OMP_NUM_THREADS` (which PyTorch
itself reads).

The work is described by its largest single operation, in floating-point operations:
- a language model decoding `rows` sequences: 2 * rows * (its largest weight matrix);
- a vision tokenizer on an H x W image: its first convolution at full resolution, 2 * 9 * H * W * ch^2.
"""

from __future__ import annotations

import os
import time

import torch

from .errors import InputError

TINY_FLOPS = 1e6  # a (16, 64) x (64, 256) matmul: 2 threads 1.04x on an idle machine
LARGE_FLOPS = 1e9  # 2 threads lost beside a busy process up to 0.5 GFLOP, won 1.8x at 2.1 GFLOP
DECODE_ROWS = 16  # a typical decoding batch: 8 images with classifier-free guidance
PROBE_SECONDS = 0.1


def cores() -> int:
    """CPUs this process may run on (the affinity mask, where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def lm_flops(model, rows: int = DECODE_ROWS) -> float:
    """The largest matmul of one decoding step of a language model (Emu3LM) over `rows` sequences (the
    embedding is a lookup, not a matmul)."""
    largest = max(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "embed" not in name)
    return 2.0 * rows * largest


def vq_flops(vq, height: int, width: int) -> float:
    """The largest convolution of a vision tokenizer (VisionVQ) on one H x W frame (3x3, ch -> ch)."""
    ch = vq.config.ch
    return 2.0 * 9 * height * width * ch * ch


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process) from Linux's /proc."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait
    with open("/proc/self/stat") as f:
        mine = f.read().rsplit(")", 1)[1].split()
    return busy, int(mine[11]) + int(mine[12])  # utime + stime (fields 14 and 15)


def busy_elsewhere(seconds: float = PROBE_SECONDS) -> float:
    """Cores' worth of CPU time that other processes used over the next `seconds` (0.0 where /proc is not
    there to tell)."""
    try:
        busy0, mine0 = _cpu_ticks()
        time.sleep(seconds)
        busy1, mine1 = _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return 0.0
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, ((busy1 - busy0) - (mine1 - mine0)) / hz / seconds)


def explicit(setting: int | str | None = None) -> int | None:
    """The user's choice, if any: the argument, else EMU3_THREADS, else OMP_NUM_THREADS."""
    for value, where in ((setting, "--threads"), (os.environ.get("EMU3_THREADS"), "EMU3_THREADS"),
                         (os.environ.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS")):
        if value is None or value == "" or value == "auto":
            continue
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}={value!r}: expected a whole number of threads >= 1, or auto") from None
        if n < 1 or n > 1024:
            raise InputError(f"{where}={n}: threads must be between 1 and 1024")
        return n
    return None


def choose(flops: float, setting: int | str | None = None, others: float | None = None) -> int:
    """Threads for work whose largest single operation is `flops`; `others`: cores' worth of CPU that other
    processes use (default: measured now, only when the work is neither tiny nor large)."""
    n = explicit(setting)
    if n is not None:
        return n
    if flops < TINY_FLOPS:
        return 1
    if flops >= LARGE_FLOPS:
        return cores()
    if others is None:
        others = busy_elsewhere()
    return max(1, min(cores(), int(cores() - others + 0.5)))


def configure(flops: float, setting: int | str | None = None, others: float | None = None) -> int:
    """Set PyTorch's intra-op threads for this work (see `choose`) and return the number."""
    n = choose(flops, setting, others)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
