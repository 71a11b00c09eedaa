"""Text-to-image generation speed: emu3's engine vs the official recipe, same weights, same run.

Baseline: transformers' `generate` on LlamaForCausalLM (Emu3's decoder) with the official logits
processors: UnbatchedClassifierFreeGuidanceLogitsProcessor (a second forward per token for the
negative prompt, with its own cache) and PrefixConstrainedLogitsProcessor with Emu3's helper
(reference section 4.1), sampling with top_k 2048, CFG 3.0. Ours: `emu3.generate.Engine` with the
same settings (CFG as one doubled batch, template constraint, visual-only head). Greedy runs of both
are compared token by token first, so the two really compute the same thing.

The small model uses Emu3's real vocabulary (184,622 ids: Qwen's BPE, shipped by the dev extra
`dashscope`, + 211 control + 32,768 visual ids), so the output head costs what it costs in Emu3.
Decoding on a CPU is bound by reading the weights; the script prints the bytes each method reads
per generated token.

Also prints the KV-cache bytes per token and the memory of one 720x720 image with CFG for the
released 8B configuration (computed), checked against the cache actually allocated in the small run.

    python benchmarks/bench_generate.py              # about 5 minutes on 2 CPU cores
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, default=32, help="h = w of the generated code grid")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    import transformers
    from transformers import LogitsProcessorList, PrefixConstrainedLogitsProcessor
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    torch.manual_seed(0)
    tok = released_text_tokenizer()
    v = tok.vocab
    cfg = model_config("tiny", v, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, attention_dropout=0.0)
    model = Emu3LM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    ref = llama(model)
    fmt = Formatter(tok)
    h = w = args.grid
    steps = h * (w + 1) + 3
    negative = fmt.negative_prompt((h, w), "low quality")
    prompts = [f"a red circle above {i} blue squares" for i in range(max(args.batches))]
    body = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers"))
    print(f"# emu3 engine vs transformers {transformers.__version__} generate + official processors; torch "
          f"{torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    head, visual_head = cfg.vocab_size * cfg.hidden_size, v.codebook_size * cfg.hidden_size
    print(f"# model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters (decoder blocks "
          f"{body / 1e6:.0f}M, head {head / 1e6:.0f}M over {cfg.vocab_size} ids), "
          f"{h}x{w} grid = {steps} generated tokens per image, CFG 3.0, top_k 2048")
    print(f"# fp32 weight bytes read per generated token: official {2 * 4 * (body + head) / 1e6:.0f} MB "
          f"(two passes, full head), emu3 {4 * (body + visual_head) / 1e6:.0f} MB (one pass, visual head)")

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

    def ours(batch, sample: bool):
        s = Sampling(1.0, 2048, 1.0) if sample else Sampling(0.0)
        reqs = [Request(fmt.generation_prompt(p, (h, w)), image_template(v, h, w), negative=negative,
                        cfg_scale=3.0, visual=s, seed=i) for i, p in enumerate(prompts[:batch])]
        return Engine(model, v).generate(reqs)

    with torch.no_grad():
        a, b = official(1, False), ours(1, False)
        same = a[0].tolist()[:len(b[0].tokens)] == b[0].tokens.tolist()
        print(f"# greedy check: identical tokens = {same}")
        assert same, "greedy tokens differ from the official recipe"
        print("| batch | official (s) | official images/min | emu3 (s) | emu3 images/min | speed-up |")
        print("|---|---|---|---|---|---|")
        for batch in args.batches:
            t0 = time.perf_counter()
            official(batch, True)
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            ours(batch, True)
            t_ours = time.perf_counter() - t0
            print(f"| {batch} | {t_ref:.1f} | {60 * batch / t_ref:.1f} | {t_ours:.1f} | {60 * batch / t_ours:.1f} | "
                  f"{t_ref / t_ours:.2f}x |", flush=True)

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
