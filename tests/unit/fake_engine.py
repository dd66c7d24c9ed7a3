"""A fake engine for the scheduler and session tests: just what the Scheduler uses of an Engine
(``manifest.name`` and ``run_slots``), recording every call. Its output row for a step is
``[slot, x]``, so a test sees which session and which input each output belongs to."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np


class EngineFailure(RuntimeError):
    """What the fake engine raises when ``fail_on`` says so."""


class FakeEngine:
    def __init__(self, manifest: Any = None) -> None:
        self.manifest = manifest if manifest is not None else SimpleNamespace(name="fake")
        self.calls: list[tuple[list[int], int]] = []  # (slots, T) of each call, in order
        self.threads: list[str] = []  # the thread each call ran on
        self.fail_on: Callable[[np.ndarray, np.ndarray], bool] | None = None
        self.failure: Callable[[str], Exception] = EngineFailure  # what a failing call raises, given a message

    def run_slots(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """slots [B], x [B, T] (or [B, T, I]) → y [B, T, 2] with y[b, t] = (slots[b], x[b, t] (first feature))."""
        self.calls.append((slots.tolist(), x.shape[1]))
        self.threads.append(threading.current_thread().name)
        if self.fail_on is not None and self.fail_on(slots, x):
            raise self.failure(f"engine failed on slots {slots.tolist()}")
        first = x.reshape(*x.shape[:2], -1)[..., 0]  # [B, T]
        return np.stack([np.broadcast_to(slots[:, None], first.shape), first], axis=-1).astype(np.float32)


def expected_row(slot: int, x: np.ndarray) -> np.ndarray:
    """The fake engine's output for one step of ``slot`` with input ``x`` [T]: [T, 2]."""
    return np.stack([np.full(len(x), slot), x], axis=-1).astype(np.float32)
