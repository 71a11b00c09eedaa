"""Serving under load: throughput and latency of `emu3 serve` at 1, 4 and 16 concurrent clients.

Starts `emu3 serve` as a separate process on a free local port (nothing leaves the machine) and has
C clients (threads, httpx) post text-to-image requests back to back, `--requests` in all per level,
each with its own seed. Reports images/s, p50 and p95 latency, errors (any non-200 counts), and the
server's resident memory after every round; every level runs `--rounds` times so that memory growth
across repeated runs shows.

Baseline, measured in the same run on the same model: static batching, the library generating the
same number of images (`Emu3.generate_images`) in fixed batches, at its best batch size (1, 2, 4, 8, 16
or 32) and thread count (1, or every core), the best of which is printed. That is what a server that
waits for a batch to fill and runs it to the end can reach at best, with every request already there
and none of HTTP's costs. The ratio is server images/s over that baseline's images/s.

    python benchmarks/bench_serve.py                       # the built-in model; about 4 minutes on 2 CPU cores
    python benchmarks/bench_serve.py --model DIR --requests 32
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_level(url: str, clients: int, requests: int, prompt: str, seed0: int) -> dict:
    latencies, errors, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def client():
        with httpx.Client(base_url=url, timeout=600) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = c.post("/v1/images/generations", json={"prompt": prompt, "seed": seed0 + i})
                dt = time.perf_counter() - t0
                with lock:
                    (latencies if r.status_code == 200 else errors).append(dt if r.status_code == 200 else
                                                                           r.status_code)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"images_per_s": len(lat) / wall, "p50": statistics.median(lat) if lat else float("nan"),
            "p95": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else float("nan"),
            "errors": len(errors), "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder (default: the built-in model)")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--prompt", default="two red circles above a blue square")
    args = ap.parse_args()

    from emu3.checkpoint import model_folder
    from emu3.pipeline import Emu3

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.harness
    from tests.harness import ServerProcess

    model = model_folder(args.model)  # default: the built-in model
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}")
    print(f"# model: {model}")

    emu = Emu3.from_pretrained(model)
    emu.generate_images([args.prompt], seed=0)  # warm-up
    print("| static batch | threads | images/s |\n|---|---|---|")
    base, best = 0.0, None
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for batch in (1, 2, 4, 8, 16, 32):
            t0 = time.perf_counter()
            emu.generate_images([args.prompt], n=args.requests, seed=1000, batch_size=batch)
            rate = args.requests / (time.perf_counter() - t0)
            print(f"| {batch} | {threads} | {rate:.2f} |", flush=True)
            if rate > base:
                base, best = rate, (batch, threads)
    del emu
    print(f"baseline (library, static batches of {best[0]} on {best[1]} threads, the best): {base:.2f} images/s")

    with ServerProcess(["--model", str(model), "--log-level", "warning", "--max-rows", "32",
                        "--max-queue", "256"]) as server:
        url, proc = server.url, server.proc
        run_level(url, 1, 2, args.prompt, 0)  # warm-up
        print("\n| clients | round | images/s | vs baseline | p50 latency (s) | p95 latency (s) | errors | "
              "server RSS (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        for clients in [int(x) for x in args.levels.split(",")]:
            for rnd in range(args.rounds):
                r = run_level(url, clients, args.requests, args.prompt, 10_000 * (rnd + 1))
                print(f"| {clients} | {rnd + 1} | {r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f}x | "
                      f"{r['p50']:.2f} | {r['p95']:.2f} | {r['errors']} | {rss_mb(proc.pid):.0f} |", flush=True)
        metrics = httpx.get(url + "/metrics").text
        steps = next(line for line in metrics.splitlines() if line.startswith("emu3_steps_total"))
        print(f"\n# {steps}")


if __name__ == "__main__":
    main()
