"""The recipe of the built-in VLA policy, as one resumable command (`emu3 build-vla OUT`): the vision tokenizer
fine-tuned on the table-top task, instruction BPE with room for FAST action tokens, FAST fitted on expert chunks,
demonstrations, behaviour cloning (`vla`), one DAgger round and `vla-dagger` training, export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .builtin import _json, _shortened, _stages, _step_minutes, package
from .stages import STAGES

VLA_EPISODES = 3000  # expert demonstrations (about 21 steps each, one window per step)
VLA_WINDOW = 1  # frames per training window: the policy sees the current views only (emu3.vla: "copycat")
VLA_DAGGER_SHARE = 5  # DAgger rolls the behaviour-cloned policy out on the first 1/5 of the training tables
VLA_FAST_VOCAB = 256  # FAST tokens, on the last 256 text ids
VLA_BPE = 384  # text BPE over the instructions (plus the reserved action ids)
VLA_CHUNK = 5  # actions per chunk


def instructions(seed: int = 0, n: int = 4000) -> list[str]:
    """The instructions of n seeded tables (the text the policy reads)."""
    from ..world.table import TableEnv

    return [TableEnv(seed * 1_000_003 + 500_000 + i).instruction for i in range(n)]


def build_vla(out: str, vision: str | os.PathLike | None = None, episodes: int | None = None,
              lm_steps: int | None = None, vq_steps: int | None = None, seed: int = 0, progress: bool = True,
              log=print) -> Path:
    """`emu3 build-vla OUT`: the vision tokenizer fine-tuned on table-top frames (`train-vq table`
    from the built-in model's, or `vision`: the world's scenes have no rings and no gripper, and the
    tokenizer lost the gripper altogether), text BPE with room for FAST tokens, FAST fitted on expert
    chunks, demonstrations as one-frame token records, the `vla` training stage (behaviour cloning), a
    DAgger round (the cloned policy's own states labelled by the expert) and `vla-dagger` training from
    the cloned weights on both, export with fast_tokenizer.json. Every stage resumes."""
    from ..action import ActionIds, FASTTokenizer
    from ..assets import builtin_model
    from ..errors import InputError
    from ..fsutil import atomic_file
    from ..pipeline import Emu3
    from ..tokenizer import TextTokenizer
    from ..train.config import make_config
    from ..train.trainer import export, train
    from ..train.vq import make_vq_config, train_vq
    from ..vision import VisionTokenizer
    from ..vla import Policy
    from ..world.build import build_dagger, build_demonstrations, vla_windows
    from ..world.table import record

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    given = vision
    if vision is None:
        if builtin_model() is None:
            raise InputError("build-vla needs a vision tokenizer: --vision DIR (the built-in model is not installed)")
        vision = builtin_model() / "vision_tokenizer"
    episodes = episodes or VLA_EPISODES
    stage, times = _stages(out, log)

    vq_over = [f"init={vision}", f"out={out / 'vq'}", f"seed={seed}"]
    if vq_steps:
        vq_over += [f"{k}={v}" for k, v in _shortened(make_vq_config("table", []), vq_steps).items()]
    vq_cfg = make_vq_config("table", vq_over)
    stage("vision tokenizer", lambda: (out / "vq" / "tokenizer" / "model.safetensors").exists(),
          lambda: train_vq(vq_cfg, progress))
    vq = VisionTokenizer.from_pretrained(out / "vq" / "tokenizer", frame_batch=64)
    codebook = vq.model.config.codebook_size
    stage("text tokenizer", lambda: (out / "text" / "tokenizer.json").exists(),
          lambda: TextTokenizer.train(instructions(seed), VLA_BPE, codebook, min_frequency=2,
                                      reserved=VLA_FAST_VOCAB).save_pretrained(out / "text"))

    def fit_fast():
        chunks = [frames[0][1] for i in range(400) for frames in
                  vla_windows(record(seed * 1_000_003 + 900_000 + i), VLA_CHUNK, 1)]
        FASTTokenizer.fit(np.stack(chunks), scale=10.0, vocab_size=VLA_FAST_VOCAB).save_pretrained(out / "fast")

    stage("FAST tokenizer", lambda: (out / "fast" / "fast_tokenizer.json").exists(), fit_fast)
    text = TextTokenizer.from_pretrained(out / "text")
    fast = FASTTokenizer.from_pretrained(out / "fast")
    actions = ActionIds(text.vocab.text_size, fast.config.vocab_size)
    stage("demonstrations", lambda: (out / "data" / "index.json").exists(),
          lambda: build_demonstrations(out / "data", vq, text, fast, actions, episodes, seed, chunk=VLA_CHUNK,
                            window=VLA_WINDOW, progress=progress))
    overrides = {"data": f"{out / 'data'}:1.0", "text_tokenizer": str(out / "text"), "out": str(out / "lm"),
                 "seed": seed}
    if lm_steps:
        overrides.update(_shortened(make_config("vla", {}, stages=STAGES), lm_steps))
    cfg = make_config("vla", overrides, stages=STAGES)
    stage("language model", lambda: (out / "lm" / f"ckpt-{cfg.steps:08d}" / "COMMITTED").exists(),
          lambda: train(cfg, progress))
    extra = {"fast_tokenizer.json": fast.to_dict()}

    # DAgger: the behaviour-cloned policy drives on training tables, the expert labels where it went,
    # and training goes on from its weights on demonstrations and these records together
    def export_bc():
        export(out / "lm", out / "lm-bc")
        package(out, out / "emu3-vla-bc", extra=extra, exported=out / "lm-bc")

    def dagger():
        policy = Policy(Emu3.from_pretrained(out / "emu3-vla-bc"), fast)
        stats = build_dagger(out / "dagger", policy, vq, text, fast, actions, max(1, episodes // VLA_DAGGER_SHARE),
                             seed, chunk=VLA_CHUNK, progress=progress)
        with atomic_file(out / "dagger.json") as tmp:
            tmp.write_text(json.dumps(stats, indent=1))

    stage("behaviour-cloning export", lambda: (out / "emu3-vla-bc" / "fast_tokenizer.json").exists(), export_bc)
    stage("DAgger rollouts", lambda: (out / "dagger.json").exists(), dagger)
    overrides2 = {**overrides, "data": f"{out / 'data'}:1.0,{out / 'dagger'}:1.0", "out": str(out / "lm-dagger"),
                  "model": str(out / "lm-bc"), "seed": seed + 1}
    if lm_steps:
        overrides2.update(_shortened(make_config("vla-dagger", {}, stages=STAGES), lm_steps))
    cfg2 = make_config("vla-dagger", overrides2, stages=STAGES)
    stage("language model, DAgger", lambda: (out / "lm-dagger" / f"ckpt-{cfg2.steps:08d}" / "COMMITTED").exists(),
          lambda: train(cfg2, progress))
    command = (f"emu3 build-vla {out}" + (f" --vision {given}" if given else "")
               + (f" --episodes {episodes}" if episodes != VLA_EPISODES else "")
               + (f" --lm-steps {lm_steps}" if lm_steps else "") + (f" --vq-steps {vq_steps}" if vq_steps else ""))
    recipe = {"seed": seed, "vision_tokenizer": {"init": str(vision), **_json(out / "vq" / "config.json")},
              "vision_eval": _json(out / "vq" / "eval.json"), "episodes": episodes, "bpe_size": VLA_BPE,
              "fast": {"vocab_size": VLA_FAST_VOCAB, "scale": 10.0, "chunk": VLA_CHUNK}, "window": VLA_WINDOW,
              "lm": _json(out / "lm" / "config.json"), "dagger": _json(out / "dagger.json"),
              "lm_dagger": _json(out / "lm-dagger" / "config.json"),
              "stage_minutes": {k: round(v / 60, 1) for k, v in times.items()},
              "step_minutes": {"language model": _step_minutes(out / "lm"),
                               "language model, DAgger": _step_minutes(out / "lm-dagger")},
              "torch": torch.__version__, "command": command}
    final = package(out, out / "emu3-vla", recipe, lm="lm-dagger", extra=extra)
    log(f"wrote {final}")
    return final

