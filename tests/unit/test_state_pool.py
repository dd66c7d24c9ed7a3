"""StatePool: slots are zeroed on allocation, owned, released idempotently; gather/scatter touch only rows."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.server.errors import ResourceExhausted
from cellserve.server.state_pool import StatePool


def test_allocated_slot_is_zeroed_even_after_a_previous_owner_wrote_it():
    pool = StatePool(layers=2, hidden=4, capacity=1)
    a = object()
    slot = pool.allocate(a)
    pool.write(slot, np.ones((2, 4)), np.full((2, 4), 2.0))
    assert pool.release(slot, a)
    b = object()
    assert pool.allocate(b) == slot
    h, c = pool.read(slot)
    assert not h.any() and not c.any()


def test_release_is_idempotent_and_never_frees_another_owners_slot():
    pool = StatePool(layers=1, hidden=2, capacity=2)
    a, b = object(), object()
    sa, sb = pool.allocate(a), pool.allocate(b)
    assert not pool.release(sa, b)  # wrong owner
    assert not pool.release(99, a)  # unknown slot
    assert pool.release(sa, a)
    assert not pool.release(sa, a)  # twice
    assert pool.used == 1
    assert pool.allocate(object()) == sa
    with pytest.raises(ResourceExhausted, match="all 2 session slots"):
        pool.allocate(object())
    assert pool.release(sb, b)


def test_gather_and_scatter_touch_only_the_batch_rows():
    rng = np.random.default_rng(0)
    pool = StatePool(layers=3, hidden=5, capacity=10)
    owners = [object() for _ in range(10)]
    for o in owners:
        slot = pool.allocate(o)
        pool.write(slot, rng.standard_normal((3, 5)), rng.standard_normal((3, 5)))
    before_h, before_c = pool.h.copy(), pool.c.copy()
    rows = np.array([7, 2, 5])
    h_out, c_out = np.empty((3, 3, 5), np.float32), np.empty((3, 3, 5), np.float32)
    pool.gather(rows, h_out, c_out)
    np.testing.assert_array_equal(h_out, before_h[:, rows, :])
    np.testing.assert_array_equal(c_out, before_c[:, rows, :])
    pool.scatter(rows, h_out + 1, c_out - 1)
    others = np.setdiff1d(np.arange(10), rows)
    np.testing.assert_array_equal(pool.h[:, others, :], before_h[:, others, :])
    np.testing.assert_array_equal(pool.h[:, rows, :], before_h[:, rows, :] + 1)
    np.testing.assert_array_equal(pool.c[:, rows, :], before_c[:, rows, :] - 1)


def test_write_rejects_state_of_the_wrong_shape():
    pool = StatePool(layers=2, hidden=4, capacity=1)
    slot = pool.allocate(object())
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        pool.write(slot, np.zeros((2, 5)), np.zeros((2, 5)))
