"""Per-model session state: every state tensor preallocated slot-major, ``[capacity, *state]``, on the engine's device.

A slot is one row of every tensor. Sessions own slots; gather and scatter touch only the batch's
slots (cost O(batch) per tensor, never O(capacity)), copying between the slot-major pool and the
graph's layout, whose batch axis may sit anywhere (``StateSpec.batch_axis``); every touch goes
through ``ops``, so on CUDA it is issued on the engine's stream and ordered with onnxruntime's
kernels, and no state byte crosses to the host. A slot is zeroed when allocated, and release is
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
        self.tensors = [
            self.ops.zeros((capacity, *shape), dtype) for shape, dtype in zip(self.shapes, self.dtypes, strict=True)
        ]
        self._free = list(range(capacity - 1, -1, -1))  # stack: pops the lowest slot first
        self._owner: list[object | None] = [None] * capacity

    @staticmethod
    def bytes_needed(states: Sequence[StateSpec], capacity: int) -> int:
        return capacity * sum(int(np.prod(s.session_shape)) * np.dtype(s.dtype).itemsize for s in states)

    @property
    def nbytes(self) -> int:
        return self.bytes_needed(self.specs, self.capacity)

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
        for tensor in self.tensors:
            self.ops.write_row(tensor, slot, 0.0)
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
        return tuple(self.ops.read_row(tensor, slot) for tensor in self.tensors)

    def write(self, slot: int, states: Sequence[np.ndarray]) -> None:
        """Set one slot's state from host arrays (for resume); ValueError naming what does not fit."""
        check_states(self.specs, states)
        for tensor, state, dtype in zip(self.tensors, states, self.dtypes, strict=True):
            self.ops.write_row(tensor, slot, np.asarray(state).astype(dtype, copy=False))


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
