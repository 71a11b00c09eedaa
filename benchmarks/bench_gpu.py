"""A 720x720 image with CFG from the released 8B configuration on one GPU: emu3's decode loops against
the official recipe, in one run, one table.

The model is the released Emu3-Gen configuration (8.0B parameters, 184,622-id vocabulary) with random
bf16 weights (no download: decoding one token costs the same whatever the weights hold). Each image is
the 90x90 code grid of 720x720 (8,193 generated tokens), CFG 3.0, top-k 2048 (the released defaults).

Rows:
- static: `emu3.graphs.StaticLoop` with compile (fixed shapes, CUDA graphs, no host synchronisation),
  whole images at batch 1 and 8, after a warm-up of a few steps with the same shapes (compilation);
- eager: the general core (`Engine.generate(static=False)`), plain decoding, the first `--short` tokens;
- jacobi: speculative Jacobi decoding on the general core, the first `--short` tokens; with random
  weights its acceptance says little about a trained model's (see docs/generation.md for the built-in
  model's);
- official: transformers' generate on LlamaForCausalLM holding the same weights, with the official
  processors (unbatched CFG: a second forward per token with its own cache; the prefix constraint), the
  first `--short` tokens at batch 1.
Rows that run `--short` tokens give seconds per image extrapolated from their tokens per second
(marked ~). The floor is the bytes a step must read (the weights it uses and the KV cache columns it
attends to) over the card's memory bandwidth.

    python benchmarks/bench_gpu.py              # one H100/H200: about 6 minutes
    python benchmarks/bench_gpu.py --tiny       # a small configuration on the CPU, to test the script
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from emu3.generate import Decoder, Engine, Request, Sampling, image_template
from emu3.graphs import StaticLoop
from emu3.model import Emu3LM, KVCache, model_config
from emu3.tokenizer import Vocabulary

BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "H20": 4.0e12, "A100": 2.0e12, "B200": 8.0e12}  # bytes/s, SXM


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def random_model(cfg, dev: torch.device, dtype: torch.dtype) -> Emu3LM:
    with torch.device("meta"):
        model = Emu3LM(cfg)
    model = model.to_empty(device=dev).to(dtype)
    model.init_weights(torch.Generator(dev).manual_seed(0))
    return model.eval()


def prompts(v: Vocabulary, batch: int, grid: int, rng: np.random.Generator):
    """Prompt ids of a real prompt's length: BOS, 24 text ids, BOI, a 4-id size header, IMG (random text ids:
    the speed does not depend on which); the negative prompt is the header alone."""
    header = rng.integers(0, v.text_size, 4)
    pos = [np.concatenate([[v.bos], rng.integers(0, v.text_size, 24), [v.boi], header, [v.img]]) for _ in range(batch)]
    neg = np.concatenate([[v.bos, v.boi], header, [v.img]])
    return [Request(p, image_template(v, grid, grid), negative=neg, cfg_scale=3.0, visual=Sampling(1.0, 2048),
                    seed=i) for i, p in enumerate(pos)]


def shorten(reqs: list[Request], tokens: int) -> list[Request]:
    return [Request(r.prompt, r.template[:tokens], negative=r.negative, cfg_scale=r.cfg_scale, visual=r.visual,
                    seed=r.seed) for r in reqs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a small configuration on the CPU (tests the script)")
    ap.add_argument("--grid", type=int, help="h = w of the code grid (default 90: 720x720; --tiny: 8)")
    ap.add_argument("--batches", type=int, nargs="+", help="images per batch (default 1 8; --tiny: 1 2)")
    ap.add_argument("--short", type=int, help="tokens the eager, jacobi and official rows run (default 384; "
                                              "--tiny: 24)")
    ap.add_argument("--window", type=int, default=16, help="Jacobi window")
    ap.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s for the floor (default: the card's)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["eager", "jacobi", "official"])
    args = ap.parse_args()
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    grid = args.grid or (8 if args.tiny else 90)
    batches = args.batches or ([1, 2] if args.tiny else [1, 8])
    short = args.short or (24 if args.tiny else 384)
    v = Vocabulary()
    cfg = (model_config("tiny", v, hidden_size=128, intermediate_size=352, num_hidden_layers=4, attention_dropout=0.0)
           if args.tiny else model_config("emu3-8b", attention_dropout=0.0))
    name = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or platform.machine()
    bw = args.bandwidth * 1e9 if args.bandwidth else next((b for k, b in BANDWIDTH.items() if k in name), None)
    t0 = time.perf_counter()
    model = random_model(cfg, dev, dtype)
    sync(dev)
    n_params = sum(p.numel() for p in model.parameters())
    steps = grid * (grid + 1) + 3
    print(f"# {name}, torch {torch.__version__}: {n_params / 1e9:.2f}B parameters ({cfg.num_hidden_layers} blocks of "
          f"{cfg.hidden_size}, {cfg.vocab_size} ids), {str(dtype)[6:]}, random weights (made in "
          f"{time.perf_counter() - t0:.0f} s); {grid}x{grid} grid = {steps} generated tokens per image, CFG 3.0, "
          f"top-k 2048", flush=True)
    engine = Engine(model, v)
    rng = np.random.default_rng(0)
    size = torch.finfo(dtype).bits // 8
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers")) * size
    visual_head = v.codebook_size * cfg.hidden_size * size
    full_head = cfg.vocab_size * cfg.hidden_size * size
    per_token = KVCache.bytes_per_token(cfg, dtype)

    def floor(batch: int, prompt: int, official: bool = False) -> float | None:
        """Seconds per image a bandwidth-bound decoder needs: per step, the weights it reads and the cache
        columns it attends to (the static loop: all of them; official: the filled ones, for both CFG rows)."""
        if bw is None:
            return None
        if official:  # two passes (conditional, unconditional), full head, cache read up to the step
            per_step = 2 * (blocks + full_head) + 2 * per_token * (prompt + steps / 2)
        else:
            per_step = blocks + visual_head + 2 * batch * per_token * (prompt + steps)
        return steps * per_step / bw / batch

    print("| run | batch | tokens run | prefill (s) | decode (s) | s/image | images/min | tokens/s | passes | "
          "peak GiB | floor s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def row(label, batch, tokens, prefill, decode, passes, prompt, official=False):
        per_image = (prefill + decode * steps / tokens) / batch
        mark = "" if tokens == steps else "~"
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        f = floor(batch, prompt, official)
        print(f"| {label} | {batch} | {tokens} | {prefill:.2f} | {decode:.2f} | {mark}{per_image:.2f} | "
              f"{mark}{60 / per_image:.2f} | {batch * tokens / decode:.1f} | {passes} | {peak:.1f} | "
              f"{'-' if f is None else f'{f:.2f}'} |", flush=True)

    def prefill_time(reqs) -> float:
        sync(dev)
        t = time.perf_counter()
        core = Decoder(engine, sum(r.rows() for r in reqs), engine.check(reqs))
        core.add(reqs)
        sync(dev)
        del core
        return time.perf_counter() - t

    def reset():
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    loop = StaticLoop(engine, compile=True)
    for batch in batches:
        reqs = prompts(v, batch, grid, rng)
        prompt = max(len(r.prompt) for r in reqs)
        try:
            reset()
            t = time.perf_counter()
            loop.generate(reqs, limit=4)  # compile and capture with the whole run's shapes
            sync(dev)
            warm = time.perf_counter() - t
            pre = prefill_time(reqs)
            t = time.perf_counter()
            out = loop.generate(reqs)
            sync(dev)
            total = time.perf_counter() - t
            assert all(len(r.tokens) == steps and r.finished for r in out)
            row(f"static, compiled (warm-up {warm:.0f} s)", batch, steps, pre, total - pre, engine.passes, prompt)
        except Exception as e:  # noqa: BLE001 (the table goes on; the row says why)
            print(f"| static, compiled | {batch} | failed: {type(e).__name__}: {str(e)[:300]} |", flush=True)
    reqs = prompts(v, 1, grid, rng)
    prompt = len(reqs[0].prompt)
    part = shorten(reqs, short)
    for label, kw in (("eager", dict(static=False)), ("jacobi", dict(decoding="jacobi", window=args.window))):
        if label in args.skip:
            continue
        try:
            reset()
            engine.generate(shorten(reqs, 8), **kw)  # warm-up
            pre = prefill_time(part)
            t = time.perf_counter()
            engine.generate(part, **kw)
            sync(dev)
            total = time.perf_counter() - t
            row(f"{label} (general core)", 1, short, pre, total - pre, engine.passes, prompt)
        except Exception as e:  # noqa: BLE001
            print(f"| {label} | 1 | failed: {type(e).__name__}: {str(e)[:300]} |", flush=True)
    if "official" not in args.skip:
        try:
            official(model, dtype, v, reqs[0], grid, short, dev, row, prompt)
        except Exception as e:  # noqa: BLE001
            print(f"| official | 1 | failed: {type(e).__name__}: {str(e)[:300]} |", flush=True)
    print(f"# KV cache {per_token} bytes per token per row; weights read per step: blocks {blocks / 2**30:.2f} GiB, "
          f"visual head {visual_head / 2**30:.2f} GiB (full head {full_head / 2**30:.2f} GiB); bandwidth "
          f"{'unknown (--bandwidth)' if bw is None else f'{bw / 1e12:.2f} TB/s'}")


def official(model, dtype, v, req, grid, short, dev, row, prompt) -> None:
    """transformers' generate with the official processors, the first `short` tokens, batch 1."""
    from transformers import LogitsProcessorList, PrefixConstrainedLogitsProcessor
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    from emu3.reference import llama, official_prefix_fn

    ref = llama(model, share=True)  # our tensors, no second copy of the weights
    ids = torch.as_tensor(req.prompt, device=dev)[None]
    neg = torch.as_tensor(req.negative, device=dev)[None]

    def run(tokens):
        procs = LogitsProcessorList([UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, ref, neg),
                                     PrefixConstrainedLogitsProcessor(official_prefix_fn(v, grid, grid), num_beams=1)])
        return ref.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=procs, do_sample=True,
                            top_k=2048, max_new_tokens=tokens, min_new_tokens=tokens, eos_token_id=v.eos,
                            pad_token_id=v.pad)

    with torch.no_grad():
        greedy = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                              min_new_tokens=16, logits_processor=LogitsProcessorList([
                                  UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, ref, neg),
                                  PrefixConstrainedLogitsProcessor(official_prefix_fn(v, grid, grid), num_beams=1)]),
                              pad_token_id=v.pad)[0, ids.shape[1]:].tolist()
        mine = StaticLoop(Engine(model, v)).generate([Request(req.prompt, req.template, negative=req.negative,
                                                              cfg_scale=3.0, visual=Sampling(0.0))], limit=16)
        same = sum(a == b for a, b in zip(greedy, mine[0].tokens.tolist()))
        print(f"# greedy check, the first 16 tokens: {same} of 16 the same as the official recipe's ({str(dtype)[6:]}; "
              "the tests check whole sequences in fp32)", flush=True)
        run(4)  # warm-up
        sync(dev)
        t = time.perf_counter()
        run(1)
        sync(dev)
        pre = time.perf_counter() - t  # prefill (both prompts) and one token
        t = time.perf_counter()
        run(short)
        sync(dev)
        total = time.perf_counter() - t
    row("official (transformers generate + processors)", 1, short, pre, total - pre, short, prompt, official=True)


if __name__ == "__main__":
    main()
