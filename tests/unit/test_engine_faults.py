"""A failed Engine.run_slots leaves every slot's state as it was: the scheduler retries the innocent steps of a
failed call and tells the failing one its session's state is unchanged, so neither may have moved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cellserve.model.manifest import load_manifest
from cellserve.server.engine import Engine, out_of_memory
from cellserve.server.state_pool import StatePool


class _Failing:
    """Array ops whose ``method`` raises MemoryError: a host or pinned buffer that cannot be allocated."""

    def __init__(self, ops: Any, method: str) -> None:
        self._ops, self._method = ops, method

    def __getattr__(self, name: str) -> Any:
        if name == self._method:
            raise MemoryError(f"cannot allocate in {name}")
        return getattr(self._ops, name)


def make_engine(model_dir: Path) -> Engine:
    manifest = load_manifest(model_dir)
    pool = StatePool(manifest.states, 4)
    rng = np.random.default_rng(3)
    for _ in range(4):
        slot = pool.allocate(object())
        pool.write(slot, [rng.standard_normal(shape).astype(np.float32) for shape in pool.shapes])
    return Engine(manifest, model_dir, pool, intra_op_threads=1)


@pytest.mark.parametrize("where", ["download", "scatter"])
def test_a_call_that_fails_after_onnxruntime_ran_leaves_the_slots_unchanged(tiny_model_dir: Path, where: str):
    engine = make_engine(tiny_model_dir)
    pool = engine.pool
    slots = np.array([2, 0], dtype=np.int64)
    x = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)  # [B, T]
    h, c = (t.copy() for t in pool.by_slot)  # [S, L, H]
    ops = engine.ops
    if where == "download":
        engine.ops = _Failing(ops, "download")  # y cannot come down after the scatter
    else:
        scatters: list[int] = []

        def half_a_scatter(rows: Any, news: list[Any]) -> None:
            """The first scatter writes h, then fails before c; later ones (the restore) are real."""
            scatters.append(1)
            h_new, c_new = news
            pool.ops.put_rows(pool.tensors[0], rows, h_new, pool.axes[0])
            if len(scatters) == 1:
                raise MemoryError("cannot allocate in put_rows")
            pool.ops.put_rows(pool.tensors[1], rows, c_new, pool.axes[1])

        pool.scatter = half_a_scatter  # type: ignore[method-assign]

    with pytest.raises(MemoryError):
        engine.run_slots(slots, x)

    np.testing.assert_array_equal(pool.by_slot[0], h)
    np.testing.assert_array_equal(pool.by_slot[1], c)
    engine.ops = ops
    y = engine.run_slots(slots, x)  # and the next call starts from that unchanged state
    fresh = make_engine(tiny_model_dir)
    np.testing.assert_array_equal(y, fresh.run_slots(slots, x))
    np.testing.assert_array_equal(pool.by_slot[0], fresh.pool.by_slot[0])
    np.testing.assert_array_equal(pool.by_slot[1], fresh.pool.by_slot[1])


@pytest.mark.parametrize(
    ("error", "oom"),
    [
        (MemoryError(), True),
        (
            RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"),
            True,
        ),
        (RuntimeError("std::bad_alloc"), True),
        (RuntimeError("CUDA error cudaErrorMemoryAllocation:out of memory"), True),
        (RuntimeError("CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x"), False),
        (ValueError("x"), False),
    ],
)
def test_out_of_memory_is_recognised_from_onnxruntime_cuda_and_python(error: Exception, oom: bool):
    assert out_of_memory(error) is oom
