"""Training configuration: one typed dataclass, the paper's stages as named presets, `key=value`
overrides. Everything is checked when the run starts.

Stage facts (seed 002, Methods, and the released fine-tuning script):
- pretraining stage 1: lr 1e-4 with cosine decay, no dropout, context 5,120; vision tokens weigh
  0.5 in the loss; some image data has its caption after the image (image-to-text).
- stage 2: the same with dropout 0.1 (stage 1 alone collapsed late in training).
- stage 3: context 65,536 (131,072 in the arXiv report) with video-text data.
- quality fine-tuning (QFT): loss on the vision tokens only, context 9,216, lr 1e-5 -> 1e-6 cosine,
  then a linear anneal to zero over the last steps; dropout 0.1 (released script: AdamW betas
  (0.9, 0.95), eps 1e-6, weight decay 0.1, gradient clip 5.0, 30 warm-up steps).
- image-to-text: loss on the answer only, cosine with peak lr 1e-5.
- DPO: DPO loss (beta 0.5, the "KL penalty") plus 0.2 x the next-token loss on the chosen sequence;
  cosine from a 5-step warm-up down to 7e-7.
The `tiny-*` twins keep each stage's recipe at a size that trains on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..orders import ORDERS


@dataclass
class TrainConfig:
    # model: a preset name (emu3.model.MODEL_PRESETS) initialised from scratch, or a model folder
    model: str = "tiny"
    text_tokenizer: str = ""  # folder; default: the model folder
    vision_tokenizer: str = ""  # folder; copied into exports (optional)
    dropout: float | None = None  # overrides the model's attention_dropout (used in the 4 released places)
    image_area: int = 0  # generation area in pixels stored in a new model's config (0: the preset's)
    # data: "path" or "path:weight" of tokenized datasets (emu3 tokenize-dataset)
    data: list[str] = field(default_factory=list)
    seq_len: int = 1024
    batch_size: int = 8  # rows per micro-batch per rank
    grad_accum: int = 1
    drop_caption: float = 0.1
    caption_after: float = 0.0
    video_extension: float = 0.0
    extension_context: str = "half"  # latent frames given in an extension sample: "half", or "random" (1 .. T-1)
    t2i_loss: str = "all"
    i2t_loss: str = "output"
    vision_weight: float = 0.5
    answer_weight: float = 1.0  # loss weight of QA answers' text targets
    # visual token order in the sequences (emu3.orders; "spiral" makes a model that can inpaint);
    # auto: the starting model's (its emu3_defaults.json), else raster. Exports record it.
    order: str = "auto"
    # optimisation
    steps: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 10
    anneal: int = 0  # final steps of linear decay to 0 (after the cosine reaches min_lr)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    bf16: str = "auto"  # autocast; auto: CUDA with bf16, or a CPU with native bf16 (trainer.use_bf16); on / off
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (parallelize); same weights, same checkpoints
    # DPO (data: one dataset with preference records)
    dpo: bool = False
    dpo_beta: float = 0.5
    dpo_sft_weight: float = 0.2
    # run
    parallel: str = "auto"  # auto: fsdp under torchrun with more than one process, else none; ddp; fsdp
    device: str = "auto"
    out: str = "runs/train"
    save_every: int = 50
    keep_last: int = 2
    resume: bool = True
    seed: int = 0
    log_every: int = 1
    max_nonfinite: int = 3  # non-finite steps in a row before the run stops

    def validate(self, world: int = 1) -> None:
        problems = []

        def check(ok, message):
            if not ok:
                problems.append(message)

        check(self.seq_len >= 16, f"seq_len must be >= 16, got {self.seq_len}")
        check(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(0 < self.lr and 0 <= self.min_lr <= self.lr, f"need 0 < lr and 0 <= min_lr <= lr, got {self.lr}, "
              f"{self.min_lr}")
        check(0 <= self.warmup < self.steps and 0 <= self.anneal <= self.steps - self.warmup,
              f"warmup ({self.warmup}) and anneal ({self.anneal}) must fit in {self.steps} steps")
        for name in ("drop_caption", "caption_after", "video_extension"):
            check(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
        check(self.extension_context in ("half", "random"),
              f"extension_context is half or random, got {self.extension_context!r}")
        check(self.dropout is None or 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.order in ("auto", *ORDERS), f"order is auto or one of {', '.join(ORDERS)}, got {self.order!r}")
        check(self.vision_weight >= 0 and self.answer_weight >= 0, f"vision_weight and answer_weight must be >= 0, got "
              f"{self.vision_weight}, {self.answer_weight}")
        check(self.t2i_loss in ("all", "output") and self.i2t_loss in ("all", "output"),
              "t2i_loss and i2t_loss are 'all' or 'output'")
        check(self.grad_clip > 0 and self.weight_decay >= 0, "grad_clip must be > 0 and weight_decay >= 0")
        check(self.bf16 in ("auto", "on", "off"), f"bf16 is auto, on or off, got {self.bf16!r}")
        check(self.parallel in ("auto", "none", "ddp", "fsdp"), f"parallel is auto, none, ddp or fsdp, got "
              f"{self.parallel!r}")
        check(self.parallel in ("auto", "none") or world > 1,
              f"parallel={self.parallel} needs several processes: launch with torchrun --nproc_per_node N")
        check(self.parallel != "none" or world == 1, f"parallel=none with {world} processes: every process would "
              "train alone; use ddp or fsdp")
        check(self.keep_last >= 1, f"keep_last must be >= 1 (the newest complete checkpoint is never deleted), "
              f"got {self.keep_last}")
        check(self.save_every >= 1 and self.log_every >= 1 and self.max_nonfinite >= 1,
              "save_every, log_every and max_nonfinite must be >= 1")
        check(bool(self.data), "no training data: set data=path[:weight],... (tokenized with emu3 tokenize-dataset)")
        check(not self.dpo or len(self.data) == 1, "dpo trains on exactly one dataset of preference records")
        check(self.dpo_beta > 0 and self.dpo_sft_weight >= 0, "dpo_beta must be > 0 and dpo_sft_weight >= 0")
        if problems:
            raise InputError("invalid training config: " + "; ".join(problems))

    def resolved_order(self) -> str:
        """The visual token order this run writes: `order`, or for auto the starting model's, else raster."""
        if self.order != "auto":
            return self.order
        from ..checkpoint import read_json

        defaults = Path(self.model) / "emu3_defaults.json"
        return read_json(defaults).get("order", "raster") if defaults.is_file() else "raster"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


_PAPER_PRETRAIN = dict(lr=1e-4, warmup=2000, vision_weight=0.5, caption_after=0.2, drop_caption=0.1,
                       weight_decay=0.1, grad_clip=1.0)
_RELEASED_OPTIM = dict(beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.1, grad_clip=5.0)
_RELEASED_SFT = dict(warmup=30, dropout=0.1, **_RELEASED_OPTIM)

STAGES: dict[str, dict] = {
    "pretrain-stage1": dict(model="emu3-8b", seq_len=5120, dropout=0.0, min_lr=0.0, steps=100_000, **_PAPER_PRETRAIN),
    "pretrain-stage2": dict(model="emu3-8b", seq_len=5120, dropout=0.1, min_lr=0.0, steps=100_000, **_PAPER_PRETRAIN),
    "pretrain-stage3": dict(model="emu3-8b", seq_len=65536, dropout=0.1, min_lr=0.0, steps=50_000,
                            activation_checkpointing=True, video_extension=0.2, **_PAPER_PRETRAIN),
    "qft": dict(model="emu3-8b", seq_len=9216, lr=1e-5, min_lr=1e-6, steps=20_000, anneal=5000, t2i_loss="output",
                drop_caption=0.1, vision_weight=1.0, activation_checkpointing=True, **_RELEASED_SFT),
    "i2t": dict(model="emu3-8b", seq_len=9216, lr=1e-5, min_lr=0.0, steps=20_000, caption_after=1.0,
                i2t_loss="output", vision_weight=1.0, activation_checkpointing=True, **_RELEASED_SFT),
    "dpo": dict(model="emu3-8b", seq_len=9216, lr=7e-6, min_lr=7e-7, warmup=5, steps=40, dpo=True, dropout=0.0,
                batch_size=1, grad_accum=128, **_RELEASED_OPTIM),
}
# Small twins: the same recipes for the tiny model on a CPU.
_TINY = dict(model="tiny", seq_len=512, batch_size=4, steps=200, warmup=10, save_every=50)
STAGES.update({
    "tiny-stage1": {**STAGES["pretrain-stage1"], **_TINY, "lr": 1e-3, "min_lr": 1e-4},
    "tiny-stage2": {**STAGES["pretrain-stage2"], **_TINY, "lr": 1e-3, "min_lr": 1e-4},
    "tiny-stage3": {**STAGES["pretrain-stage3"], **_TINY, "seq_len": 2048, "lr": 1e-3, "min_lr": 1e-4,
                    "activation_checkpointing": False},
    "tiny-qft": {**STAGES["qft"], **_TINY, "lr": 3e-4, "min_lr": 3e-5, "anneal": 50, "activation_checkpointing": False},
    "tiny-i2t": {**STAGES["i2t"], **_TINY, "lr": 3e-4, "activation_checkpointing": False},
    "tiny-dpo": {**STAGES["dpo"], **_TINY, "lr": 1e-5, "min_lr": 1e-6, "warmup": 2, "steps": 20, "batch_size": 2,
                 "grad_accum": 1},
})


def coerce(name: str, text: str, kind):
    """A `key=value` override's text as the field's type (`kind`, from the config's type hints)."""
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        if text.lower() in ("none", "null", ""):
            return None
        return coerce(name, text, args[0])
    if origin is list:
        return [x for x in text.split(",") if x]
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            value = float(text)
            if not value.is_integer():
                raise ValueError(text)
            return int(value)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        return text
    except ValueError:
        raise InputError(f"{name}={text!r}: expected {kind.__name__ if hasattr(kind, '__name__') else kind}") from None


def make_config(preset: str, overrides: list[str] | dict | None = None,
                stages: dict[str, dict] | None = None) -> TrainConfig:
    """A stage preset of `stages` (default: the paper's, STAGES) with `key=value` overrides; unknown presets and
    keys are errors."""
    stages = STAGES if stages is None else stages
    if preset not in stages:
        raise InputError(f"unknown training preset {preset!r}; choose one of {', '.join(stages)}")
    hints = typing.get_type_hints(TrainConfig)
    values = dict(stages[preset])
    items = overrides.items() if isinstance(overrides, dict) else [o.split("=", 1) for o in overrides or []]
    for item in items:
        if len(item) != 2:
            raise InputError(f"overrides are key=value, got {'='.join(item)!r}")
        key, value = item
        key = key.strip().replace("-", "_")
        if key not in hints:
            raise InputError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(hints))}")
        values[key] = coerce(key, value, hints[key]) if isinstance(value, str) else value
    return TrainConfig(**values)
