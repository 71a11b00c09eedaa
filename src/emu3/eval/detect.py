"""Objects in a shapes-world image, found by colour: each pixel that is saturated enough takes the
nearest palette colour; 4-connected regions of one colour are objects; a region's kind is the world shape
it overlaps best once each is drawn into the region's bounding box (intersection over union). A region
that fits none of them well (IoU below MIN_FIT), or is much wider than tall or the reverse, is "unknown":
the exact generation score counts it as an object nobody asked for, so a ragged blob is not a triangle.

Calibration (`docs/probes/detector_fit.py`): the world's own renders fit at IoU >= 0.81 (squares
>= 0.93, circles >= 0.85); the built-in tokenizer's reconstructions of 150 held-out scenes at >= 0.72 for
squares (1st percentile 0.84), 0.83 for circles and 0.66 for triangles; the aspect ratio of either stays
within 0.8-1.25.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..world.scenes import COLORS

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (K, 3)
_NAMES = list(COLORS)
# IoU with the best-fitting shape below which a region is "unknown": about the lowest fit of the built-in
# tokenizer's reconstructions of each kind (an L-shape fits a square at 0.75, a plus sign a circle at 0.71)
MIN_FIT = {"square": 0.8, "circle": 0.8, "triangle": 0.65}
MAX_ASPECT = 1.5  # bounding-box sides further apart than this: "unknown"


def shape_masks(h: int, w: int) -> dict[str, np.ndarray]:
    """Each world shape filling an (h, w) box, as the renderer draws it: a square, an ellipse, and an
    upward triangle with its apex at the top centre and its base along the bottom."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    return {"square": np.ones((h, w), dtype=bool),
            "circle": ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1,
            "triangle": np.abs(xx - w / 2) <= (yy / h) * w / 2}


def classify(region: np.ndarray) -> tuple[str, float]:
    """(kind, IoU) of a boolean mask cropped to its bounding box: the best-fitting shape, or "unknown"."""
    h, w = region.shape
    fits = {kind: float((region & m).sum() / (region | m).sum()) for kind, m in shape_masks(h, w).items()}
    kind = max(fits, key=fits.get)
    if fits[kind] < MIN_FIT[kind] or max(h, w) > MAX_ASPECT * min(h, w):
        return "unknown", fits[kind]
    return kind, fits[kind]


@dataclass
class Detection:
    kind: str
    color: str
    x: float
    y: float
    area: int


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of flat indices."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    comps = []
    for start in np.flatnonzero(mask):
        if seen.flat[start]:
            continue
        stack, comp = [start], []
        seen.flat[start] = True
        while stack:
            p = stack.pop()
            comp.append(p)
            y, x = divmod(p, w)
            for q, ok in ((p - w, y > 0), (p + w, y < h - 1), (p - 1, x > 0), (p + 1, x < w - 1)):
                if ok and mask.flat[q] and not seen.flat[q]:
                    seen.flat[q] = True
                    stack.append(q)
        comps.append(np.array(comp))
    return comps


def detect(image: np.ndarray, min_area: int = 14) -> list[Detection]:
    """(H, W, 3) uint8 -> objects, largest first; `kind` is "circle", "square", "triangle" or "unknown"."""
    px = image.astype(np.float32)
    saturation = px.max(-1) - px.min(-1)
    dist = np.linalg.norm(px[..., None, :] - _PALETTE, axis=-1)  # (H, W, K)
    nearest = dist.argmin(-1)
    colored = (saturation > 70) & (dist.min(-1) < 90)
    w = image.shape[1]
    found = []
    for k, name in enumerate(_NAMES):
        for comp in _components(colored & (nearest == k)):
            if len(comp) < min_area:
                continue
            ys, xs = np.divmod(comp, w)
            bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            if min(bh, bw) < 4:  # a thin rim of blended edge pixels, not an object
                continue
            region = np.zeros((bh, bw), dtype=bool)
            region[ys - ys.min(), xs - xs.min()] = True
            kind, _ = classify(region)
            found.append(Detection(kind, name, float(xs.mean()), float(ys.mean()), len(comp)))
    return sorted(found, key=lambda d: -d.area)
