"""The connection pool's placement by worker, with fake connections: which worker each new connection reaches
is scripted (the kernel's hash, in life), and the probe answers as ``ListModels`` would. The same placement
against a real ``serve --workers 2`` is in tests/integration/test_workers_spread.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from cellserve.client.connection_pool import ConnectionPool


class Stub:
    """A connection's stub: the worker its connection reached, and the calls started on it."""

    def __init__(self, worker: int) -> None:
        self.worker = worker

    def Stream(self) -> Any:
        return Call()


class Call:
    def add_done_callback(self, fn: Any) -> None:
        self.done = fn


def pool_reaching(workers: list[int], of: int | None, size: int = 8, *, aio: bool = False) -> ConnectionPool[object]:
    """A pool whose i-th connection reaches ``workers[i]`` of ``of`` (None: the server never answers)."""
    pool: ConnectionPool[object] = ConnectionPool("t:1", size, lambda target: object(), probe=None)
    stubs = [Stub(w) for w in workers]
    pool.stub = lambda index=0: stubs[index]  # type: ignore[method-assign]
    asked: list[int] = []

    def answer(stub: Stub) -> tuple[int, int] | None:
        asked.append(stub.worker)
        return None if of is None else (stub.worker, of)

    async def answer_aio(stub: Stub) -> tuple[int, int] | None:
        return answer(stub)

    pool._probe, pool._workers = (answer_aio if aio else answer), None  # as Channels makes it: probing
    pool.asked = asked  # type: ignore[attr-defined]
    return pool


def workers_of(pool: ConnectionPool[object], of: int) -> list[int]:
    """Open streams per worker."""
    loads = [0] * of
    for w, n in zip(pool.workers(), pool.open_streams(), strict=True):
        if w is not None:
            loads[w] += n
    return loads


def test_streams_split_evenly_over_two_workers_however_the_connections_hash():
    pool = pool_reaching([0, 0, 0, 1, 0, 1, 1, 0], of=2)
    calls = [pool.start("Stream") for _ in range(4)]
    assert workers_of(pool, 2) == [2, 2]
    assert pool.open_streams()[:6] == [1, 1, 0, 1, 0, 1]  # connection 2 reached worker 0 again: left idle
    calls[0].done(calls[0])  # a stream ends on worker 0: the next goes there, to its first idle connection
    pool.start("Stream")
    assert workers_of(pool, 2) == [2, 2] and pool.open_streams()[:3] == [1, 1, 0]


def test_with_the_room_used_up_streams_share_the_connections_of_the_lighter_worker():
    pool = pool_reaching([0, 0, 1, 0], of=2, size=4)
    for _ in range(6):
        pool.start("Stream")
    assert workers_of(pool, 2) == [3, 3] and pool.open_streams() == [1, 1, 3, 1]


def test_a_lone_stream_takes_the_first_connection_whichever_worker_it_reached():
    """Many clients of one session each: no connection is made to reach worker 0, the kernel spreads them."""
    for first in (0, 1):
        pool = pool_reaching([first, 1 - first], of=2)
        pool.start("Stream")
        assert pool.open_streams()[:2] == [1, 0] and pool.workers()[1] is None  # the second never made


@pytest.mark.parametrize("of", [1, 0])
def test_one_worker_or_a_server_that_does_not_say_spreads_by_connection_and_asks_once(of):
    pool = pool_reaching([0] * 8, of=of, size=4)
    for _ in range(8):
        pool.start("Stream")
    assert pool.open_streams() == [2, 2, 2, 2] and len(pool.asked) == 1  # type: ignore[attr-defined]


def test_a_connection_that_does_not_answer_is_used_as_it_is_and_asked_again_next_time():
    pool = pool_reaching([0, 1], of=None)
    pool.start("Stream")
    pool.start("Stream")
    assert pool.open_streams()[:2] == [1, 1] and len(pool.asked) == 2  # type: ignore[attr-defined]


def test_the_asyncio_pick_awaits_the_probe_and_places_alike():
    pool = pool_reaching([1, 1, 0, 1, 0], of=2, aio=True)

    async def main() -> Iterator[int]:
        return [pool.count(await pool.apick()) and 0 for _ in range(4)]

    asyncio.run(main())
    assert workers_of(pool, 2) == [2, 2] and pool.open_streams()[:5] == [1, 1, 1, 0, 1]
