"""How many CPU threads PyTorch uses: chosen from the work, not from the machine's core count.

PyTorch starts one OpenMP thread per core, and every parallel kernel ends at a barrier where the team
waits for its slowest member. When another process holds a core (a test run beside a command, a server
beside its clients), one member is descheduled for a whole time slice and the others spin: on a 2-core
machine beside two busy PyTorch processes, a (2, 64) x (64, 64) linear took 24 ms instead of 11 us
(issue 27). Small operations gain nothing from a second thread even on an idle machine, so they should
not risk that wait; large ones (an 8B model, a 720x720 image, a training batch) do gain, by about the
number of cores, and pay the barrier once per millisecond of work.

The policy (`auto`): one thread when the largest operation of the work is below `SMALL_FLOPS`, else
every core this process may run on (`os.sched_getaffinity`, not `os.cpu_count`, so a container or
`taskset` limit counts). `SMALL_FLOPS` comes from `benchmarks/bench_threads.py`, which times single
matmuls of growing size at 1 and 2 threads on an idle machine and beside one and two busy PyTorch
processes (docs/threads.md has the figures). An explicit choice always wins: `--threads N`, else
`EMU3_THREADS`, else `OMP_NUM_THREADS` (which PyTorch itself reads).

The work is described by the largest single operation's floating-point operations:
- a language model decoding `rows` sequences: 2 * rows * (its largest weight matrix);
- a vision tokenizer on an H x W image: its first convolution at full resolution, 2 * 9 * H * W * ch^2.
"""

from __future__ import annotations

import os

import torch

from .errors import InputError

# Below this many floating-point operations in the largest single operation, one thread is fastest or
# within a few percent idle, and many times faster beside other busy processes (docs/threads.md).
SMALL_FLOPS = 1e8
DECODE_ROWS = 16  # a typical decoding batch: 8 images with classifier-free guidance


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


def choose(flops: float, setting: int | str | None = None) -> int:
    """Threads for work whose largest single operation is `flops`."""
    n = explicit(setting)
    if n is not None:
        return n
    return 1 if flops < SMALL_FLOPS else cores()


def configure(flops: float, setting: int | str | None = None) -> int:
    """Set PyTorch's intra-op threads for this work (see `choose`) and return the number."""
    n = choose(flops, setting)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
