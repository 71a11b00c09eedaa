"""How well each detected region fits its best world shape (IoU, emu3.eval.detect.classify) and its
bounding box's aspect ratio, on the world's renders, the built-in tokenizer's reconstructions and the
built-in model's generations: the calibration behind detect.MIN_FIT and MAX_ASPECT.

    python docs/probes/detector_fit.py
"""

import numpy as np
import torch

from emu3.assets import builtin_model
from emu3.eval import detect as D
from emu3.eval.bench import geneval_prompts
from emu3.pipeline import Emu3
from emu3.world.scenes import render, sample_scene


def regions(image: np.ndarray):
    """(kind, IoU, aspect) of every region detect() looks at."""
    px = image.astype(np.float32)
    dist = np.linalg.norm(px[..., None, :] - D._PALETTE, axis=-1)
    colored = (px.max(-1) - px.min(-1) > 70) & (dist.min(-1) < 90)
    for k in range(len(D._NAMES)):
        for comp in D._components(colored & (dist.argmin(-1) == k)):
            ys, xs = np.divmod(comp, image.shape[1])
            h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
            if len(comp) < 14 or min(h, w) < 4:
                continue
            region = np.zeros((h, w), dtype=bool)
            region[ys - ys.min(), xs - xs.min()] = True
            fits = {kind: (region & m).sum() / (region | m).sum() for kind, m in D.shape_masks(h, w).items()}
            best = max(fits, key=fits.get)
            yield best, fits[best], h / w


def report(tag: str, images) -> None:
    rows = [r for im in images for r in regions(im)]
    aspect = np.array([a for _, _, a in rows])
    print(f"{tag}: {len(rows)} regions, aspect {aspect.min():.2f}-{aspect.max():.2f}")
    for kind in ("square", "circle", "triangle"):
        fit = np.array([f for k, f, _ in rows if k == kind])
        if len(fit):
            print(f"  {kind:8s} {len(fit):4d}  IoU min {fit.min():.3f}  1% {np.percentile(fit, 1):.3f}"
                  f"  5% {np.percentile(fit, 5):.3f}  median {np.median(fit):.3f}")


rng = np.random.default_rng(123)
images = np.stack([render(sample_scene(rng)) for _ in range(300)])
report("renders", images)
emu = Emu3.from_pretrained(builtin_model())
with torch.no_grad():
    report("reconstructions", emu.vision.decode_image(torch.stack(emu.vision.encode_images(list(images[:150])))))
prompts = geneval_prompts(8, 10_000)
report("generations", [g.pixels for g in emu.generate_images([p.text for p in prompts], seed=10_000)])
