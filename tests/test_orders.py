"""Token orders: exact permutations with exact inverses (property tests) and their defining shapes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emu3.errors import InputError
from emu3.orders import ORDERS, border_tokens, from_sequence, permutation, to_sequence

sides = st.integers(min_value=1, max_value=24)


@settings(max_examples=300, deadline=None)
@given(h=sides, w=sides, order=st.sampled_from(ORDERS), block=st.integers(1, 6))
def test_every_order_is_a_permutation_with_an_exact_inverse(h, w, order, block):
    perm = permutation(h, w, order, block)
    assert sorted(perm.tolist()) == list(range(h * w))
    grid = np.random.default_rng(h * 100 + w).integers(0, 1000, (h, w))
    assert np.array_equal(from_sequence(to_sequence(grid, order, block), h, w, order, block), grid)


@settings(max_examples=100, deadline=None)
@given(h=sides, w=sides)
def test_order_shapes(h, w):
    i, j = np.divmod(np.arange(h * w), w)
    assert np.array_equal(permutation(h, w, "raster"), np.arange(h * w))
    d = permutation(h, w, "diagonal")
    assert np.all(np.diff((i + j)[d]) >= 0)  # anti-diagonals in order
    b = permutation(h, w, "block", 3)
    block_index = (i // 3) * (-(-w // 3)) + j // 3
    assert np.all(np.diff(block_index[b]) >= 0)  # blocks in raster order
    s = permutation(h, w, "spiral")
    ring = np.minimum(np.minimum(i, j), np.minimum(h - 1 - i, w - 1 - j))
    assert np.all(np.diff(ring[s]) >= 0)  # ring by ring, inwards
    for rings in range(0, max(h, w)):
        n = border_tokens(h, w, rings)
        assert set(s[:n].tolist()) == set(np.flatnonzero(ring < rings).tolist())


def test_small_examples_by_hand():
    assert permutation(3, 3, "spiral").tolist() == [0, 1, 2, 5, 8, 7, 6, 3, 4]
    assert permutation(2, 3, "diagonal").tolist() == [0, 1, 3, 2, 4, 5]
    assert permutation(4, 4, "block", 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert border_tokens(90, 90, 10) == 90 * 90 - 70 * 70


def test_bad_orders():
    with pytest.raises(InputError, match="unknown token order 'zigzag'"):
        permutation(2, 2, "zigzag")
    with pytest.raises(InputError, match="expected 6 tokens"):
        from_sequence(np.arange(5), 2, 3)
    with pytest.raises(InputError, match="block size"):
        permutation(4, 4, "block", 0)
