"""What a scheduler queues: a session's step (:class:`Request`), a gateway message's steps of many sessions
(:class:`Group`, one future for all its rows), and a group's row retried alone after a failed engine call
(:class:`Row`, made only then); how an engine call's inputs are put together from them; and what a step
that failed alone is answered.

Each has ``rows`` (the steps it holds), ``queued_at``, ``complete(t, y)`` and ``fail(error)``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cellserve.server.engine import out_of_memory
from cellserve.server.errors import StepFailed, StepOutOfMemory

if TYPE_CHECKING:
    from cellserve.server.tracing import Owner

Finished = Callable[[int], None]  # called once per step: the steps it ran (0 if it never ran)
# called once per group: the steps each row ran (0 if none did), and the rows that failed alone (they ran none)
FinishedMany = Callable[[int, Mapping[int, Exception]], None]


@dataclass(frozen=True)
class GroupResult:
    """What a group of rows (``enqueue_many``) resolves to: y ``[n, T, *out]`` (zero rows where a row failed; None
    when every row did) and the rows that failed alone, with their errors."""

    y: np.ndarray | None
    failed: Mapping[int, Exception]


class _Queued:
    """What a queue entry does once it is done with: ``finish`` tells its sessions (once), ``fail`` answers it."""

    __slots__ = ()
    future: asyncio.Future[Any]

    def finish(self, steps: int) -> None:
        raise NotImplementedError

    def fail(self, error: BaseException) -> None:
        self.finish(0)
        if not self.future.done():
            self.future.set_exception(error)


class Request(_Queued):
    """One session's step: a queue entry of one row."""

    __slots__ = ("_finished", "future", "owner", "queued_at", "slot", "x")
    rows = 1

    def __init__(
        self,
        slot: int,
        x: np.ndarray,
        future: asyncio.Future[np.ndarray],
        finished: Finished,
        owner: Owner | None,
    ) -> None:
        self.slot = slot
        self.x = x  # [T, *frame]
        self.future = future
        self._finished: Finished | None = finished
        self.owner = owner  # its session (for traces and logs), if any
        self.queued_at = time.perf_counter()

    def finish(self, steps: int) -> None:
        """Tell the session the engine is done with its slot (``steps`` run): once, whatever happens after."""
        finished, self._finished = self._finished, None
        if finished is not None:
            finished(steps)

    def step_shape(self) -> tuple[int, ...]:
        return self.x.shape  # type: ignore[no-any-return]

    def complete(self, t: int, y: np.ndarray) -> None:
        """The engine ran it: ``y`` is its output [T, *out]."""
        self.finish(t)
        if not self.future.done():
            self.future.set_result(y)


class Group(_Queued):
    """Many sessions' steps of equal shape (a gateway's message): one queue entry, one future, ``rows`` rows."""

    __slots__ = ("_finished", "failed", "future", "owners", "queued_at", "rows", "slots", "x", "y")

    def __init__(
        self,
        slots: np.ndarray,
        x: np.ndarray,
        future: asyncio.Future[GroupResult],
        finished: FinishedMany,
        owners: Sequence[Owner | None],
    ) -> None:
        self.slots = slots  # [n] int64
        self.x = x  # [n, T, *frame]
        self.rows = len(slots)
        self.future = future
        self._finished: FinishedMany | None = finished
        self.owners = owners
        self.queued_at = time.perf_counter()
        self.failed: dict[int, Exception] = {}  # rows that failed alone (after a failed engine call)
        self.y: np.ndarray | None = None  # filled row by row only after a failed engine call

    def step_shape(self) -> tuple[int, ...]:
        return self.x.shape[1:]  # type: ignore[no-any-return]

    def finish(self, steps: int) -> None:
        finished, self._finished = self._finished, None
        if finished is not None:
            finished(steps, self.failed)

    def complete(self, t: int, y: np.ndarray) -> None:
        """The engine ran every row: ``y`` is [n, T, *out]."""
        self.y = y
        self.settled(t)

    def rows_alone(self) -> list[Row]:
        return [Row(self, i) for i in range(self.rows)]

    def settled(self, t: int) -> None:
        """Every row was run, or failed alone after a failed call: answer the group."""
        self.finish(t)
        if not self.future.done():
            self.future.set_result(GroupResult(self.y, self.failed))


class Row:
    """One row of a group, retried alone after a failed engine call (made only then)."""

    __slots__ = ("group", "i", "owner", "queued_at", "slot", "x")
    rows = 1

    def __init__(self, group: Group, i: int) -> None:
        self.group, self.i = group, i
        self.slot = int(group.slots[i])
        self.x = group.x[i]
        self.owner = group.owners[i]
        self.queued_at = group.queued_at

    def complete(self, t: int, y: np.ndarray) -> None:
        group = self.group
        if group.y is None:
            group.y = np.zeros((group.rows, *y.shape), y.dtype)
        group.y[self.i] = y

    def fail(self, error: BaseException) -> None:
        self.group.failed[self.i] = error  # type: ignore[assignment]


Entry = Request | Group
Unit = Request | Group | Row  # what an engine call's rows come from


def rows_of(units: Sequence[Unit]) -> list[int] | None:
    """Each unit's rows, or None when every unit is one row (no gateway group among them): what the scheduler
    asks once per engine call."""
    if all(type(r) is not Group for r in units):
        return None
    return [r.rows for r in units]


def alone(group: list[Unit], rows: list[int] | None) -> list[Unit]:
    """``group`` (``rows``: its ``rows_of``) with each gateway group replaced by its rows (for traces and retries:
    not the hot path)."""
    if rows is None:
        return group
    return [row for r in group for row in (r.rows_alone() if type(r) is Group else (r,))]


def pack(entries: list[Entry], most: int) -> list[list[Unit]]:
    """``entries`` in order, as engine calls of at most ``most`` rows each; an entry is never split."""
    calls: list[list[Unit]] = [[]]
    rows = 0
    for entry in entries:
        if calls[-1] and rows + entry.rows > most:
            calls.append([])
            rows = 0
        calls[-1].append(entry)
        rows += entry.rows
    return calls


def inputs(group: list[Unit], rows: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """The engine's inputs for one call of equal step shape (``rows``: its ``rows_of``): slot ids [B] and x
    [B, T, *frame]."""
    if rows is None:  # single steps (or rows retried alone)
        slots = np.array([r.slot for r in group], dtype=np.int64)  # type: ignore[union-attr]
        x = np.concatenate([r.x for r in group]).reshape(len(group), *group[0].x.shape)
        return slots, x
    if len(group) == 1:  # one gateway message: its arrays as they are
        only = group[0]
        assert type(only) is Group
        return only.slots, only.x
    slots = np.concatenate([r.slots if type(r) is Group else np.array([r.slot]) for r in group])  # type: ignore[union-attr]
    x = np.concatenate([r.x if type(r) is Group else r.x[None] for r in group])
    return slots, x


def step_failed(model: str, t: int, error: Exception) -> StepFailed:
    """The client's answer for a step the engine failed on alone: what happened and what to do, no internals."""
    if out_of_memory(error):
        failure: StepFailed = StepOutOfMemory(
            f"model {model!r} ran out of memory on this step (T={t}) and did not apply it; send shorter chunks"
        )
    else:  # "not applied": true on every API (a session's or sequence's state is unchanged, a stateless row got none)
        failure = StepFailed(
            f"model {model!r} failed on this step (T={t}) and did not apply it; the server log has the details"
        )
    failure.__cause__ = error
    return failure


def describe_error(error: BaseException) -> str:
    """An engine error in one line for the log: its type and its first line."""
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}"
