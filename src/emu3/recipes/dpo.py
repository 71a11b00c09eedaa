"""DPO on the built-in model's own images, preferences from the exact evaluator (issue: the paper's claim
that DPO on a model's own generations improves alignment), in four resumable steps:

1. candidates: K images per prompt for generation prompts drawn like `emu3 eval`'s but from a training
   seed (no prompt of either evaluation split is reused on purpose), sampled with the model's defaults;
2. preferences: each image scored by the exact generation check (`eval.bench.score_found`); a prompt with
   a correct and an incorrect image gives a preference record (prompt ids, the correct image's generated
   ids chosen, an incorrect one's rejected), written as a token dataset (`preference` records);
3. DPO: the paper's DPO stage (DPO loss with beta 0.5 plus 0.2 x the chosen sequences' next-token loss,
   cosine from a 5-step warm-up to a tenth of the peak; `tiny-dpo`) from the model for `--epochs` over
   the pairs in batches of 16, exported as a model folder;
4. scores: the exact generation score before and after on evaluation seeds, one figure per seed set (their
   spread is what sampling and prompts alone move).

`--cfg` samples candidates and scores at another guidance scale than the model's default (1: unguided, the
conditional distribution DPO trains directly; a weaker sampler with more failures to learn from);
`--pairs-per-prompt` takes up to that many disjoint correct/incorrect pairs of a prompt (the paper: one).

    python -m emu3.recipes.dpo OUT [--prompts 64] [--candidates 8] [--split selection|report] [--cfg 1]
        [--pairs-per-prompt 4] [--train lr=1e-4]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from ..data.shards import FORMAT, VERSION, Record, write_index, write_shard
from ..eval import bench
from ..eval.detect import detect
from ..fsutil import atomic_file

TRAIN_PROMPT_SEED = 7  # geneval_prompts(seed): the evaluation splits use 10,000+ and 110,000+
SPLITS = {split: bench.seed_sets(split) for split in bench.SPLITS}


def load(model: str | None, cfg: float | None):
    """The pipeline, at guidance scale `cfg` (None: the model's default)."""
    from ..pipeline import Emu3

    emu = Emu3.from_pretrained(model)
    if cfg is not None:
        emu.defaults.cfg_scale = cfg
    return emu


def candidates(model: str | None, out: Path, n_per_category: int, k: int, seed: int = TRAIN_PROMPT_SEED,
               cfg: float | None = None) -> list:
    """[(prompt, category, ok, request prompt ids, generated ids)] for K images of each prompt (cached in
    OUT/candidates.json)."""
    path = out / "candidates.json"
    if path.exists():
        return json.loads(path.read_text())
    emu = load(model, cfg)
    prompts = bench.geneval_prompts(n_per_category, seed)
    rows = []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start:start + 16]
        images = emu.generate_images([p.text for p in chunk], n=k, seed=1_000_000 + start * k, batch_size=16)
        for i, p in enumerate(chunk):
            ids = emu.image_request(p.text).prompt.tolist()
            for g in images[i * k:(i + 1) * k]:
                rows.append([p.text, p.category, bool(bench.score_found(p, detect(g.pixels))), ids, g.tokens.tolist()])
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rows))
    return rows


def preferences(rows: list, out: Path, vocab: dict, pairs_per_prompt: int = 1) -> dict:
    """OUT/preferences: a token dataset of preference records (as the paper: one per prompt, a best and a
    worst candidate; here a correct and an incorrect one); returns counts."""
    by_prompt: dict[str, list] = {}
    for text, _cat, ok, prompt, tokens in rows:
        by_prompt.setdefault(text, []).append((ok, prompt, tokens))
    records = []
    for items in by_prompt.values():
        good = [x for x in items if x[0]]
        bad = [x for x in items if not x[0]]
        for (_, prompt, chosen), (_, _, rejected) in list(zip(good, bad))[:pairs_per_prompt]:
            records.append(Record("preference", {"prompt": np.asarray(prompt, np.int64),
                                                 "chosen": np.asarray(chosen, np.int64),
                                                 "rejected": np.asarray(rejected, np.int64)}))
    folder = out / "preferences"
    folder.mkdir(parents=True, exist_ok=True)
    shard = {**write_shard(folder, 0, records), "inputs": len(records), "skipped": {}}
    write_index(folder, {"format": FORMAT, "version": VERSION, "vocab": vocab, "shards": [shard]})
    return {"prompts": len(by_prompt), "images": len(rows), "correct": sum(r[2] for r in rows), "pairs": len(records)}


def scores(model: str | None, seeds, n_per_category: int, cfg: float | None = None) -> list[float]:
    emu = load(model, cfg)
    return [bench.eval_generation(emu, n_per_category, s)["overall"] for s in seeds]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--model", help="default: the built-in model")
    ap.add_argument("--prompts", type=int, default=64, help="training prompts per category")
    ap.add_argument("--candidates", type=int, default=8, help="images per prompt (the paper: 8-10)")
    ap.add_argument("--epochs", type=float, default=2.0, help="passes over the preference pairs")
    ap.add_argument("--split", choices=list(SPLITS), default="selection")
    ap.add_argument("--eval-prompts", type=int, default=16, help="evaluation prompts per category and seed set")
    ap.add_argument("--cfg", type=float, help="guidance scale of the candidates and the scores (default: the "
                    "model's; 1: unguided)")
    ap.add_argument("--pairs-per-prompt", type=int, default=1, help="disjoint correct/incorrect pairs per prompt")
    ap.add_argument("--train", nargs="*", default=[], help="key=value overrides of the tiny-dpo recipe")
    args = ap.parse_args(argv)
    import torch

    from ..checkpoint import model_folder
    from ..tokenizer import TextTokenizer
    from ..train.config import make_config
    from ..train.trainer import export, train

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = str(model_folder(args.model))
    if args.cfg is not None and not args.cfg >= 1:
        raise SystemExit(f"--cfg is a guidance scale of at least 1 (1: unguided), got {args.cfg}")
    if args.pairs_per_prompt < 1:
        raise SystemExit(f"--pairs-per-prompt is at least 1, got {args.pairs_per_prompt}")
    settings = {"cfg": args.cfg, "prompts": args.prompts, "candidates": args.candidates,
                "pairs_per_prompt": args.pairs_per_prompt}
    kept = out / "settings.json"
    if kept.exists() and json.loads(kept.read_text()) != settings:
        raise SystemExit(f"{out} holds candidates drawn with {kept.read_text()}, not {settings}; use another folder")
    with atomic_file(kept) as tmp:
        tmp.write_text(json.dumps(settings))
    rows = candidates(start, out, args.prompts, args.candidates, cfg=args.cfg)
    tok = TextTokenizer.from_pretrained(start)
    counts = preferences(rows, out, {"text_size": tok.vocab.text_size, "codebook_size": tok.vocab.codebook_size},
                         args.pairs_per_prompt)
    print(f"candidates: {counts}", flush=True)
    steps = max(6, math.ceil(args.epochs * counts["pairs"] / 16))
    cfg = make_config("tiny-dpo", {"model": start, "data": [str(out / "preferences")], "out": str(out / "run"),
                                   "batch_size": "8", "grad_accum": "2", "steps": str(steps), "warmup": "5",
                                   **dict(o.split("=", 1) for o in args.train)})
    summary = train(cfg, progress=False)
    print(f"dpo: {summary}", flush=True)
    tuned = out / "model"
    if not (tuned / "config.json").exists():
        export(out / "run", tuned)
    result_path = out / f"scores-{args.split}.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    seeds = SPLITS[args.split]
    for name, folder in (("before", start), ("after", str(tuned))):
        if name not in result:
            result[name] = scores(folder, seeds, args.eval_prompts, args.cfg)
            with atomic_file(result_path) as tmp:
                tmp.write_text(json.dumps({**result, "seeds": seeds, "counts": counts, "cfg": args.cfg,
                                           "train": json.loads(cfg.to_json())}, indent=2))
    for name in ("before", "after"):
        s = np.array(result[name])
        print(f"{name}: exact generation score {s.mean():.3f} (per seed set {', '.join(f'{x:.3f}' for x in s)}; "
              f"sd {s.std(ddof=1):.3f})")


if __name__ == "__main__":
    main()
