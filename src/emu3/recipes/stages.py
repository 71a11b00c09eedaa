"""Training presets of the recipes that made the shipped models: `demo` .. `demo-7` (the built-in shapes-world
model's parts, emu3.recipes.builtin) and `vla` / `vla-dagger` (the built-in policy's, emu3.recipes.vla).
`emu3 train` accepts them beside the paper's presets (emu3.train.config.STAGES); `all_stages()` is both."""

from __future__ import annotations

STAGES: dict[str, dict] = {}

# The built-in model (emu3.recipes.builtin sets its data): images, QA, videos and stories of the shapes
# world; visual codes weigh 1 (image generation is what the built-in model is judged on).
STAGES["demo"] = dict(model="demo", seq_len=512, batch_size=16, steps=2400, lr=1e-3, min_lr=5e-5, warmup=100,
                      dropout=0.0, vision_weight=1.0, caption_after=0.15, drop_caption=0.1, video_extension=0.5,
                      weight_decay=0.1, grad_clip=1.0, save_every=100, keep_last=2)
# Part 2 of the built-in model: from part 1's weights (recipe sets model=), the same data again.
STAGES["demo-2"] = {**STAGES["demo"], "steps": 3000, "lr": 4e-4, "min_lr": 2e-5, "warmup": 50}
# Part 4 on: the same again with QA answers weighing 8 (at 1 they were 0.75 % of the loss-carrying
# tokens, and understanding stopped improving in part 3 while generation went on gaining).
STAGES["demo-4"] = {**STAGES["demo-2"], "answer_weight": 8.0}
# Part 5 on: 1,200 steps with the QA share answered with reasons (emu3.recipes.builtin.MIX_REASONED): after
# part 4 the model captioned images naming their shapes, yet answered "how many circles" at chance, and
# read off its own captions the counts were right 0.88 of the time; so it first names the objects from left
# to right, each step looking only at the image, the question and the last words (emu3.world.scenes.questions;
# docs/built-in-model.md says what the two earlier answer formats got wrong).
STAGES["demo-5"] = {**STAGES["demo-4"], "steps": 1200}
# Part 6: 1,200 steps with twice the clips and a larger video share (emu3.recipes.builtin.MIX_VIDEO), extension
# samples given 1 .. T-1 latent frames: part 5's extended videos drifted from the physics frame by frame.
STAGES["demo-6"] = {**STAGES["demo-5"], "extension_context": "random"}
# Part 7: 1,200 steps with the QA share on questions that do not give their answer away (MIX_BALANCED).
STAGES["demo-7"] = dict(STAGES["demo-6"])
# The built-in VLA policy (emu3.recipes.vla.build_vla sets its data): expert demonstrations of the
# table-top task as one-frame windows; vision weighs 0.5 and actions 1.0, as in the paper. Then
# `vla-dagger`: from its weights (recipe sets model=), demonstrations and DAgger records together.
STAGES["vla"] = dict(model="demo", seq_len=512, batch_size=16, steps=1500, lr=1e-3, min_lr=5e-5, warmup=100,
                     dropout=0.0, vision_weight=0.5, weight_decay=0.1, grad_clip=1.0, save_every=100, keep_last=2)
STAGES["vla-dagger"] = {**STAGES["vla"], "steps": 800, "lr": 4e-4, "min_lr": 2e-5, "warmup": 30}


def all_stages() -> dict[str, dict]:
    """The paper's presets (and their tiny twins) and the recipes' presets, by name."""
    from ..train.config import STAGES as PAPER

    return {**PAPER, **STAGES}
