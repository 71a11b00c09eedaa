"""Scaling laws: fit L(N, D) = E + A / N^alpha + B / D^beta to measured losses (`emu3 scaling fit`).

The fit is Chinchilla's approach 3 done as Besiroglu et al. (2024) redid it: the law in log-sum-exp
form, log L = LSE(a - alpha log N, b - beta log D, e) with A = exp(a), B = exp(b), E = exp(e); the Huber
loss (delta 1e-3) of the residuals against log L, summed over the points (not averaged); L-BFGS from every
point of Hoffmann et al.'s grid of starting values (alpha, beta in 0 .. 2, e in -1 .. 1, a, b in 0 .. 25),
keeping the best; no rounding of what it finds. Confidence intervals come from refitting bootstrap
resamples of the points (from the best start). N is the model's non-embedding parameters, D its training
tokens (the columns `params` and `tokens` of a runs CSV: `task,params,tokens,loss`).

scipy (L-BFGS-B) is the optimiser: `pip install "emu3[science]"`; `emu3 scaling plot` (`plot_runs`) draws the
runs against the fitted law with matplotlib: `pip install "emu3[plot]"`.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

COLUMNS = ("task", "params", "tokens", "loss")
MIN_POINTS = 5  # the law's parameters
HUBER_DELTA = 1e-3
# Hoffmann et al.'s starting grid: alpha, beta, e, a, b
GRID = (np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5), np.arange(-1, 1.01, 0.5), np.arange(0, 25.1, 5),
        np.arange(0, 25.1, 5))


@dataclass
class Fit:
    """A fitted law with its quality: R^2 and mean absolute percentage error of the fitted points, and on
    held-out points (`holdout_mape`: None when none were held out)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    r2: float
    mape: float
    points: int
    holdout_mape: float | None = None
    intervals: dict | None = None  # name -> (low, high), from the bootstrap
    held_out: list | None = None  # [params, tokens, observed loss, predicted loss] per held-out run

    def predict(self, params, tokens) -> np.ndarray:
        return law(np.asarray(params, float), np.asarray(tokens, float), self.E, self.A, self.B, self.alpha,
                   self.beta)

    def to_dict(self) -> dict:
        return asdict(self)


def law(n: np.ndarray, d: np.ndarray, e: float, a: float, b: float, alpha: float, beta: float) -> np.ndarray:
    return e + a / n ** alpha + b / d ** beta


def read_runs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A runs CSV -> {task: (k, 3) array of params, tokens, loss}; missing columns, unreadable numbers and
    non-positive values are errors that name the row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such runs file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}; a runs file has columns "
                             f"{','.join(COLUMNS)}")
        out: dict[str, list] = {}
        for i, row in enumerate(reader, 2):  # line 1 is the header
            try:
                values = [float(row[c]) for c in COLUMNS[1:]]
            except (TypeError, ValueError):
                raise InputError(f"{path}, line {i}: params, tokens and loss must be numbers, got "
                                 f"{[row[c] for c in COLUMNS[1:]]}") from None
            if not all(math.isfinite(v) and v > 0 for v in values):
                raise InputError(f"{path}, line {i}: params, tokens and loss must be positive, got {values}")
            out.setdefault(row["task"], []).append(values)
    if not out:
        raise InputError(f"{path}: no runs")
    return {task: np.array(rows) for task, rows in out.items()}


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Summed Huber loss of LSE(a - alpha log N, b - beta log D, e) - log L, and its gradient."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, k)
    top = terms.max(0)
    w = np.exp(terms - top)
    lse = top + np.log(w.sum(0))
    w = w / w.sum(0)  # softmax weights: d lse / d term
    r = lse - log_l
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta)).sum()
    g = np.where(small, r, delta * np.sign(r))  # d huber / d r
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(), -(g * w[0] * log_n).sum(),
                     -(g * w[1] * log_d).sum()])
    return float(loss), grad


def _minimize(points: np.ndarray, starts, delta: float) -> tuple[np.ndarray, float]:
    try:
        from scipy.optimize import minimize
    except ImportError as e:
        raise InputError('fitting scaling laws needs scipy: pip install "emu3[science]"') from e

    from threadpoolctl import threadpool_limits

    log_n, log_d, log_l = np.log(points[:, 0]), np.log(points[:, 1]), np.log(points[:, 2])
    best, best_loss = None, math.inf
    # one BLAS thread: L-BFGS-B's vectors have 5 entries, and threaded BLAS beside a busy core spins (a fit of
    # 20 points took 215-281 s instead of 10 s beside a training process)
    with threadpool_limits(1):
        for start in starts:
            res = minimize(_objective, np.asarray(start, float), args=(log_n, log_d, log_l, delta), jac=True,
                           method="L-BFGS-B")
            if res.fun < best_loss:
                best, best_loss = res.x, res.fun
    return best, best_loss


def held_out(points: np.ndarray, holdout: int = 0, holdout_params: float | None = None) -> np.ndarray:
    """Which runs a fit leaves out to predict: the `holdout` largest by params x tokens (compute), or with
    `holdout_params` every run of a model that large or larger (the paper's test: small models predict a
    larger one). A boolean mask over the points."""
    held = np.zeros(len(points), bool)
    if holdout_params is not None:
        if holdout:
            raise InputError("hold out either the K largest runs or the models from a size up, not both")
        return points[:, 0] >= holdout_params
    if not 0 <= holdout <= len(points):
        raise InputError(f"holdout is a number of runs from 0 to the {len(points)} there are, got {holdout}")
    if holdout:
        held[np.argsort(points[:, 0] * points[:, 1], kind="stable")[len(points) - holdout:]] = True
    return held


def fit(points: np.ndarray, holdout: int = 0, bootstrap: int = 100, seed: int = 0,
        delta: float = HUBER_DELTA, holdout_params: float | None = None) -> Fit:
    """Fit the law to (k, 3) points (params, tokens, loss); the runs `held_out` picks (the `holdout`
    largest by params x tokens, or those of `holdout_params` parameters and more) are left out of the fit
    and scored as predictions; `bootstrap` resamples give 95 % intervals."""
    points = np.asarray(points, float)
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(f"points must be (k, 3): params, tokens, loss; got shape {points.shape}")
    mask = held_out(points, holdout, holdout_params)
    if (~mask).sum() < MIN_POINTS:
        raise InputError(f"a fit of 5 parameters needs at least {MIN_POINTS} runs left after holding out "
                         f"{mask.sum()}; there are {len(points)}")
    train, held = points[~mask], points[mask]
    grid = [(a, b, e, alpha, beta) for alpha, beta, e, a, b in itertools.product(*GRID)]
    theta, _ = _minimize(train, grid, delta)
    a, b, e, alpha, beta = (float(x) for x in theta)
    pred = law(train[:, 0], train[:, 1], math.exp(e), math.exp(a), math.exp(b), alpha, beta)
    obs = train[:, 2]
    r2 = 1 - float(((obs - pred) ** 2).sum() / max(((obs - obs.mean()) ** 2).sum(), 1e-300))
    out = Fit(math.exp(e), math.exp(a), math.exp(b), alpha, beta, r2, float(np.mean(np.abs(pred / obs - 1))),
              len(train))
    if len(held):
        predicted = out.predict(held[:, 0], held[:, 1])
        out.holdout_mape = float(np.mean(np.abs(predicted / held[:, 2] - 1)))
        out.held_out = [[float(x) for x in (*row, y)] for row, y in zip(held, predicted)]
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(bootstrap):
            sample = train[rng.integers(0, len(train), len(train))]
            t, _ = _minimize(sample, [theta], delta)
            draws.append([math.exp(t[2]), math.exp(t[0]), math.exp(t[1]), t[3], t[4]])
        lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
        out.intervals = {k: (float(x), float(y)) for k, x, y in zip(("E", "A", "B", "alpha", "beta"), lo, hi)}
    return out


def select_runs(path: str | os.PathLike, task: str | None = None, min_params: float = 0,
                min_tokens: float = 0) -> dict[str, np.ndarray]:
    """The runs of a runs CSV to fit: one task's (or each's), without runs below `min_params` parameters or
    `min_tokens` tokens (budgets before the power-law regime: a law E + A/N^alpha + B/D^beta cannot follow
    the first steps of training, where every size's loss is still near the uniform level)."""
    runs = read_runs(path)
    if task is not None:
        if task not in runs:
            raise InputError(f"{path}: no runs of task {task!r}; it has {', '.join(sorted(runs))}")
        runs = {task: runs[task]}
    runs = {t: p[(p[:, 0] >= min_params) & (p[:, 1] >= min_tokens)] for t, p in runs.items()}
    for t, p in runs.items():
        if len(p) < MIN_POINTS:
            raise InputError(f"{path}: task {t} keeps {len(p)} runs with params >= {min_params:g} and tokens >= "
                             f"{min_tokens:g}; a fit needs at least {MIN_POINTS}")
    return runs


def fit_runs(path: str | os.PathLike, task: str | None = None, holdout: int = 0, bootstrap: int = 100,
             seed: int = 0, min_params: float = 0, min_tokens: float = 0,
             holdout_params: float | None = None) -> dict[str, Fit]:
    """Fit every task of a runs CSV (or one), on the runs `select_runs` keeps."""
    runs = select_runs(path, task, min_params, min_tokens)
    return {t: fit(p, holdout, bootstrap, seed, holdout_params=holdout_params) for t, p in sorted(runs.items())}


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _short(x: float) -> str:
    """1.5e9 -> '1.5B': legend labels for sizes and token budgets."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def plot_runs(path: str | os.PathLike, out: str | os.PathLike, task: str | None = None, holdout: int = 0,
              fits: dict[str, Fit] | None = None, min_params: float = 0, min_tokens: float = 0,
              holdout_params: float | None = None) -> Path:
    """Draw the runs of a runs CSV with the fitted laws (`emu3 scaling plot`): per task a row of loss against
    tokens (a colour per size), loss against size (a colour per token budget) and predicted against observed
    loss (the runs `held_out` picks marked as held out). `fits` (task -> Fit) are used
    where given, else each task is fitted without bootstrap; `min_params`, `min_tokens` as `select_runs`.
    Written atomically as .png, .pdf or .svg."""
    from .fsutil import atomic_file

    out = Path(out)
    if out.suffix.lower() not in PLOT_SUFFIXES:
        raise InputError(f"{out}: a plot is written as {', '.join(PLOT_SUFFIXES)}")
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FormatStrFormatter
    except ImportError as e:
        raise InputError('plotting needs matplotlib: pip install "emu3[plot]"') from e

    runs = select_runs(path, task, min_params, min_tokens)
    fits = dict(fits or {})
    for t, points in runs.items():
        if t not in fits:
            fits[t] = fit(points, holdout, bootstrap=0, holdout_params=holdout_params)

    fig = Figure(figsize=(16, 4.6 * len(runs)), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global state
    axes = fig.subplots(len(runs), 3, squeeze=False)
    for row, (t, points) in zip(axes, sorted(runs.items())):
        f = fits[t]
        n, d, loss = points.T
        held = held_out(points, holdout, holdout_params)  # as `fit` holds them out
        for ax, (x, group, name, other) in zip(row[:2], ((d, n, "N", "tokens D"), (n, d, "D", "parameters N"))):
            values = np.unique(group)
            grid = np.geomspace(x.min(), x.max(), 100)
            for i, v in enumerate(values):
                c = colormaps["viridis"](i / max(len(values) - 1, 1))
                sel = group == v
                ax.scatter(x[sel & ~held], loss[sel & ~held], color=c, s=22, label=f"{name}={_short(v)}")
                if (sel & held).any():
                    ax.scatter(x[sel & held], loss[sel & held], color=c, marker="*", s=90, edgecolors="k",
                               linewidths=0.5)
                curve = f.predict(v, grid) if name == "N" else f.predict(grid, v)
                ax.plot(grid, curve, color=c, lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(other)
            ax.set_ylabel("loss")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # not 6x10^0 on a span under a decade
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
            ax.legend(fontsize=7, ncol=2 if len(values) > 6 else 1)
        row[0].set_title(f"{t}: loss vs tokens D", fontsize=10)
        row[1].set_title(f"{t}: loss vs size N; alpha = {f.alpha:.3f}, beta = {f.beta:.3f}", fontsize=10)
        pred = f.predict(n, d)
        ax = row[2]
        lo, hi = min(pred.min(), loss.min()), max(pred.max(), loss.max())
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, ls="--", label="y = x")
        ax.scatter(loss[~held], pred[~held], s=22, color="C0", label="fitted")
        if held.any():
            ax.scatter(loss[held], pred[held], s=90, marker="*", color="C3", edgecolors="k", linewidths=0.5,
                       label=f"held out ({held.sum()})")
            for x, y, nn, dd in zip(loss[held], pred[held], n[held], d[held]):
                ax.annotate(f"N={_short(nn)}, D={_short(dd)}", (x, y), xytext=(6, -3), textcoords="offset points",
                            fontsize=7)
        ax.set_xlabel("observed loss")
        ax.set_ylabel("predicted loss")
        ax.legend(fontsize=7)
        title = f"{t}: $R^2$ = {f.r2:.4f}, MAPE = {f.mape:.2%}"
        if f.holdout_mape is not None:
            title += f", held-out MAPE = {f.holdout_mape:.2%}"
        ax.set_title(title, fontsize=10)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format=out.suffix[1:].lower(), dpi=100)
    return out
