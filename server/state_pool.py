"""Per-model session state: every state tensor preallocated on the engine's device, in the graph's own layout
with the capacity at the state's batch axis (``[L, capacity, H]`` for an LSTM's h; ``[capacity, C, K]`` for a
batch-first cache, which is then slot-major).

A slot is one index of every tensor's batch axis. Sessions own slots; gather and scatter touch only
the batch's slots (cost O(batch) per tensor, never O(capacity)) and copy them straight to and from
the contiguous buffers onnxruntime reads and writes. Why not slot-major for every tensor: a state
whose batch axis is not first (an LSTM's ``[L, B, H]``) would need its batch axis moved on every
gather and scatter, which measured 3x dearer at batch 1 (the shipped model: 22.8 against 7.5 µs per
call for both tensors; 51 against 27 µs at batch 64). Every touch goes through ``ops``, so on CUDA
it is issued on the engine's stream and ordered with onnxruntime's kernels, and no state byte
crosses to the host. A slot is zeroed when allocated, and release is
idempotent and checks the owner, so no session can ever free (or see) another's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cellserve.model.manifest import StateSpec
from cellserve.server.arrays import ArrayOps, NumpyOps
from cellserve.server.errors import ResourceExhausted


class StatePool:
    """Fixed-capacity slot allocator plus the state tensors it indexes (one per state pair, in manifest order)."""

    def __init__(self, states: Sequence[StateSpec], capacity: int, ops: ArrayOps | None = None) -> None:
        self.specs = tuple(states)
        self.capacity = capacity
        self.ops: ArrayOps = ops or NumpyOps()
        self.dtypes = tuple(np.dtype(s.dtype) for s in self.specs)
        self.axes = tuple(s.batch_axis for s in self.specs)
        self.shapes = tuple(s.session_shape for s in self.specs)
        pairs = zip(self.specs, self.dtypes, strict=True)
        self.tensors = [self.ops.zeros(spec.graph_shape(capacity), dtype) for spec, dtype in pairs]
        self._free = list(range(capacity - 1, -1, -1))  # stack: pops the lowest slot first
        self._owner: list[object | None] = [None] * capacity

    @staticmethod
    def bytes_needed(states: Sequence[StateSpec], capacity: int) -> int:
        return capacity * sum(int(np.prod(s.session_shape)) * np.dtype(s.dtype).itemsize for s in states)

    @property
    def nbytes(self) -> int:
        return self.bytes_needed(self.specs, self.capacity)

    @property
    def by_slot(self) -> list[Any]:
        """Every tensor viewed slot-major, ``[capacity, *state]`` (views, no copies: for tests and debugging;
        CuPy arrays dispatch ``np.moveaxis`` to CuPy's)."""
        return [np.moveaxis(tensor, axis, 0) for tensor, axis in zip(self.tensors, self.axes, strict=True)]

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, owner: object) -> int:
        """A zeroed slot for ``owner``; RESOURCE_EXHAUSTED when every slot is taken."""
        if not self._free:
            raise ResourceExhausted(
                f"state pool is full: all {self.capacity} session slots are in use "
                "(setting capacity); close idle sessions or retry later"
            )
        slot = self._free.pop()
        self._owner[slot] = owner
        for tensor, axis in zip(self.tensors, self.axes, strict=True):
            self.ops.write_row(tensor, slot, 0.0, axis)
        return slot

    def release(self, slot: int, owner: object) -> bool:
        """Free ``slot`` if ``owner`` holds it; releasing twice or with another owner does nothing."""
        if not 0 <= slot < self.capacity or self._owner[slot] is not owner:
            return False
        self._owner[slot] = None
        self._free.append(slot)
        return True

    def gather(self, rows: object, outs: Sequence[Any]) -> None:
        """Copy the batch's slots into each state's graph-layout buffer (rows from ``ops.index``)."""
        for tensor, out, axis in zip(self.tensors, outs, self.axes, strict=True):
            self.ops.take_rows(tensor, rows, out, axis)

    def scatter(self, rows: object, news: Sequence[Any]) -> None:
        """Write the batch's next state (graph layout) back into its slots."""
        for tensor, new, axis in zip(self.tensors, news, self.axes, strict=True):
            self.ops.put_rows(tensor, rows, new, axis)

    def read(self, slot: int) -> tuple[np.ndarray, ...]:
        """Host copies of one slot's state, one array per state tensor (for snapshots)."""
        pairs = zip(self.tensors, self.axes, strict=True)
        return tuple(self.ops.read_row(tensor, slot, axis) for tensor, axis in pairs)

    def write(self, slot: int, states: Sequence[np.ndarray]) -> None:
        """Set one slot's state from host arrays (for resume); ValueError naming what does not fit."""
        check_states(self.specs, states)
        for tensor, state, dtype, axis in zip(self.tensors, states, self.dtypes, self.axes, strict=True):
            self.ops.write_row(tensor, slot, np.asarray(state).astype(dtype, copy=False), axis)


def check_states(specs: Sequence[StateSpec], states: Sequence[np.ndarray]) -> None:
    """ValueError unless ``states`` are one array per spec, each of its session shape and dtype."""
    if len(states) != len(specs):
        raise ValueError(f"the model keeps {len(specs)} state tensors, got {len(states)}")
    for spec, state in zip(specs, states, strict=True):
        if tuple(state.shape) != spec.session_shape or state.dtype != np.dtype(spec.dtype):
            raise ValueError(
                f"state {spec.input!r} must be {spec.dtype} {list(spec.session_shape)}, got {state.dtype} "
                f"{list(state.shape)}"
            )
