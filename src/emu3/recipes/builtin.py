"""The recipe of the built-in shapes-world model, as one resumable command (`emu3 build-demo OUT`):

1. `train-vq demo`: the vision tokenizer, on world images and 16-frame clips;
2. a byte-level BPE trained on the world's captions, questions and stories;
3. token shards: captioned images, QA, videos and stories (emu3.world.build);
4. the language model in parts (PARTS: one row per part, its training stage and mixture), each from
   the previous part's weights with a fresh warm-up and cosine (added when part 1's 2,400 steps proved
   too few, and kept while each part gained; a seventh with videos weighing 0.37 did not: README).
   Parts 2 and 3 repeat part 1's mixture (`demo-2`); part 4's QA answers weigh 8 (`demo-4`); from part 5
   on, the QA share is the `reasoned` dataset (built then): the same questions, answered by first naming
   the scene's objects from left to right ("red circle: one, blue square: one, green circle: two, so
   two"); part 6 adds 16,000 clips (built then), weighs videos 0.25 instead of 0.12 and extends clips
   from 1-3 latent frames (`demo-6`); part 7 (`demo-7`) trains on reasoned QA over 50,000 new scenes
   from the question generator that gives no answer away (built then).
5. export (16-bit floats), `emu3_defaults.json`, `RECIPE.json` (every setting and seed), evaluation.

Every stage leaves its output under OUT and is skipped when it is already there, so a stopped run
continues where it stopped (training stages resume from their newest checkpoint).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .stages import STAGES

MIX = {"images": 0.55, "qa": 0.25, "videos": 0.12, "stories": 0.08}
COUNTS = {"images": 100_000, "qa": 50_000, "videos": 8000, "stories": 6000, "reasoned": 50_000,
          "more_videos": 16_000, "balanced": 50_000}
# from part 5 (`demo-5`) on: the QA share answers with reasons (emu3.world.scenes.questions, reasons=True)
MIX_REASONED = {("reasoned" if k == "qa" else k): w for k, w in MIX.items()}
# part 6 (`demo-6`): clips 8,000-23,999 join the first 8,000 (data/more/videos) and the video share grows
MIX_VIDEO = {"images": 0.45, "reasoned": 0.22, "videos": 0.08, "more/videos": 0.17, "stories": 0.08}
# part 7 (`demo-7`): reasoned QA on 50,000 new scenes (records 50,000-99,999) from the question generator that
# gives no answer away (relation questions in both orders of a pair, existence half present): parts 1-6 had
# learnt that "left of" / "above" meant yes, so relation answers stayed at the blind rule's level
MIX_BALANCED = {"images": 0.42, "balanced/reasoned": 0.27, "videos": 0.07, "more/videos": 0.16, "stories": 0.08}
BPE_SIZE = 768


@dataclass(frozen=True)
class Part:
    """One language-model part: its training stage, its mixture, and the dataset (a COUNTS key) that a
    stage of its own builds just before it, if any."""

    preset: str
    mix: dict
    adds: str | None = None


# the datasets a later part adds: COUNTS key -> (folder under OUT/data, the stage's name)
ADDED = {"reasoned": ("reasoned", "reasoned QA dataset"), "more_videos": ("more/videos", "more video clips"),
         "balanced": ("balanced/reasoned", "balanced reasoned QA dataset")}
PARTS = (Part("demo", MIX), Part("demo-2", MIX), Part("demo-2", MIX), Part("demo-4", MIX),
         Part("demo-5", MIX_REASONED, adds="reasoned"), Part("demo-6", MIX_VIDEO, adds="more_videos"),
         Part("demo-7", MIX_BALANCED, adds="balanced"))
# `emu3 build-demo` runs the parts of the shipped model (7); `--parts N` stops earlier or goes on, and parts past
# len(PARTS) repeat the last row
DEMO_PARTS = 7
# video_top_k 1: part 6 extends videos greedily, 0.50 / 0.53 of objects placed on two clip sets where top-k 16 has
# 0.44 / 0.48 (README, "The built-in model")
DEFAULTS = {"positive_suffix": "", "negative_prompt": "", "cfg_scale": 3.0, "image_top_k": 16,
            "image_temperature": 1.0, "text_temperature": 0.0, "max_new_tokens": 48, "video_fps": 8.0,
            "video_top_k": 1}


def build_demo(out: str, vq_steps: int | None = None, lm_steps: int | None = None, counts: dict | None = None,
               seed: int = 0, parts: int | None = None, progress: bool = True, log=print) -> Path:
    from ..errors import InputError
    from ..tokenizer import TextTokenizer
    from ..train.config import make_config
    from ..train.trainer import export, train
    from ..train.vq import make_vq_config, train_vq
    from ..vision import VisionTokenizer
    from ..world.build import build, corpus

    parts = DEMO_PARTS if parts is None else parts
    if parts < 1:
        raise InputError(f"--parts must be at least 1 (part 1 is the `demo` stage); got {parts}")
    counts = counts or COUNTS
    plan = [PARTS[min(k, len(PARTS) - 1)] for k in range(parts)]  # plan[k - 1]: part k
    for k, part in enumerate(plan, 1):
        if part.adds and not counts.get(part.adds):
            raise InputError(f"part {k} trains on the {ADDED[part.adds][1]}: counts needs a {part.adds!r} entry")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage, times = _stages(out, log)

    vq_over = [f"out={out / 'vq'}", f"seed={seed}"]
    if vq_steps:
        vq_over += [f"{k}={v}" for k, v in _shortened(make_vq_config("demo", []), vq_steps).items()]
    vq_cfg = make_vq_config("demo", vq_over)
    stage("vision tokenizer", lambda: (out / "vq" / "tokenizer" / "model.safetensors").exists(),
          lambda: train_vq(vq_cfg, progress))
    stage("text tokenizer", lambda: (out / "text" / "tokenizer.json").exists(),
          lambda: TextTokenizer.train(corpus(seed), BPE_SIZE, 1024, min_frequency=2).save_pretrained(out / "text"))
    vision = VisionTokenizer.from_pretrained(out / "vq" / "tokenizer", frame_batch=64)
    text = TextTokenizer.from_pretrained(out / "text")
    first = {k: n for k, n in counts.items() if k not in ADDED}  # later stages' data
    stage("datasets", lambda: all((out / "data" / k / "index.json").exists() for k in first),
          lambda: build(out / "data", vision, text, first, seed, progress=progress))
    overrides = {"data": _data(out, plan[0].mix, counts), "text_tokenizer": str(out / "text"), "out": str(out / "lm"),
                 "seed": seed}
    if lm_steps:
        overrides.update(_shortened(make_config(plan[0].preset, {}, stages=STAGES), lm_steps))
    lm_cfg = make_config(plan[0].preset, overrides, stages=STAGES)
    stage("language model", lambda: (out / "lm" / f"ckpt-{lm_cfg.steps:08d}" / "COMMITTED").exists(),
          lambda: train(lm_cfg, progress))
    # parts 2..N, each from the previous part's weights with a fresh warm-up and cosine (stage and folder
    # names as part 2 first had them, so that older builds resume)
    run, step_minutes, parts_cfg = out / "lm", {"vision tokenizer": _step_minutes(out / "vq"),
                                                "language model": _step_minutes(out / "lm")}, {}
    for k, part in enumerate(plan[1:], 2):
        prev, start = run, out / f"lm-part{k - 1}"
        stage("language model export" + (f", part {k - 1}" if k > 2 else ""),
              lambda start=start: (start / "config.json").exists(), lambda prev=prev, start=start: export(prev, start))
        if part.adds:
            folder, name = ADDED[part.adds]
            stage(name, lambda folder=folder: (out / "data" / folder / "index.json").exists(),
                  lambda add=part.adds: _build_added(out, vision, text, add, counts, seed, progress))
        run = out / f"lm{k}"
        over = {**overrides, "data": _data(out, part.mix, counts), "out": str(run), "model": str(start),
                "seed": seed + k - 1}
        if lm_steps:
            over.update(_shortened(make_config(part.preset, {}, stages=STAGES), lm_steps))
        cfg_k = make_config(part.preset, over, stages=STAGES)
        stage(f"language model, part {k}",
              lambda run=run, n=cfg_k.steps: (run / f"ckpt-{n:08d}" / "COMMITTED").exists(),
              lambda cfg_k=cfg_k: train(cfg_k, progress))
        parts_cfg[f"lm_part{k}"] = _json(run / "config.json")
        step_minutes[f"language model, part {k}"] = _step_minutes(run)
    # the mixtures: part 1's, then each part's where it changes
    mixes = {"mix": plan[0].mix, **{f"mix_from_part{k}": p.mix for k, p in enumerate(plan, 1)
                                    if k > 1 and p.mix != plan[k - 2].mix}}
    recipe = {"seed": seed, "vq": _json(out / "vq" / "config.json"), "bpe_size": BPE_SIZE,
              "dataset_counts": {k: n for k, n in counts.items() if k in first or any(p.adds == k for p in plan)},
              **mixes, "lm": _json(out / "lm" / "config.json"),
              **parts_cfg,
              "stage_minutes": {k: round(v / 60, 1) for k, v in times.items()}, "step_minutes": step_minutes,
              "torch": torch.__version__,
              "command": f"emu3 build-demo {out}" + (f" --vq-steps {vq_steps}" if vq_steps else "")
                         + (f" --lm-steps {lm_steps}" if lm_steps else "")
                         + (f" --parts {parts}" if parts != DEMO_PARTS else "")}
    final = package(out, out / "emu3-demo", recipe, lm=run.name)
    log(f"wrote {final}")
    return final


def _data(out: Path, mix: dict, counts: dict) -> str:
    """The `data` setting of a mixture: dataset folders under OUT/data with their weights, leaving out
    those with no records (a folder's counts key is its own name, or its ADDED key)."""
    key = {folder: k for k, (folder, _) in ADDED.items()}
    return ",".join(f"{out / 'data' / name}:{w}" for name, w in mix.items() if counts.get(key.get(name, name)))


def _build_added(out: Path, vision, text, key: str, counts: dict, seed: int, progress: bool) -> None:
    """The dataset a later part adds: the QA answered with reasons, the same over the scenes after those
    (records reasoned .. reasoned + balanced - 1), or clips the first datasets did not draw (records videos
    .. videos + more_videos - 1 of the same seeded stream)."""
    from ..world.build import build

    if key == "reasoned":
        build(out / "data", vision, text, {"reasoned": counts["reasoned"]}, seed, progress=progress)
    elif key == "balanced":  # new scenes: the records after the first reasoned dataset's
        build(out / "data" / "balanced", vision, text, {"reasoned": counts["balanced"]}, seed, progress=progress,
              first=counts["reasoned"])
    else:
        build(out / "data" / "more", vision, text, {"videos": counts["more_videos"]}, seed, progress=progress,
              first=counts["videos"])


def _stages(out: Path, log):
    """A runner `stage(name, done, fn)` that skips stages whose `done()` holds and adds each stage's wall
    time to OUT/times.json (the dict it returns alongside)."""
    times = _json(out / "times.json") if (out / "times.json").exists() else {}

    def stage(name, done, fn):
        if done():
            log(f"{name}: done already")
            return
        t0 = time.time()
        fn()
        times[name] = times.get(name, 0.0) + time.time() - t0
        (out / "times.json").write_text(json.dumps(times, indent=1))
        log(f"{name}: {times[name] / 60:.1f} min")

    return stage, times


def _step_minutes(run: Path) -> float:
    """Minutes a training run spent in its steps, summed over every session that ran it (a stage
    stopped by a kill never records its wall time, but its metrics log has every step's)."""
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return round(sum(float(r["seconds"]) for r in csv.DictReader(f)) / 60, 1)


def package(out: str | os.PathLike, dest: str | os.PathLike, recipe: dict | None = None, extra: dict | None = None,
            lm: str = "lm", exported: str | os.PathLike | None = None) -> Path:
    """The model folder the package ships: the newest checkpoint of the build's run OUT/`lm` (or a folder
    `export` already wrote, `exported`) in 16-bit floats with the build's text and vision tokenizers
    (OUT/text, OUT/vq/tokenizer), DEFAULTS, the recipe when given, and `extra` files (name -> JSON)."""
    import tempfile

    from ..checkpoint import load_model, save_model
    from ..tokenizer import TextTokenizer
    from ..train.trainer import export
    from ..vision import VisionTokenizer

    out = Path(out)
    if exported is not None:
        model = load_model(exported).half()
    else:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            export(out / lm, Path(tmp) / "fp32")
            model = load_model(Path(tmp) / "fp32").half()
    vq16 = VisionTokenizer.from_pretrained(out / "vq" / "tokenizer")
    vq16.model.half()
    extra = {"vision_tokenizer": {"preprocessor_config.json": vq16.processor.to_dict()},
             "emu3_defaults.json": DEFAULTS, **(extra or {})}
    if recipe is not None:
        extra["RECIPE.json"] = recipe
    save_model(model, dest, tokenizer=TextTokenizer.from_pretrained(out / "text"), vq=vq16.model, extra_files=extra)
    return Path(dest)

def _json(path: Path):
    return json.loads(path.read_text())


def _shortened(cfg, steps: int) -> dict:
    """Overrides that run a stage in `steps` steps with the same proportions (warm-up, checkpoints, and
    a VQ run's unquantised share)."""
    scale = lambda n: n * steps // cfg.steps  # noqa: E731
    out = {"steps": steps, "warmup": scale(cfg.warmup), "save_every": max(1, scale(cfg.save_every))}
    if getattr(cfg, "ae_warmup", 0):
        out["ae_warmup"] = scale(cfg.ae_warmup)
    return out
