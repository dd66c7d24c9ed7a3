"""Stateless inference (OIP ``ModelInfer``): the caller sends every state tensor and gets the next ones back.

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
    model: LoadedModel, x: np.ndarray, states: list[np.ndarray | None]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """x ``[B, T, *frame]``; each state ``[B, *state]`` or None (zeros) → (y ``[B, T, *out]``, next states)."""
    rows = [model.check_input(x[b]) for b in range(x.shape[0])]  # InvalidArgument before any slot
    task = asyncio.ensure_future(_run_rows(model, rows, states))
    task.add_done_callback(_retrieve)  # nobody may be left to read its outcome
    return await asyncio.shield(task)  # a cancelled caller leaves the task to finish and free its slots


def _no_op(steps: int) -> None:
    """Stateless rows keep no step count; their slots are freed once every row's future is done."""


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _run_rows(
    model: LoadedModel, rows: list[np.ndarray], given: list[np.ndarray | None]
) -> tuple[np.ndarray, list[np.ndarray]]:
    pool = model.pool
    owner = object()
    slots: list[int] = []
    try:
        for b in range(len(rows)):
            slot = pool.allocate(owner)  # zeroed; RESOURCE_EXHAUSTED when the pool is full
            slots.append(slot)
            if any(s is not None for s in given):
                zeros = pool.read(slot)
                pool.write(slot, [z if s is None else s[b].astype(z.dtype) for z, s in zip(zeros, given, strict=True)])
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
    y = np.stack(ys)  # [B, T, *out]
    return y, [np.stack(per_state) for per_state in zip(*states, strict=True)]  # each [B, *state]
