"""Does the model's own likelihood pick better video extensions than greedy decoding?
On emu3 eval's clips (seed 30,000), extend each from its first 4 frames greedily (the default) and by
SAMPLES top-k samples; score every extension by the eval's placement (objects of their colour and kind
within 4 px of the world's physics, frames 4-15), and report greedy, the samples' mean, the best of them
(an oracle), and the sample the model itself finds most likely (its conditional log-likelihood, and the
guided one at the model's CFG scale).

    python docs/probes/video_rerank.py [MODEL_DIR] [SAMPLES TOP_K CLIPS]    # default: built-in, 6 16 24

Measured on the built-in model (README): greedy 0.495, samples 0.450, oracle 0.655, most likely 0.457
(conditional) / 0.421 (guided): what the model finds likely does not follow the physics better.
"""

import sys

import numpy as np
import torch

from emu3.assets import builtin_model
from emu3.eval.bench import placement
from emu3.pipeline import Emu3
from emu3.world.motion import describe, sample_clip


def log_likelihood(emu: Emu3, prompt: np.ndarray, tokens: np.ndarray) -> float:
    """Sum of the model's log-probabilities of `tokens` after `prompt` (one teacher-forced forward)."""
    ids = torch.as_tensor(np.concatenate([prompt, tokens]))[None]  # (1, T)
    logp = emu.engine.model(ids)[0, :-1].float().log_softmax(-1)  # (T-1, V): position t predicts t+1
    return float(logp[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum())


def main(folder: str | None = None, samples: int = 6, top_k: int = 16, clips: int = 24, seed: int = 30_000) -> None:
    emu = Emu3.from_pretrained(folder or builtin_model())
    scale = emu.defaults.cfg_scale
    rng = np.random.default_rng(seed)
    rows = {"greedy": [], "sample mean": [], "oracle best": [], "most likely": [], "most likely, guided": []}
    weights = []
    torch.set_grad_enabled(False)
    for i in range(clips):  # the same clips, captions and seeds as emu3 eval's video benchmark
        clip = sample_clip(rng)
        frames = clip.render()
        caption = describe(clip)
        greedy = placement(clip, emu.extend_video(frames[:4], caption, new_frames=3, seed=seed + i).pixels, 4.0)
        context = emu.vision.encode_video(frames[:4], "causal").numpy()
        reqs = [emu.video_request(caption, 4, context, seed=seed + i + 1000 * s, top_k=top_k) for s in range(samples)]
        placed, cond, guided = [], [], []
        for req, res in zip(reqs, emu.engine.generate(reqs)):
            placed.append(placement(clip, emu.video_result(req, res.tokens)[1], 4.0)[:, 0].mean())
            c = log_likelihood(emu, req.prompt, res.tokens)
            u = log_likelihood(emu, req.negative, res.tokens)  # the unconditional prompt CFG mixes in
            cond.append(c)
            guided.append(u + scale * (c - u))
        weights.append(len(greedy))
        rows["greedy"].append(greedy[:, 0].mean())
        rows["sample mean"].append(np.mean(placed))
        rows["oracle best"].append(max(placed))
        rows["most likely"].append(placed[int(np.argmax(cond))])
        rows["most likely, guided"].append(placed[int(np.argmax(guided))])
    print(f"{clips} clips from seed {seed}, {samples} samples at top-k {top_k}; objects within 4 px (kind and colour):")
    for name, values in rows.items():
        print(f"  {name:20s} {np.average(values, weights=weights):.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None, *map(int, sys.argv[2:5]))
