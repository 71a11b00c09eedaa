"""A table-top manipulation task in the shapes world, for vision-language-action policies.

A 64x64 table holds 1-3 shapes and 1-2 coloured target rings; a round gripper moves over it.
Instructions: "put the red square on the blue target" (grasp, carry, release within 3 px of the
ring's centre) or "push the green circle to the left" (move it 14 px that way without grasping).
Actions are continuous (dx, dy, grip), each in [-1, 1]: the gripper moves by SPEED * (dx, dy)
pixels, and grip > 0 closes it. Closing over a shape's centre (within its half-size) grasps it and
the shape then travels with the gripper; opening drops it. A closed, empty gripper is a fist that
pushes shapes out of its way along the contact normal; an open one hovers over them.

Observations are two views, like a robot's third-person and wrist cameras: the table (64x64) and
a 32x32 window centred on the gripper (outside the table: the floor).

`expert` solves every task closed-loop from the state (re-planning each step, so it recovers from
its own noise); `record` runs it with Gaussian action noise to make demonstrations. Everything is
seeded: `TableEnv(seed)` is one exact episode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .scenes import _PLAIN, COLORS, SHAPES, SUPERSAMPLE, Shape, draw_shape

SIZE, WRIST = 64, 32
SPEED = 3.0  # pixels per step at |dx| = 1
GRIP_R = 4.0  # the gripper's radius; drawn as a 2-px ring (a disc when closed): a 1-px ring of radius 3
#               vanished in the tokenizer's 8x8-pixel codes, and the policy could not find it
TARGET_R = 7.0
PUSH_DIST = 14.0
PLACE_TOL = 3.0
HORIZON = 80
SIDES = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "top": (0.0, -1.0), "bottom": (0.0, 1.0)}
FLOOR = (70, 70, 76)
GRIPPER = (35, 35, 35)


@dataclass
class Target:
    color: str
    x: float
    y: float


@dataclass
class Task:
    kind: str  # "place" or "push"
    obj: int  # index into the shapes
    target: int | None = None  # place: index into the targets
    side: str | None = None  # push
    start: tuple[float, float] = (0.0, 0.0)  # the object's start centre

    def instruction(self, env: TableEnv) -> str:
        s = env.shapes[self.obj]
        if self.kind == "place":
            return f"put the {s.color} {s.kind} on the {env.targets[self.target].color} target"
        return f"push the {s.color} {s.kind} to the {self.side}"


@dataclass
class TableEnv:
    seed: int
    shapes: list[Shape] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    background: str = "beige"
    gx: float = 32.0
    gy: float = 32.0
    closed: bool = False
    holding: int | None = None
    task: Task | None = None
    steps: int = 0

    def __post_init__(self):
        rng = np.random.default_rng([self.seed, 7])
        self.background = ("beige", "grey", "white", "sky")[int(rng.integers(4))]
        for _ in range(1000):
            if self._sample(rng):
                return
        raise RuntimeError(f"could not lay out table {self.seed}")

    def _sample(self, rng: np.random.Generator) -> bool:
        self.shapes, self.targets = [], []
        n, m = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        used = set()
        while len(self.shapes) < n:
            kind, color = SHAPES[int(rng.integers(3))], list(COLORS)[int(rng.integers(len(COLORS)))]
            if (kind, color) in used:
                continue
            r = float(rng.uniform(5.0, 7.0))
            s = Shape(kind, color, float(rng.uniform(r + 2, SIZE - 2 - r)), float(rng.uniform(r + 2, SIZE - 2 - r)), r)
            if any(math.hypot(s.x - o.x, s.y - o.y) < s.r + o.r + 6 for o in self.shapes):
                return False
            used.add((kind, color))
            self.shapes.append(s)
        colors = [c for c in COLORS]
        for _ in range(m):
            c = colors.pop(int(rng.integers(len(colors))))
            t = Target(c, float(rng.uniform(TARGET_R + 2, SIZE - 2 - TARGET_R)),
                       float(rng.uniform(TARGET_R + 2, SIZE - 2 - TARGET_R)))
            if any(math.hypot(t.x - o.x, t.y - o.y) < o.r + TARGET_R + 4 for o in self.shapes) or \
                    any(math.hypot(t.x - o.x, t.y - o.y) < 2 * TARGET_R + 4 for o in self.targets):
                return False
            self.targets.append(t)
        self.gx, self.gy = float(rng.uniform(4, SIZE - 4)), float(rng.uniform(4, SIZE - 4))
        obj = int(rng.integers(n))
        s = self.shapes[obj]
        if rng.random() < 0.5:
            self.task = Task("place", obj, target=int(rng.integers(m)), start=(s.x, s.y))
            return True
        room = {side: (s.x - s.r - 1 if side == "left" else SIZE - 1 - s.r - s.x if side == "right" else
                       s.y - s.r - 1 if side == "top" else SIZE - 1 - s.r - s.y) for side in SIDES}
        ok = [side for side, free in room.items() if free >= PUSH_DIST + 2]
        if not ok:
            return False
        self.task = Task("push", obj, side=ok[int(rng.integers(len(ok)))], start=(s.x, s.y))
        return True

    # ---- dynamics ----

    @property
    def instruction(self) -> str:
        return self.task.instruction(self)

    def step(self, action) -> bool:
        """Apply (dx, dy, grip); returns whether the task is now solved."""
        a = np.clip(np.nan_to_num(np.asarray(action, np.float64).reshape(3)), -1.0, 1.0)
        self.gx = float(np.clip(self.gx + SPEED * a[0], 0, SIZE - 1))
        self.gy = float(np.clip(self.gy + SPEED * a[1], 0, SIZE - 1))
        want = bool(a[2] > 0)
        if want and not self.closed:
            under = [i for i, s in enumerate(self.shapes) if math.hypot(s.x - self.gx, s.y - self.gy) <= s.r]
            self.holding = min(under, key=lambda i: math.hypot(self.shapes[i].x - self.gx,
                                                              self.shapes[i].y - self.gy)) if under else None
        elif not want:
            self.holding = None
        self.closed = want
        if self.holding is not None:
            s = self.shapes[self.holding]
            s.x, s.y = self._inside(s, self.gx, self.gy)
        elif self.closed:  # a fist pushes
            for s in self.shapes:
                dx, dy = s.x - self.gx, s.y - self.gy
                d = math.hypot(dx, dy)
                if d < s.r + GRIP_R:
                    ux, uy = (dx / d, dy / d) if d > 1e-6 else (1.0, 0.0)
                    s.x, s.y = self._inside(s, self.gx + ux * (s.r + GRIP_R), self.gy + uy * (s.r + GRIP_R))
        self.steps += 1
        return self.success()

    @staticmethod
    def _inside(s: Shape, x: float, y: float) -> tuple[float, float]:
        return float(np.clip(x, s.r + 1, SIZE - 1 - s.r)), float(np.clip(y, s.r + 1, SIZE - 1 - s.r))

    def success(self) -> bool:
        t, s = self.task, self.shapes[self.task.obj]
        if t.kind == "place":
            goal = self.targets[t.target]
            return self.holding is None and math.hypot(s.x - goal.x, s.y - goal.y) <= PLACE_TOL
        ux, uy = SIDES[t.side]
        return (s.x - t.start[0]) * ux + (s.y - t.start[1]) * uy >= PUSH_DIST

    # ---- views ----

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        """(table view (64, 64, 3), wrist view (32, 32, 3)), uint8."""
        m = WRIST // 2  # floor margin, so that the wrist window never leaves the canvas
        ss = SUPERSAMPLE
        full = SIZE + 2 * m
        img = Image.new("RGB", (full * ss, full * ss), FLOOR)
        d = ImageDraw.Draw(img)
        o = m * ss
        d.rectangle([o, o, o + SIZE * ss - 1, o + SIZE * ss - 1], fill=_PLAIN[self.background])
        for t in self.targets:
            cx, cy, r = t.x * ss + o, t.y * ss + o, TARGET_R * ss
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=COLORS[t.color], width=2 * ss)
        order = [i for i in range(len(self.shapes)) if i != self.holding] + \
            ([self.holding] if self.holding is not None else [])
        for i in order:
            draw_shape(d, self.shapes[i], offset=o)
        gx, gy, r = self.gx * ss + o, self.gy * ss + o, GRIP_R * ss
        if self.closed:
            d.ellipse([gx - r, gy - r, gx + r, gy + r], fill=GRIPPER)
        else:
            d.ellipse([gx - r, gy - r, gx + r, gy + r], outline=GRIPPER, width=2 * ss)
        canvas = np.asarray(img.resize((full, full), Image.BOX), dtype=np.uint8)
        table = canvas[m:m + SIZE, m:m + SIZE]
        cx, cy = int(round(self.gx)) + m, int(round(self.gy)) + m
        wrist = canvas[cy - WRIST // 2:cy + WRIST // 2, cx - WRIST // 2:cx + WRIST // 2]
        return table.copy(), wrist.copy()


# --------------------------------------------------------------------------------------------
# The scripted expert


def _toward(env: TableEnv, x: float, y: float, grip: float) -> np.ndarray:
    return np.array([np.clip((x - env.gx) / SPEED, -1, 1), np.clip((y - env.gy) / SPEED, -1, 1), grip])


def expert(env: TableEnv) -> np.ndarray:
    """The next action that solves the task, from the current state."""
    t, s = env.task, env.shapes[env.task.obj]
    if t.kind == "place":
        goal = env.targets[t.target]
        if env.holding == t.obj:
            if math.hypot(env.gx - goal.x, env.gy - goal.y) < 0.5:
                return np.array([0.0, 0.0, -1.0])  # release
            return _toward(env, goal.x, goal.y, 1.0)
        if env.closed:
            return np.array([0.0, 0.0, -1.0])
        if math.hypot(env.gx - s.x, env.gy - s.y) < 0.5:
            return np.array([0.0, 0.0, 1.0])  # grasp
        return _toward(env, s.x, s.y, -1.0)
    ux, uy = SIDES[t.side]
    back = s.r + GRIP_R + 1.5
    bx = float(np.clip(s.x - ux * back, 0, SIZE - 1))  # just behind the shape (an open gripper hovers
    by = float(np.clip(s.y - uy * back, 0, SIZE - 1))  # over everything on its way there)
    lateral = abs((env.gx - s.x) * uy - (env.gy - s.y) * ux)  # distance off the push line
    behind = (s.x - env.gx) * ux + (s.y - env.gy) * uy > 0
    if env.closed and env.holding is None and lateral < 1.5 and behind:
        return np.array([ux, uy, 1.0])  # push
    if env.closed:
        return np.array([0.0, 0.0, -1.0])
    if math.hypot(env.gx - bx, env.gy - by) < 0.5:
        return np.array([0.0, 0.0, 1.0])  # make a fist
    return _toward(env, bx, by, -1.0)


@dataclass
class Episode:
    seed: int
    instruction: str
    table: np.ndarray  # (T+1, 64, 64, 3): the views before each action and after the last
    wrist: np.ndarray  # (T+1, 32, 32, 3)
    actions: np.ndarray  # (T, 3) float32
    success: bool


def rollout(env: TableEnv, policy, horizon: int = HORIZON) -> Episode:
    """Run `policy(env) -> action` until success or `horizon` steps."""
    tables, wrists, actions = [], [], []
    done = False
    instruction = env.instruction
    for _ in range(horizon):
        table, wrist = env.render()
        tables.append(table)
        wrists.append(wrist)
        a = np.clip(np.asarray(policy(env), np.float64), -1, 1)
        actions.append(a)
        if env.step(a):
            done = True
            break
    table, wrist = env.render()
    tables.append(table)
    wrists.append(wrist)
    return Episode(env.seed, instruction, np.stack(tables), np.stack(wrists), np.asarray(actions, np.float32), done)


def record(seed: int, noise: float = 0.1, horizon: int = HORIZON) -> Episode:
    """A demonstration: the expert with Gaussian noise on (dx, dy)."""
    rng = np.random.default_rng([seed, 11])

    def noisy(env):
        a = expert(env)
        a[:2] += rng.normal(0, noise, 2)
        return a

    return rollout(TableEnv(seed), noisy, horizon)
