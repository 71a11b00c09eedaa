"""Videos of the shapes world: 1-2 shapes moving at constant velocity, bouncing off the walls, with
captions that describe the motion. Positions at every frame are the exact ground truth that the
video-extension evaluator scores against (`trajectory`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .scenes import SIZE, Scene, Shape, article, render, sample_scene

DIRECTIONS = {(1, 0): "right", (-1, 0): "left", (0, 1): "down", (0, -1): "up"}


@dataclass
class Clip:
    scene: Scene  # the first frame
    velocities: list[tuple[float, float]]  # pixels per frame, per shape
    frames: int = 16

    def positions(self, t: int) -> list[tuple[float, float]]:
        return [trajectory(s, v, t) for s, v in zip(self.scene.shapes, self.velocities)]

    def frame_scene(self, t: int) -> Scene:
        shapes = [replace(s, x=x, y=y) for s, (x, y) in zip(self.scene.shapes, self.positions(t))]
        return replace(self.scene, shapes=shapes)

    def render(self) -> np.ndarray:
        """(frames, 64, 64, 3) uint8."""
        return np.stack([render(self.frame_scene(t)) for t in range(self.frames)])


def _bounce(p: float, v: float, t: int, lo: float, hi: float) -> float:
    """Position after t frames moving at v between walls lo and hi, reflecting elastically."""
    span = hi - lo
    if span <= 0:
        return p
    q = (p - lo + v * t) % (2 * span)
    return lo + (q if q <= span else 2 * span - q)


def trajectory(shape: Shape, v: tuple[float, float], t: int) -> tuple[float, float]:
    return (_bounce(shape.x, v[0], t, shape.r + 1, SIZE - 1 - shape.r),
            _bounce(shape.y, v[1], t, shape.r + 1, SIZE - 1 - shape.r))


def sample_clip(rng: np.random.Generator, frames: int = 16) -> Clip:
    n = 1 if rng.random() < 0.6 else 2
    scene = sample_scene(rng, n)
    velocities = []
    for _ in range(n):
        direction = list(DIRECTIONS)[int(rng.integers(4))]
        speed = float(rng.choice([1.0, 1.5, 2.0]))
        velocities.append((direction[0] * speed, direction[1] * speed))
    return Clip(scene, velocities, frames)


def describe(clip: Clip) -> str:
    parts = []
    for s, (vx, vy) in zip(clip.scene.shapes, clip.velocities):
        direction = DIRECTIONS[(int(np.sign(vx)), int(np.sign(vy)))]
        speed = "slowly" if max(abs(vx), abs(vy)) < 1.25 else "quickly" if max(abs(vx), abs(vy)) > 1.75 else ""
        parts.append(f"{article(s.color)} {s.color} {s.kind} moves {direction}{' ' + speed if speed else ''}")
    return " and ".join(parts)
