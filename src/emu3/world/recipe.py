"""The recipe of the built-in model, as one resumable command (`emu3 build-demo OUT`):

1. `train-vq demo`: the vision tokenizer, on world images and 16-frame clips;
2. a byte-level BPE trained on the world's captions, questions and stories;
3. token shards: captioned images, QA, videos and stories (emu3.world.build);
4. `train demo`: the language model on their mixture (weights below);
5. export (16-bit floats), `emu3_defaults.json`, `RECIPE.json` (every setting and seed), evaluation.

Every stage leaves its output under OUT and is skipped when it is already there, so a stopped run
continues where it stopped (training stages resume from their newest checkpoint).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

MIX = {"images": 0.55, "qa": 0.25, "videos": 0.12, "stories": 0.08}
COUNTS = {"images": 100_000, "qa": 50_000, "videos": 8000, "stories": 6000}
BPE_SIZE = 768
DEFAULTS = {"positive_suffix": "", "negative_prompt": "", "cfg_scale": 3.0, "image_top_k": 64,
            "image_temperature": 1.0, "text_temperature": 0.0, "max_new_tokens": 16, "video_fps": 8.0}


def build_demo(out: str, vq_steps: int | None = None, lm_steps: int | None = None, counts: dict | None = None,
               seed: int = 0, progress: bool = True, log=print) -> Path:
    from ..tokenizer import TextTokenizer
    from ..train.config import make_config
    from ..train.trainer import train
    from ..train.vq import make_vq_config, train_vq
    from ..vision import VisionTokenizer
    from .build import build, corpus

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = counts or COUNTS
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").exists() else {}

    def stage(name, done, fn):
        if done():
            log(f"{name}: done already")
            return
        t0 = time.time()
        fn()
        times[name] = times.get(name, 0.0) + time.time() - t0
        (out / "times.json").write_text(json.dumps(times, indent=1))
        log(f"{name}: {times[name] / 60:.1f} min")

    vq_over = [f"out={out / 'vq'}", f"seed={seed}"]
    if vq_steps:  # the warm-up keeps its share of the run
        stage_vq = make_vq_config("demo", [])
        share = lambda n: n * vq_steps // stage_vq.steps  # noqa: E731
        vq_over += [f"steps={vq_steps}", f"ae_warmup={share(stage_vq.ae_warmup)}", f"warmup={share(stage_vq.warmup)}",
                    f"save_every={max(1, share(stage_vq.save_every))}"]
    vq_cfg = make_vq_config("demo", vq_over)
    stage("vision tokenizer", lambda: (out / "vq" / "tokenizer" / "model.safetensors").exists(),
          lambda: train_vq(vq_cfg, progress))
    stage("text tokenizer", lambda: (out / "text" / "tokenizer.json").exists(),
          lambda: TextTokenizer.train(corpus(seed), BPE_SIZE, 1024, min_frequency=2).save_pretrained(out / "text"))
    vision = VisionTokenizer.from_pretrained(out / "vq" / "tokenizer", frame_batch=64)
    text = TextTokenizer.from_pretrained(out / "text")
    stage("datasets", lambda: all((out / "data" / k / "index.json").exists() for k in counts),
          lambda: build(out / "data", vision, text, counts, seed, progress=progress))
    data = ",".join(f"{out / 'data' / k}:{w}" for k, w in MIX.items() if counts.get(k))
    overrides = {"data": data, "text_tokenizer": str(out / "text"), "out": str(out / "lm"), "seed": seed}
    if lm_steps:  # a shorter run keeps the recipe's proportions
        stage_lm = make_config("demo", {})
        overrides.update(steps=lm_steps, warmup=stage_lm.warmup * lm_steps // stage_lm.steps,
                         save_every=max(1, stage_lm.save_every * lm_steps // stage_lm.steps))
    lm_cfg = make_config("demo", overrides)
    stage("language model", lambda: (out / "lm" / f"ckpt-{lm_cfg.steps:08d}" / "COMMITTED").exists(),
          lambda: train(lm_cfg, progress))
    recipe = {"seed": seed, "vq": json.loads((out / "vq" / "config.json").read_text()), "bpe_size": BPE_SIZE,
              "dataset_counts": counts, "mix": MIX, "lm": json.loads((out / "lm" / "config.json").read_text()),
              "stage_minutes": {k: round(v / 60, 1) for k, v in times.items()},
              "step_minutes": {"vision tokenizer": _step_minutes(out / "vq"),
                               "language model": _step_minutes(out / "lm")},
              "torch": torch.__version__,
              "command": f"emu3 build-demo {out}" + (f" --vq-steps {vq_steps}" if vq_steps else "")
                         + (f" --lm-steps {lm_steps}" if lm_steps else "")}
    final = package(out, out / "emu3-demo", recipe)
    log(f"wrote {final}")
    return final


def _step_minutes(run: Path) -> float:
    """Minutes a training run spent in its steps, summed over every session that ran it (a stage
    stopped by a kill never records its wall time, but its metrics log has every step's)."""
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return round(sum(float(r["seconds"]) for r in csv.DictReader(f)) / 60, 1)


def package(out: str | os.PathLike, dest: str | os.PathLike, recipe: dict | None = None,
            checkpoint: str | os.PathLike | None = None) -> Path:
    """The model folder the package ships: a build's LM checkpoint (default: the newest) in 16-bit
    floats with its text and vision tokenizers, DEFAULTS and, when given, the recipe."""
    import tempfile

    from ..checkpoint import load_model, save_model
    from ..tokenizer import TextTokenizer
    from ..train.trainer import export
    from ..vision import VisionTokenizer

    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        export(out / "lm", Path(tmp) / "fp32", checkpoint=checkpoint)
        model = load_model(Path(tmp) / "fp32").half()
    vq16 = VisionTokenizer.from_pretrained(out / "vq" / "tokenizer")
    vq16.model.half()
    extra = {"vision_tokenizer": {"preprocessor_config.json": vq16.processor.to_dict()},
             "emu3_defaults.json": DEFAULTS}
    if recipe is not None:
        extra["RECIPE.json"] = recipe
    save_model(model, dest, tokenizer=TextTokenizer.from_pretrained(out / "text"), vq=vq16.model, extra_files=extra)
    return Path(dest)
