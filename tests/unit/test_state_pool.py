"""StatePool: slots are zeroed on allocation, owned, released idempotently; gather/scatter touch only rows."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.model.manifest import StateSpec
from cellserve.server.errors import ResourceExhausted
from cellserve.server.state_pool import StatePool


def lstm_states(layers: int, hidden: int) -> list[StateSpec]:
    """Our LSTM's h and c: float32 ``[L, B, H]``."""
    shape = (layers, "B", hidden)
    return [StateSpec("h0", "hn", "float32", shape), StateSpec("c0", "cn", "float32", shape)]


def test_allocated_slot_is_zeroed_even_after_a_previous_owner_wrote_it():
    pool = StatePool(lstm_states(2, 4), capacity=1)
    a = object()
    slot = pool.allocate(a)
    pool.write(slot, [np.ones((2, 4), np.float32), np.full((2, 4), 2.0, np.float32)])
    h, c = pool.read(slot)
    assert (h == 1).all() and (c == 2).all()
    assert pool.release(slot, a)
    b = object()
    assert pool.allocate(b) == slot
    h, c = pool.read(slot)
    assert not h.any() and not c.any()


def test_release_is_idempotent_and_never_frees_another_owners_slot():
    pool = StatePool(lstm_states(1, 2), capacity=2)
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


def test_storage_is_the_graph_layout_with_the_slots_at_the_batch_axis_and_sized_by_every_state():
    specs = [*lstm_states(3, 5), StateSpec("cache", "new_cache", "float16", ("B", 4, 2))]
    pool = StatePool(specs, capacity=10)
    assert [t.shape for t in pool.tensors] == [(3, 10, 5), (3, 10, 5), (10, 4, 2)]  # what gathers copy from
    assert [t.shape for t in pool.by_slot] == [(10, 3, 5), (10, 3, 5), (10, 4, 2)]
    assert [t.dtype for t in pool.by_slot] == [np.float32, np.float32, np.float16]
    assert pool.nbytes == StatePool.bytes_needed(specs, 10) == 10 * (2 * 3 * 5 * 4 + 4 * 2 * 2)


def test_gather_and_scatter_touch_only_the_batch_rows():
    rng = np.random.default_rng(0)
    pool = StatePool(lstm_states(3, 5), capacity=10)
    owners = [object() for _ in range(10)]
    for o in owners:
        slot = pool.allocate(o)
        pool.write(slot, [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(2)])
    before_h, before_c = pool.by_slot[0].copy(), pool.by_slot[1].copy()  # [S, L, H]
    rows = np.array([7, 2, 5])
    h_out, c_out = np.empty((3, 3, 5), np.float32), np.empty((3, 3, 5), np.float32)  # [L, B, H]
    pool.gather(rows, [h_out, c_out])
    np.testing.assert_array_equal(h_out, before_h[rows].transpose(1, 0, 2))
    np.testing.assert_array_equal(c_out, before_c[rows].transpose(1, 0, 2))
    pool.scatter(rows, [h_out + 1, c_out - 1])
    others = np.setdiff1d(np.arange(10), rows)
    np.testing.assert_array_equal(pool.by_slot[0][others], before_h[others])
    np.testing.assert_array_equal(pool.by_slot[1][others], before_c[others])
    np.testing.assert_array_equal(pool.by_slot[0][rows], before_h[rows] + 1)
    np.testing.assert_array_equal(pool.by_slot[1][rows], before_c[rows] - 1)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_state_with_its_batch_axis_anywhere_is_gathered_and_scattered_at_that_axis(axis: int, dtype: str):
    rng = np.random.default_rng(axis)
    session = (3, 4)  # one session's state; "B" goes in at ``axis``
    shape: list[int | str] = list(session)
    shape.insert(axis, "B")
    spec = StateSpec("s", "s_out", dtype, tuple(shape))
    assert spec.batch_axis == axis and spec.session_shape == session
    capacity = 9
    pool = StatePool([spec], capacity)
    for _ in range(capacity):
        slot = pool.allocate(object())
        pool.write(slot, [rng.standard_normal(session).astype(dtype)])
    before = pool.by_slot[0].copy()  # [S, 3, 4]
    rows = np.array([6, 0, 3, 8])
    out = np.empty(spec.graph_shape(len(rows)), dtype)
    pool.gather(rows, [out])
    np.testing.assert_array_equal(out, np.moveaxis(np.take(before, rows, axis=0), 0, axis))
    for b, slot in enumerate(rows):  # row b of the graph layout is slot rows[b]'s state
        np.testing.assert_array_equal(np.take(out, b, axis=axis), pool.read(int(slot))[0])
    new = rng.standard_normal(out.shape).astype(dtype)
    pool.scatter(rows, [new])
    others = np.setdiff1d(np.arange(capacity), rows)
    np.testing.assert_array_equal(pool.by_slot[0][others], before[others])  # only the batch's rows were touched
    np.testing.assert_array_equal(pool.by_slot[0][rows], np.moveaxis(new, axis, 0))
    for b, slot in enumerate(rows):
        np.testing.assert_array_equal(pool.read(int(slot))[0], np.take(new, b, axis=axis))


def test_states_of_different_shapes_dtypes_and_batch_axes_move_together():
    rng = np.random.default_rng(3)
    specs = [
        StateSpec("h", "hn", "float32", (2, "B", 5)),
        StateSpec("cache", "new_cache", "float16", ("B", 3, 4)),
        StateSpec("stacked", "stacked_n", "float32", (2, 1, 2, "B")),
    ]
    pool = StatePool(specs, capacity=6)
    for _ in range(6):
        slot = pool.allocate(object())
        pool.write(slot, [rng.standard_normal(s.session_shape).astype(s.dtype) for s in specs])
    before = [t.copy() for t in pool.by_slot]
    rows = np.array([4, 1])
    outs = [np.empty(s.graph_shape(2), s.dtype) for s in specs]
    pool.gather(rows, outs)
    for spec, out, old in zip(specs, outs, before, strict=True):
        np.testing.assert_array_equal(out, np.moveaxis(old[rows], 0, spec.batch_axis))
    pool.scatter(rows, [o * 2 for o in outs])
    others = np.setdiff1d(np.arange(6), rows)
    for tensor, old in zip(pool.by_slot, before, strict=True):
        np.testing.assert_array_equal(tensor[others], old[others])
        np.testing.assert_array_equal(tensor[rows], old[rows] * 2)


def test_write_rejects_state_of_the_wrong_shape_dtype_or_count():
    pool = StatePool(lstm_states(2, 4), capacity=1)
    slot = pool.allocate(object())
    good = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        pool.write(slot, [np.zeros((2, 5), np.float32), good])
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        pool.write(slot, [good, np.zeros((2, 5), np.float32)])
    with pytest.raises(ValueError, match="float32"):
        pool.write(slot, [good, good.astype(np.float16)])
    with pytest.raises(ValueError, match="2 state tensors, got 1"):
        pool.write(slot, [good])
    with pytest.raises(ValueError, match="2 state tensors, got 3"):
        pool.write(slot, [good, good, good])
    h, c = pool.read(slot)
    assert not h.any() and not c.any()  # a refused write changed nothing
