"""Engine.run_slots (IO binding on the pool's buffers) against plain onnxruntime runs and the numpy oracle."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cellserve.model.manifest import load_manifest
from cellserve.server.engine import Engine
from cellserve.server.state_pool import StatePool

TOL = 1e-5  # float32 engine vs float64 oracle on the tiny model


def make_engine(model_dir: Path, capacity: int) -> Engine:
    manifest = load_manifest(model_dir)
    pool = StatePool(manifest.states, capacity)
    return Engine(manifest, model_dir, pool, intra_op_threads=1)


def hc(pool: StatePool, slots: object) -> tuple[np.ndarray, np.ndarray]:
    """Copies of the h and c of ``slots`` in the graph's layout ``[L, B, H]`` (the pool is ``[S, L, H]``)."""
    h, c = pool.by_slot
    return np.moveaxis(h[slots], 0, 1).copy(), np.moveaxis(c[slots], 0, 1).copy()


def fill_random(pool: StatePool, rng: np.random.Generator) -> list[int]:
    """Allocate every slot and give each a distinct random state; returns the slots."""
    slots = []
    for _ in range(pool.capacity):
        slot = pool.allocate(object())
        pool.write(slot, [rng.standard_normal(shape).astype(np.float32) for shape in pool.shapes])
        slots.append(slot)
    return slots


def tokens(rng: np.random.Generator, batch: int, steps: int) -> np.ndarray:
    return rng.integers(0, 256, size=(batch, steps), dtype=np.int64)  # [B, T]


@pytest.fixture
def engine(tiny_model_dir: Path) -> Engine:
    return make_engine(tiny_model_dir, capacity=16)


def test_run_slots_equals_a_plain_onnxruntime_run_and_the_oracle(engine, tiny_oracle):
    rng = np.random.default_rng(1)
    fill_random(engine.pool, rng)
    slots = np.array([11, 2, 7], dtype=np.int64)
    x = tokens(rng, 3, 5)
    h0, c0 = hc(engine.pool, slots)  # [L, B, H]

    y = engine.run_slots(slots, x)

    y_plain, hn_plain, cn_plain = engine.session.run(None, {"x": x, "h0": h0, "c0": c0})
    hn, cn = hc(engine.pool, slots)
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_array_equal(hn, hn_plain)
    np.testing.assert_array_equal(cn, cn_plain)
    y_ref, hn_ref, cn_ref = tiny_oracle.run(x, h0, c0)
    np.testing.assert_allclose(y, y_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(hn, hn_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(cn, cn_ref, atol=TOL, rtol=0)


def test_rows_outside_the_batch_are_untouched(engine):
    rng = np.random.default_rng(2)
    fill_random(engine.pool, rng)
    slots = np.array([0, 15, 8, 3], dtype=np.int64)
    before_h, before_c = (t.copy() for t in engine.pool.by_slot)  # [S, L, H]
    engine.run_slots(slots, tokens(rng, 4, 3))
    h, c = engine.pool.by_slot
    others = np.setdiff1d(np.arange(16), slots)
    np.testing.assert_array_equal(h[others], before_h[others])
    np.testing.assert_array_equal(c[others], before_c[others])
    assert not np.array_equal(h[slots], before_h[slots])  # the batch did move
    assert not np.array_equal(c[slots], before_c[slots])


def test_chunked_steps_across_batches_match_the_oracle_sequence(engine, tiny_oracle):
    """Sessions stepped in chunks of varying T, in different batch mixes, equal one oracle run each."""
    rng = np.random.default_rng(3)
    slots = [engine.pool.allocate(object()) for _ in range(6)]
    seqs = {s: tokens(rng, 1, 12)[0] for s in slots}
    done = dict.fromkeys(slots, 0)
    outputs: dict[int, list[np.ndarray]] = {s: [] for s in slots}
    schedule = [([0, 1, 2, 3, 4, 5], 2), ([1, 3], 3), ([0, 2, 4, 5], 3), ([5, 4, 3, 2, 1, 0], 1), ([0, 2, 4, 5], 1)]
    schedule += [([1, 3], 1), ([0, 1, 2, 3, 4, 5], 5)]
    for members, t in schedule:
        batch = np.array([slots[i] for i in members], dtype=np.int64)
        x = np.stack([seqs[s][done[s] : done[s] + t] for s in batch])  # [B, T]
        y = engine.run_slots(batch, x)
        for i, s in enumerate(batch):
            outputs[s].append(y[i])
            done[s] += t
    for s in slots:
        assert done[s] == 12
        y_ref, hn_ref, cn_ref = tiny_oracle.run(seqs[s][None, :])
        np.testing.assert_allclose(np.concatenate(outputs[s]), y_ref[0], atol=TOL, rtol=0)
        h, c = engine.pool.read(s)  # [L, H]
        np.testing.assert_allclose(h, hn_ref[:, 0, :], atol=TOL, rtol=0)
        np.testing.assert_allclose(c, cn_ref[:, 0, :], atol=TOL, rtol=0)


def test_buffers_and_binding_are_reused_per_shape_with_fixed_addresses(engine):
    rng = np.random.default_rng(4)
    fill_random(engine.pool, rng)
    engine.run_slots(np.array([1, 2, 3]), tokens(rng, 3, 2))
    first = engine._buckets[(3, (2,))]  # (batch, step shape [T])

    def buffers(bucket: Any) -> list[Any]:
        return [bucket.x, bucket.y, *bucket.states_in, *bucket.states_out]

    ptrs = [engine.ops.ptr(b) for b in buffers(first)]
    assert len(ptrs) == 6 and len(set(ptrs)) == 6
    engine.run_slots(np.array([4, 5, 6]), tokens(rng, 3, 2))
    again = engine._buckets[(3, (2,))]
    assert again is first and again.binding is first.binding
    assert [engine.ops.ptr(b) for b in buffers(again)] == ptrs
    engine.run_slots(np.array([7]), tokens(rng, 1, 1))
    one = engine._buckets[(1, (1,))]
    assert one.binding is not first.binding and one.y.shape == (1, 1, 256)
    assert [s.shape for s in (*one.states_in, *one.states_out)] == [(2, 1, 32)] * 4
    # Views of the same fixed buffers: a smaller shape starts at the same address.
    assert [engine.ops.ptr(b) for b in buffers(one)] == ptrs


def test_returned_outputs_are_copies_that_later_calls_do_not_overwrite(engine, tiny_oracle):
    rng = np.random.default_rng(9)
    fill_random(engine.pool, rng)
    x1, x2 = tokens(rng, 2, 3), tokens(rng, 2, 3)
    h0, c0 = hc(engine.pool, [4, 5])
    y1 = engine.run_slots(np.array([4, 5]), x1)
    kept = y1.copy()
    engine.run_slots(np.array([6, 7]), x2)
    np.testing.assert_array_equal(y1, kept)
    np.testing.assert_allclose(y1, tiny_oracle.run(x1, h0, c0)[0], atol=TOL, rtol=0)


def test_a_larger_batch_regrows_the_buffers_and_smaller_ones_stay_correct(engine, tiny_oracle):
    rng = np.random.default_rng(5)
    fill_random(engine.pool, rng)
    for batch, steps in ((3, 2), (9, 1), (3, 2), (16, 4), (2, 7), (3, 2)):
        slots = rng.choice(16, size=batch, replace=False).astype(np.int64)
        x = tokens(rng, batch, steps)
        h0, c0 = hc(engine.pool, slots)
        y = engine.run_slots(slots, x)
        y_ref, hn_ref, cn_ref = tiny_oracle.run(x, h0, c0)
        hn, cn = hc(engine.pool, slots)
        np.testing.assert_allclose(y, y_ref, atol=TOL, rtol=0)
        np.testing.assert_allclose(hn, hn_ref, atol=TOL, rtol=0)
        np.testing.assert_allclose(cn, cn_ref, atol=TOL, rtol=0)


def test_onnxruntime_writes_into_our_buffers_and_reads_h0_c0_from_them(engine, tiny_oracle):
    """The bound outputs are exactly the engine's buffers (pointer identity), and x/h0/c0 are read in place."""
    rng = np.random.default_rng(6)
    fill_random(engine.pool, rng)
    y = engine.run_slots(np.array([3, 9]), tokens(rng, 2, 4))
    bucket = engine._buckets[(2, (4,))]
    h_in, c_in = bucket.states_in
    h_out, c_out = bucket.states_out
    got = [v.data_ptr() for v in bucket.binding.get_outputs()]  # in binding order: y, hn, cn
    assert got == [engine.ops.ptr(bucket.y), engine.ops.ptr(h_out), engine.ops.ptr(c_out)]
    np.testing.assert_array_equal(y, bucket.y)

    # Write x and a state straight into the bound memory and run the binding as it is: the outputs
    # follow them, so onnxruntime read our buffers and took no copy at bind time.
    h_new = rng.standard_normal(h_in.shape).astype(np.float32)
    c_new = rng.standard_normal(c_in.shape).astype(np.float32)
    x = tokens(rng, 2, 4)
    h_in[...], c_in[...], bucket.x[...] = h_new, c_new, x
    engine.session.run_with_iobinding(bucket.binding)
    y_ref, hn_ref, cn_ref = tiny_oracle.run(x, h_new, c_new)
    np.testing.assert_allclose(bucket.y, y_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(h_out, hn_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(c_out, cn_ref, atol=TOL, rtol=0)


def test_warmup_leaves_every_slot_unchanged(engine):
    rng = np.random.default_rng(7)
    fill_random(engine.pool, rng)
    before_h, before_c = (t.copy() for t in engine.pool.by_slot)
    engine.warmup([1, 4, 16])
    np.testing.assert_array_equal(engine.pool.by_slot[0], before_h)
    np.testing.assert_array_equal(engine.pool.by_slot[1], before_c)
    assert set(engine._buckets) >= {(1, (1,)), (4, (1,)), (16, (1,))}


def test_engine_thread_and_pool_calls_from_another_thread_do_not_interfere(tiny_model_dir, tiny_oracle):
    """engine_mode=thread: run_slots in a worker while the loop thread allocates, writes and reads other slots."""
    engine = make_engine(tiny_model_dir, capacity=64)
    pool = engine.pool
    rng = np.random.default_rng(8)
    stepped = [pool.allocate(object()) for _ in range(8)]
    seqs = tokens(rng, 8, 40)  # [8, 40]
    ys: list[np.ndarray] = []
    failure: list[BaseException] = []
    start = threading.Event()

    def worker() -> None:
        try:
            start.wait(10)
            for t in range(0, 40, 2):
                ys.append(engine.run_slots(np.array(stepped, dtype=np.int64), seqs[:, t : t + 2]))
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=worker, name="engine-test")
    thread.start()
    start.set()
    expected: dict[int, np.ndarray] = {}
    for i in range(400):  # churn slots the engine is not stepping
        owner = object()
        slot = pool.allocate(owner)
        assert slot not in stepped
        h = np.full(pool.shapes[0], float(i), np.float32)
        pool.write(slot, [h, -h])
        got_h, got_c = pool.read(slot)
        np.testing.assert_array_equal(got_h, h)
        np.testing.assert_array_equal(got_c, -h)
        if i % 3 or len(expected) >= 40:
            assert pool.release(slot, owner)
        else:
            expected[slot] = h
        if not thread.is_alive():
            break
    thread.join(60)
    assert not thread.is_alive() and not failure, failure
    y_ref, hn_ref, cn_ref = tiny_oracle.run(seqs)
    np.testing.assert_allclose(np.concatenate(ys, axis=1), y_ref, atol=TOL, rtol=0)
    hn, cn = hc(pool, stepped)
    np.testing.assert_allclose(hn, hn_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(cn, cn_ref, atol=TOL, rtol=0)
    for slot, h in expected.items():
        np.testing.assert_array_equal(pool.by_slot[0][slot], h)
        np.testing.assert_array_equal(pool.by_slot[1][slot], -h)


def test_run_stateless_takes_and_returns_every_state_in_graph_layout_and_leaves_the_pool_alone(engine, tiny_oracle):
    rng = np.random.default_rng(10)
    fill_random(engine.pool, rng)
    before = [t.copy() for t in engine.pool.by_slot]
    zeros = engine.zero_states(3)
    assert [(s.shape, s.dtype) for s in zeros] == [((2, 3, 32), np.float32)] * 2 and not any(s.any() for s in zeros)
    x = tokens(rng, 3, 4)
    h0, c0 = hc(engine.pool, [5, 1, 12])
    y, (hn, cn) = engine.run_stateless(x, [h0, c0])
    y_ref, hn_ref, cn_ref = tiny_oracle.run(x, h0, c0)
    np.testing.assert_allclose(y, y_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(hn, hn_ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(cn, cn_ref, atol=TOL, rtol=0)
    for tensor, old in zip(engine.pool.by_slot, before, strict=True):
        np.testing.assert_array_equal(tensor, old)
    y_zero, (hz, cz) = engine.run_stateless(x, zeros)  # the state carried on by the caller
    y_two, _ = engine.run_stateless(x[:, 2:], [hz, cz])
    y_whole = engine.run_stateless(np.concatenate([x, x[:, 2:]], axis=1), engine.zero_states(3))[0]
    np.testing.assert_allclose(np.concatenate([y_zero, y_two], axis=1), y_whole, atol=TOL, rtol=0)
