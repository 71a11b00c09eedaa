"""Orders in which the h x w visual tokens of an image are written into a sequence (paper 002).

An order is a permutation `perm` of the h*w grid positions (row-major flat indices): the k-th
visual token of the sequence is `grid.flat[perm[k]]`, and `grid.flat[perm] = sequence` inverts it
exactly.

- raster: row by row, left to right (the released order).
- diagonal: anti-diagonals i + j = 0, 1, ..., top row first within each diagonal.
- block: raster over b x b blocks, raster inside each block (partial blocks at the edges).
- spiral: clockwise from the top-left corner, ring by ring inwards. The outer k rings come first,
  so keeping them as a prompt and generating the rest inpaints the interior (`border_tokens`).

Row markers under every order: EOL follows every w visual tokens *in sequence order*. The
sequence therefore has exactly the released shape (h runs of w tokens, each closed by EOL, then
EOF), so the parser and the generation constraint count the same way for every order; EOL marks a
spatial row only in raster order.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import InputError

ORDERS = ("raster", "diagonal", "block", "spiral")


def _check(h: int, w: int, order: str) -> None:
    if order not in ORDERS:
        raise InputError(f"unknown token order {order!r}; choose one of {', '.join(ORDERS)}")
    if h < 1 or w < 1:
        raise InputError(f"grid must be at least 1x1, got {h}x{w}")


@lru_cache(maxsize=256)
def _permutation(h: int, w: int, order: str, block: int) -> np.ndarray:
    i, j = np.divmod(np.arange(h * w), w)  # row and column of every flat index
    if order == "raster":
        perm = np.arange(h * w)
    elif order == "diagonal":
        perm = np.lexsort((i, i + j))  # by diagonal, then by row
    elif order == "block":
        perm = np.lexsort((j, i, j // block, i // block))  # block row, block column, then inside the block
    else:
        perm = _spiral(h, w)
    perm.setflags(write=False)
    return perm


def _spiral(h: int, w: int) -> np.ndarray:
    out = []
    top, bottom, left, right = 0, h - 1, 0, w - 1
    while top <= bottom and left <= right:
        out += [top * w + c for c in range(left, right + 1)]
        out += [r * w + right for r in range(top + 1, bottom + 1)]
        if top < bottom:
            out += [bottom * w + c for c in range(right - 1, left - 1, -1)]
        if left < right:
            out += [r * w + left for r in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return np.array(out, dtype=np.int64)


def permutation(h: int, w: int, order: str = "raster", block: int = 4) -> np.ndarray:
    """Flat grid index of the k-th sequence token, for k in [0, h*w) (read-only array)."""
    _check(h, w, order)
    if block < 1:
        raise InputError(f"block size must be >= 1, got {block}")
    return _permutation(h, w, order, block if order == "block" else 0)


def to_sequence(grid: np.ndarray, order: str = "raster", block: int = 4) -> np.ndarray:
    """(h, w) grid -> (h*w,) sequence in `order`."""
    grid = np.asarray(grid)
    if grid.ndim != 2:
        raise InputError(f"expected an (h, w) grid, got shape {grid.shape}")
    return grid.reshape(-1)[permutation(*grid.shape, order, block)]


def from_sequence(seq: np.ndarray, h: int, w: int, order: str = "raster", block: int = 4) -> np.ndarray:
    """(h*w,) sequence in `order` -> (h, w) grid; the exact inverse of `to_sequence`."""
    seq = np.asarray(seq)
    if seq.shape != (h * w,):
        raise InputError(f"expected {h * w} tokens for a {h}x{w} grid, got shape {seq.shape}")
    grid = np.empty(h * w, dtype=seq.dtype)
    grid[permutation(h, w, order, block)] = seq
    return grid.reshape(h, w)


def border_tokens(h: int, w: int, rings: int) -> int:
    """How many spiral-order tokens cover the outer `rings` rings (the inpainting prompt length)."""
    if rings < 0:
        raise InputError(f"rings must be >= 0, got {rings}")
    inner_h, inner_w = max(0, h - 2 * rings), max(0, w - 2 * rings)
    return h * w - inner_h * inner_w
