"""Per-model session state: preallocated h and c ``[layers, capacity, hidden]`` on the engine's device.

A slot is a column of both tensors. Sessions own slots; gather and scatter touch only the batch's
slots (cost O(batch), never O(capacity)); every touch of the tensors goes through ``ops``, so on
CUDA it is issued on the engine's stream and ordered with onnxruntime's kernels. A slot is zeroed
when allocated, and release is idempotent and checks the owner, so no session can ever free (or
see) another's state.
"""

from __future__ import annotations

import numpy as np

from cellserve.server.arrays import ArrayOps, NumpyOps
from cellserve.server.errors import ResourceExhausted

DTYPE = np.float32


class StatePool:
    """Fixed-capacity slot allocator plus the h/c tensors it indexes."""

    def __init__(self, layers: int, hidden: int, capacity: int, ops: ArrayOps | None = None) -> None:
        self.layers, self.hidden, self.capacity = layers, hidden, capacity
        self.ops: ArrayOps = ops or NumpyOps()
        self.h = self.ops.zeros((layers, capacity, hidden), DTYPE)  # [L, S, H]
        self.c = self.ops.zeros((layers, capacity, hidden), DTYPE)  # [L, S, H]
        self._free = list(range(capacity - 1, -1, -1))  # stack: pops the lowest slot first
        self._owner: list[object | None] = [None] * capacity

    @property
    def nbytes(self) -> int:
        return 2 * self.layers * self.capacity * self.hidden * np.dtype(DTYPE).itemsize

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
        self.ops.write_row(self.h, slot, 0.0)
        self.ops.write_row(self.c, slot, 0.0)
        return slot

    def release(self, slot: int, owner: object) -> bool:
        """Free ``slot`` if ``owner`` holds it; releasing twice or with another owner does nothing."""
        if not 0 <= slot < self.capacity or self._owner[slot] is not owner:
            return False
        self._owner[slot] = None
        self._free.append(slot)
        return True

    def gather(self, rows: object, h_out: object, c_out: object) -> None:
        """Copy the batch's slots into contiguous ``[L, B, H]`` buffers (rows from ``ops.index``)."""
        self.ops.take_rows(self.h, rows, h_out)
        self.ops.take_rows(self.c, rows, c_out)

    def scatter(self, rows: object, h_new: object, c_new: object) -> None:
        """Write the batch's next state back into its slots."""
        self.ops.put_rows(self.h, rows, h_new)
        self.ops.put_rows(self.c, rows, c_new)

    def read(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one slot's state, ``([L, H], [L, H])`` (for snapshots)."""
        return self.ops.read_row(self.h, slot), self.ops.read_row(self.c, slot)

    def write(self, slot: int, h: np.ndarray, c: np.ndarray) -> None:
        """Set one slot's state from host arrays ``[L, H]`` (for resume)."""
        shape = (self.layers, self.hidden)
        if h.shape != shape or c.shape != shape:
            raise ValueError(f"state must be {shape}, got h {h.shape} and c {c.shape}")
        self.ops.write_row(self.h, slot, h.astype(DTYPE, copy=False))
        self.ops.write_row(self.c, slot, c.astype(DTYPE, copy=False))
