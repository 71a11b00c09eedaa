"""Text-to-image generation speed: emu3's engine vs the official recipe, same weights, same run.

Baseline: transformers' `generate` on LlamaForCausalLM (Emu3's decoder) with the official logits
processors: UnbatchedClassifierFreeGuidanceLogitsProcessor (a second forward per token for the
negative prompt, with its own cache) and PrefixConstrainedLogitsProcessor with Emu3's helper
(reference section 4.1), sampling with top_k 2048, CFG 3.0. Ours: `emu3.generate.Engine` with the
same settings (CFG as one doubled batch, template constraint, visual-only head). Greedy runs of both
are compared token by token first, so the two really compute the same thing.

Both models use Emu3's real vocabulary (184,622 ids: Qwen's BPE, shipped by the dev extra `dashscope`,
+ 211 control + 32,768 visual ids). Decoding one token at a time is bound by reading the weights, so
what a method skips matters in proportion to its share of the bytes:

- "8b" (the default, first): the released 8B's proportions scaled down. Width 512 with the 8B's GQA
  ratio (4 query heads per key/value head), MLP ratio (14336 / 4096) and vocabulary, and as many
  decoder blocks as it takes for the output head to weigh what it weighs in the 8B against its blocks
  (0.76B head against 6.98B in blocks: 9.8 % of the weights): 256 blocks of 512, about 1B parameters.
- "head-heavy": the earlier 8-block model of width 512, whose head is about 80 % of the bytes, so
  skipping most of it flatters a visual-only head; kept as the second row to show how much.

For each, the bytes each method reads per generated token give the speed-up a bandwidth-bound decoder
could reach (official: two passes over blocks and the full head; emu3: one pass for both CFG rows over
the blocks and the 32,768-id visual head), printed beside the measured one.

Also prints the KV-cache bytes per token and the memory of one 720x720 image with CFG for the
released 8B configuration (computed), checked against the cache actually allocated in the small run.

    python benchmarks/bench_generate.py --shapes 8b  # about 20 minutes on 2 CPU cores
    python benchmarks/bench_generate.py --shapes head-heavy --grid 32 --batches 1 8   # the earlier table
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from emu3.format import Formatter
from emu3.generate import Engine, Request, Sampling, image_template
from emu3.model import Emu3LM, KVCache, model_config
from emu3.reference import llama, official_prefix_fn
from emu3.tokenizer import TextTokenizer


def released_text_tokenizer() -> TextTokenizer:
    """Emu3's text tokenizer: emu3.tiktoken is Qwen's qwen.tiktoken, which dashscope (dev extra) ships."""
    import base64
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("dashscope")
    if spec is None:
        raise SystemExit("needs the dev extras (pip install -e '.[dev]') for Qwen's BPE file")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in path.read_bytes().splitlines())}
    return TextTokenizer(ranks, 32768)


SHAPES = {  # hidden, intermediate, heads, key/value heads, blocks (None: the 8B's head-to-blocks ratio)
    "8b": (512, 1792, 8, 2, None),
    "head-heavy": (512, 1408, 8, 2, 8),
}


def shape_config(name: str, vocab):
    """A model config of the named proportions over the real vocabulary."""
    hidden, inter, heads, kv, blocks = SHAPES[name]
    if blocks is None:
        big = model_config("emu3-8b")
        ratio = head_params(big) / block_params(big)
        blocks = round(head_params(model_config("tiny", vocab, hidden_size=hidden)) / ratio /
                       block_params(model_config("tiny", vocab, hidden_size=hidden, intermediate_size=inter,
                                                 num_attention_heads=heads, num_key_value_heads=kv,
                                                 num_hidden_layers=1)))
    return model_config("tiny", vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                        num_attention_heads=heads, num_key_value_heads=kv, attention_dropout=0.0)


def block_params(c) -> int:
    """Weights of the decoder blocks: attention (q, o full; k, v per key/value head) + SwiGLU + 2 norms."""
    kv = c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    return c.num_hidden_layers * (2 * c.hidden_size ** 2 + 2 * c.hidden_size * kv
                                  + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)


def head_params(c) -> int:
    return c.vocab_size * c.hidden_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--grid", type=int, default=12, help="h = w of the generated code grid")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--decoding", nargs="+", default=["plain", "jacobi"], choices=["plain", "jacobi"],
                    help="emu3's decodings, each timed in the same run as the official recipe")
    ap.add_argument("--window", type=int, default=8, help="Jacobi window")
    args = ap.parse_args()
    import transformers

    tok = released_text_tokenizer()
    print(f"# emu3 engine vs transformers {transformers.__version__} generate + official processors; torch "
          f"{torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    print("| model | batch | official (s) | official images/min | " + " | ".join(
        f"emu3 {d} (s, images/min, speed-up, forward passes)" for d in args.decoding) + " | bytes-read bound |")
    print("|---|---|---|---|" + "---|" * len(args.decoding) + "---|")
    for name in args.shapes:
        run_shape(name, tok, args.grid, args.batches, args.decoding, args.window)
    footnote(tok)


def run_shape(name: str, tok, grid: int, batches: list[int], decodings: list[str], window: int) -> None:
    from transformers import LogitsProcessorList, PrefixConstrainedLogitsProcessor
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    torch.manual_seed(0)
    v = tok.vocab
    cfg = shape_config(name, v)
    model = Emu3LM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    ref = llama(model)
    fmt = Formatter(tok)
    h = w = grid
    steps = h * (w + 1) + 3
    negative = fmt.negative_prompt((h, w), "low quality")
    prompts = [f"a red circle above {i} blue squares" for i in range(max(batches))]
    body = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers"))
    head, visual_head = cfg.vocab_size * cfg.hidden_size, v.codebook_size * cfg.hidden_size
    official_bytes, our_bytes = 2 * 4 * (body + head), 4 * (body + visual_head)
    print(f"# {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters ({cfg.num_hidden_layers} "
          f"blocks of {cfg.hidden_size}: {body / 1e6:.0f}M; head {head / 1e6:.0f}M over {cfg.vocab_size} ids = "
          f"{head / (body + head):.1%} of the weights), {h}x{w} grid = {steps} generated tokens per image, CFG 3.0, "
          f"top_k 2048; fp32 bytes read per token: official {official_bytes / 1e6:.0f} MB (two passes, full "
          f"head), emu3 {our_bytes / 1e6:.0f} MB (one pass, visual head)", flush=True)

    def official(batch, sample: bool):
        rows = [fmt.generation_prompt(p, (h, w)) for p in prompts[:batch]]
        n = max(map(len, rows))
        ids = torch.tensor([[v.pad] * (n - len(r)) + r.tolist() for r in rows])
        mask = (ids != v.pad).long()
        neg = torch.tensor(np.stack([negative] * batch))
        procs = LogitsProcessorList([UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, ref, neg),
                                     PrefixConstrainedLogitsProcessor(official_prefix_fn(v, h, w), num_beams=1)])
        out = ref.generate(ids, attention_mask=mask, logits_processor=procs, do_sample=sample,
                           top_k=2048 if sample else None, max_new_tokens=steps, eos_token_id=v.eos,
                           pad_token_id=v.pad)
        return out[:, n:]

    engine = Engine(model, v)

    def ours(batch, sample: bool, decoding: str = "plain"):
        s = Sampling(1.0, 2048, 1.0) if sample else Sampling(0.0)
        reqs = [Request(fmt.generation_prompt(p, (h, w)), image_template(v, h, w), negative=negative,
                        cfg_scale=3.0, visual=s, seed=i) for i, p in enumerate(prompts[:batch])]
        return engine.generate(reqs, decoding=decoding, window=window)

    with torch.no_grad():
        a = official(1, False)[0].tolist()
        while a and a[-1] == v.pad:  # generate pads a finished row to the batch's length
            a.pop()
        for decoding in decodings:
            b = ours(1, False, decoding)[0].tokens.tolist()
            same = a == b
            print(f"# {name} greedy check ({decoding}): whole sequences identical = {same} ({len(a)} and {len(b)} "
                  "tokens)", flush=True)
            assert same, f"greedy tokens of {decoding} decoding differ from the official recipe"
        for batch in batches:
            t0 = time.perf_counter()
            official(batch, True)
            t_ref = time.perf_counter() - t0
            cells = []
            for decoding in decodings:
                t0 = time.perf_counter()
                ours(batch, True, decoding)
                t_ours = time.perf_counter() - t0
                cells.append(f"{decoding} {t_ours:.1f} s, {60 * batch / t_ours:.1f}/min, {t_ref / t_ours:.2f}x, "
                             f"{engine.passes} passes")
            print(f"| {name} | {batch} | {t_ref:.1f} | {60 * batch / t_ref:.1f} | " + " | ".join(cells)
                  + f" | {official_bytes / our_bytes:.2f}x |", flush=True)


def footnote(tok) -> None:
    fmt = Formatter(tok)
    cfg = model_config("tiny", tok.vocab)
    big = model_config("emu3-8b")
    per_token = KVCache.bytes_per_token(big, torch.bfloat16)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Emu3LM(big).parameters())
    prompt_len = len(fmt.generation_prompt("a portrait of young girl. masterpiece, film grained, best quality.",
                                           (90, 90)))
    tokens = 2 * (prompt_len + 8193)  # CFG rows x (prompt + 90x90 image)
    small_cache = KVCache(cfg, 2, 100)
    assert small_cache.nbytes == KVCache.bytes_per_token(cfg, torch.float32) * 2 * 100
    print(f"# 8B ({n_params / 1e9:.2f}B parameters), bf16: KV cache {per_token} bytes per token per row; one 720x720 "
          f"image with CFG = {tokens} cached tokens = {tokens * per_token / 2**30:.2f} GiB; weights "
          f"{n_params * 2 / 2**30:.1f} GiB; peak about {(n_params * 2 + tokens * per_token) / 2**30:.1f} GiB "
          f"(the small run's cache matched the formula: {small_cache.nbytes} bytes for 2 rows x 100 tokens)")


if __name__ == "__main__":
    main()
