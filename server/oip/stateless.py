"""Stateless inference (OIP ``ModelInfer``): the caller sends h0/c0 and gets hn/cn back.

It runs through the same state pool and scheduler as streaming sessions, so stateless rows are
batched with session steps and bounded by the same limits: each row borrows a pool slot for one
step (state written in, step submitted, next state read out, slot released). The slots are
released only after the engine is done with them, even when the RPC is cancelled mid-step.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from cellserve.server.models import LoadedModel


async def run_stateless(
    model: LoadedModel, x: np.ndarray, h0: np.ndarray | None, c0: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [B, T] or [B, T, I]; h0, c0 [B, L, H] or None (zeros) → (y [B, T, O], hn [B, L, H], cn [B, L, H])."""
    rows = [model.check_input(x[b]) for b in range(x.shape[0])]  # InvalidArgument before any slot
    task = asyncio.ensure_future(_run_rows(model, rows, h0, c0))
    task.add_done_callback(_retrieve)  # nobody may be left to read its outcome
    return await asyncio.shield(task)  # a cancelled caller leaves the task to finish and free its slots


def _no_op(steps: int) -> None:
    """Stateless rows keep no step count; their slots are freed once every row's future is done."""


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _run_rows(
    model: LoadedModel, rows: list[np.ndarray], h0: np.ndarray | None, c0: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pool = model.pool
    owner = object()
    slots: list[int] = []
    try:
        for b in range(len(rows)):
            slot = pool.allocate(owner)  # zeroed; RESOURCE_EXHAUSTED when the pool is full
            slots.append(slot)
            if h0 is not None or c0 is not None:
                h, c = pool.read(slot)
                pool.write(slot, h if h0 is None else h0[b], c if c0 is None else c0[b])
        futures: list[asyncio.Future[np.ndarray]] = []
        refused: BaseException | None = None
        for slot, row in zip(slots, rows, strict=True):
            try:
                futures.append(model.scheduler.enqueue(slot, row, _no_op))
            except Exception as e:  # queue full: the rows already queued still run before slots are freed
                refused = e
                break
        results = await asyncio.gather(*futures, return_exceptions=True)
        ys: list[np.ndarray] = []
        for r in results:
            if isinstance(r, BaseException):
                raise r
            ys.append(r)
        if refused is not None:
            raise refused
        states = [pool.read(slot) for slot in slots]
    finally:
        for slot in slots:
            pool.release(slot, owner)
    y = np.stack(ys)  # [B, T, O]
    hn = np.stack([h for h, _ in states])  # [B, L, H]
    cn = np.stack([c for _, c in states])  # [B, L, H]
    return y, hn, cn
