"""Training throughput: emu3's trainer vs a plain transformers `Trainer` on `LlamaForCausalLM` of the
same size, fed the same packed rows, in the same run (fp32, AdamW, cosine schedule, clip 1.0).

Ours trains through `emu3 train`'s loop (`emu3.train.trainer.train`): packed documents with
per-document attention masks, the weighted next-token loss computed in chunks. The baseline gets the
same rows as `input_ids` / `labels` (plain causal attention). Both run in fp32, then both under bf16
autocast (what `bf16=auto` picks on a CPU with native bf16 instructions). Reported: median seconds per
step after two warm-up steps, tokens per second (rows x length / step time), and each row's speed
against the fp32 baseline. Last, ours in bf16 again with `compile=on` (each decoder layer compiled).

    python benchmarks/bench_train.py            # about 4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from emu3.checkpoint import save_model
from emu3.data.loader import Loader, MixPolicy
from emu3.data.shards import FORMAT, VERSION, Record, write_index, write_shard
from emu3.format import Formatter
from emu3.model import Emu3LM, model_config
from emu3.reference import llama
from emu3.tokenizer import TextTokenizer
from emu3.train.config import make_config
from emu3.train.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tmp = Path(tempfile.mkdtemp())
    corpus = [f"a {c} {s} {w} the {c2} {s2}" for c in ("red", "blue", "green") for s in ("circle", "square")
              for w in ("above", "left of") for c2 in ("yellow", "grey") for s2 in ("star", "triangle")] * 10
    tok = TextTokenizer.train(corpus, 2048, 4096, min_frequency=1)
    tok.save_pretrained(tmp / "tok")
    rng = np.random.default_rng(0)  # text documents of random lengths: packing has real work to do
    records = [Record("text", {"text": rng.integers(0, tok.vocab.text_size, rng.integers(20, 300))})
               for _ in range(2000)]
    (tmp / "data").mkdir()
    entry = write_shard(tmp / "data", 0, records)
    write_index(tmp / "data", {"format": FORMAT, "version": VERSION, "shards": [{**entry, "inputs": len(records)}],
                               "vocab": {"text_size": tok.vocab.text_size, "codebook_size": 4096}})
    cfg_model = model_config("tiny", tok.vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0)
    model = Emu3LM(cfg_model)
    model.init_weights(torch.Generator().manual_seed(0))
    save_model(model, tmp / "init", tokenizer=tok)
    n_params = sum(p.numel() for p in model.parameters())

    # the same rows for the baseline: targets[i] = ids[i + 1] becomes labels[i + 1] = ids[i + 1]
    loader = Loader([(str(tmp / "data"), 1.0)], Formatter(tok), args.seq_len, args.batch, MixPolicy(), seed=0)
    rows = []
    for _ in range(args.steps):
        b = loader.next_batch()
        labels = torch.full_like(b.input_ids, -100)
        labels[:, 1:] = torch.where(b.targets[:, :-1] != -100, b.input_ids[:, 1:], -100)
        rows += [{"input_ids": i, "labels": lab} for i, lab in zip(b.input_ids, labels)]
    ref = llama(model)
    def baseline(bf16: bool = False) -> list[float]:
        stamps = []

        class Clock(TrainerCallback):
            def on_step_end(self, *a, **k):
                stamps.append(time.perf_counter())

        ref.load_state_dict(model.state_dict(), strict=True)  # start from the same weights each run
        targs = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=args.batch,
                                  max_steps=args.steps, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=2,
                                  weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10**6,
                                  save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                  dataloader_num_workers=0, seed=0, bf16=bf16)
        start = time.perf_counter()
        Trainer(model=ref, args=targs, train_dataset=rows, callbacks=[Clock()]).train()
        return np.diff([start] + stamps)[2:].tolist()

    def ours(bf16: str, compile: bool = False) -> list[float]:
        out = tmp / (bf16 + ("-compiled" if compile else ""))
        cfg = make_config("tiny-stage1", dict(model=str(tmp / "init"), data=str(tmp / "data"), out=str(out),
                                              steps=args.steps, warmup=2, seq_len=args.seq_len, batch_size=args.batch,
                                              save_every=10**6, lr=1e-3, min_lr=1e-4, dropout=0.0, bf16=bf16,
                                              compile=compile))
        train(cfg, progress=False)
        with open(out / "metrics.csv") as f:
            return [float(r["seconds"]) for r in csv.DictReader(f)][2:]

    # baseline, ours, baseline: the machine's drift shows in the two baseline runs; then both in bf16
    # autocast (weights and optimizer fp32), which `bf16=auto` picks on a CPU with native bf16
    theirs = baseline()
    t_ours = statistics.median(ours("off"))
    theirs_again = baseline()
    t_ref_bf16 = statistics.median(baseline(bf16=True))
    t_ours_bf16 = statistics.median(ours("on"))
    t_compiled = statistics.median(ours("on", compile=True))  # step 1 compiles; the median skips it

    tokens = args.batch * args.seq_len
    t_ref = min(statistics.median(theirs), statistics.median(theirs_again))  # the baseline's better run
    print(f"# emu3 trainer vs transformers {transformers.__version__} Trainer (LlamaForCausalLM); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {n_params / 1e6:.1f}M parameters, "
          f"{args.batch} x {args.seq_len} tokens per step, {args.steps} steps (median of steps 3+)")
    print("| trainer | s / step | tokens / s | ratio |")
    print("|---|---|---|---|")
    print(f"| transformers Trainer (better of 2 runs: {statistics.median(theirs):.3f}, "
          f"{statistics.median(theirs_again):.3f}) | {t_ref:.3f} | {tokens / t_ref:.0f} | 1.00x |")
    print(f"| emu3 | {t_ours:.3f} | {tokens / t_ours:.0f} | {t_ref / t_ours:.2f}x |")
    print(f"| transformers Trainer, bf16=True | {t_ref_bf16:.3f} | {tokens / t_ref_bf16:.0f} | "
          f"{t_ref / t_ref_bf16:.2f}x |")
    print(f"| emu3, bf16=on | {t_ours_bf16:.3f} | {tokens / t_ours_bf16:.0f} | {t_ref / t_ours_bf16:.2f}x |")
    print(f"| emu3, bf16=on compile=on | {t_compiled:.3f} | {tokens / t_compiled:.0f} | {t_ref / t_compiled:.2f}x |")


if __name__ == "__main__":
    main()
