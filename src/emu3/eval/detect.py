"""Objects in a shapes-world image, found by colour: each pixel that is saturated enough takes the
nearest palette colour; 4-connected regions of one colour are objects; the share of its bounding box
that a region fills tells the shape (square ~1, circle ~pi/4, triangle ~1/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..world.scenes import COLORS

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (K, 3)
_NAMES = list(COLORS)


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
    """(H, W, 3) uint8 -> objects, largest first."""
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
            box = bh * bw
            fill = len(comp) / box
            kind = "square" if fill > 0.86 else "circle" if fill > 0.64 else "triangle"
            found.append(Detection(kind, name, float(xs.mean()), float(ys.mean()), len(comp)))
    return sorted(found, key=lambda d: -d.area)
