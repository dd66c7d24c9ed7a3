"""The connection pool's placement by worker, with fake connections: which worker each new connection reaches
is scripted (the kernel's hash, in life), and the probe answers as ``ListModels`` would. The same placement
against a real ``serve --workers 2`` is in tests/integration/test_workers_spread.py."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from cellserve.client.connection_pool import ConnectionPool, unanswered


class Stub:
    """A connection's stub: the worker its connection reached (None: it does not answer), of how many."""

    def __init__(self, worker: int | None, of: int | None) -> None:
        self.worker, self.of = worker, of

    def Stream(self) -> Any:
        return Call()


class Call:
    """A started stream: ``end(code)`` ends it as gRPC would, calling its done-callback."""

    def add_done_callback(self, fn: Any) -> None:
        self._callback = fn

    def end(self, code: grpc.StatusCode = grpc.StatusCode.OK) -> None:
        self._code = code
        self._callback(self)

    def code(self) -> grpc.StatusCode:
        return self._code


def pool_reaching(
    workers: list[int | None], of: int | None, size: int = 8, *, aio: bool = False
) -> ConnectionPool[object]:
    """A pool whose i-th connection reaches ``workers[i]`` of ``of`` (None: it does not answer in time); its
    ``stubs`` may be changed to script a reconnection, and ``asked`` lists the workers asked, in order."""
    pool: ConnectionPool[object] = ConnectionPool("t:1", size, lambda target: object(), probe=None)
    stubs = [Stub(w, of) for w in workers]
    pool.stub = lambda index=0: stubs[index]  # type: ignore[method-assign]
    asked: list[int | None] = []

    def answer(stub: Stub) -> tuple[int, int] | None:
        asked.append(stub.worker)
        return None if stub.of is None or stub.worker is None else (stub.worker, stub.of)

    async def answer_aio(stub: Stub) -> tuple[int, int] | None:
        await asyncio.sleep(0)  # other tasks pick meanwhile
        return answer(stub)

    pool._probe, pool._workers = (answer_aio if aio else answer), None  # as Channels makes it: probing
    pool.asked = asked  # type: ignore[attr-defined]
    pool.stubs = stubs  # type: ignore[attr-defined]
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
    calls[0].end()  # a stream ends on worker 0: the next goes there, to its first idle connection
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


def test_while_no_connection_answers_streams_go_in_turn_and_each_open_asks_again():
    pool = pool_reaching([0, 1, 0, 1], of=None, size=4)
    pool.start("Stream")
    pool.start("Stream")
    assert pool.open_streams() == [0, 1, 0, 1] and len(pool.asked) == 2  # type: ignore[attr-defined]


def test_the_asyncio_pick_awaits_the_probe_and_places_alike_with_tasks_picking_at_once():
    pool = pool_reaching([1, 1, 0, 1, 0, 0, 1, 0], of=2, aio=True)

    async def one() -> None:
        pool.count(await pool.apick())

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(4)))

    asyncio.run(main())
    assert workers_of(pool, 2) == [2, 2] and sum(pool.open_streams()) == 4


def test_a_connection_idle_since_it_was_asked_is_asked_again_before_it_is_reused():
    """gRPC reconnects a broken connection on its own, maybe to another worker: asked again, placed by it."""
    pool = pool_reaching([0, 1, 1, 0], of=2, size=4)
    first, _ = pool.start("Stream"), pool.start("Stream")
    assert workers_of(pool, 2) == [1, 1]
    first.end()
    pool.stubs[0].worker = 1  # type: ignore[attr-defined]  # connection 0 reconnected to worker 1
    pool.start("Stream")  # worker 0 has fewest: connection 0 is asked (says 1), then new ones until one reaches 0
    assert pool.asked == [0, 1, 1, 1, 0]  # type: ignore[attr-defined]
    assert pool.workers() == [1, 1, 1, 0] and workers_of(pool, 2) == [1, 1] and pool.open_streams()[3] == 1


def test_a_connection_that_stops_answering_is_left_and_not_asked_again_at_once():
    """A hung worker: its connection's probe times out; the stream goes to the other worker, and the next picks
    neither wait for that connection again nor make new ones (they might land on the hung worker)."""
    pool = pool_reaching([0, 1, 0], of=2)
    calls = [pool.start("Stream"), pool.start("Stream")]
    calls[0].end()
    pool.stubs[0].worker = None  # type: ignore[attr-defined]  # worker 0 hangs
    index = pool.pick()  # connection 0 idle since asked: asked, no answer: worker 0 avoided, worker 1's taken
    assert index == 1 and pool.workers()[0] is None and 0 in pool._avoid_until
    asked = len(pool.asked)  # type: ignore[attr-defined]
    assert pool.pick() == 1 and pool.asked[asked:] == []  # type: ignore[attr-defined]


def test_a_server_that_comes_back_with_fewer_workers_voids_what_was_known():
    pool = pool_reaching([3, 1, 2, 0, 1], of=4)
    for _ in range(4):
        pool.start("Stream")
    for stub, w in zip(pool.stubs, [1, 0, 1, 0, 1], strict=True):  # type: ignore[attr-defined]
        stub.worker, stub.of = w, 2
    pool._fresh = [False] * 8  # every connection broke and came back
    pool.start("Stream")  # asks again: no IndexError from the old worker numbers
    assert pool._workers == 2 and all(w is None or w < 2 for w in pool.workers())


@pytest.mark.parametrize("how", ["open timed out", "UNAVAILABLE", "RESOURCE_EXHAUSTED"])
def test_a_worker_that_failed_a_stream_takes_no_new_one_for_a_while(how):
    """An open that timed out on a hung worker (the SDK says so: ``unanswered``), a lost connection, a full
    worker: the next streams go to the other worker though it holds more, until the while has passed."""
    pool = pool_reaching([0, 1, 0, 1], of=2, size=4)
    calls = [pool.start("Stream") for _ in range(4)]  # 2 and 2
    if how == "open timed out":
        unanswered(calls[0])
        calls[0].end(grpc.StatusCode.CANCELLED)
    else:
        calls[0].end(getattr(grpc.StatusCode, how))
    for _ in range(3):
        pool.start("Stream")
    assert workers_of(pool, 2) == [1, 5]
    pool._avoid_until.clear()  # the while has passed
    pool.start("Stream")
    assert workers_of(pool, 2) == [2, 5]


@pytest.mark.parametrize("code", [grpc.StatusCode.OK, grpc.StatusCode.CANCELLED])
def test_streams_that_end_well_or_are_left_by_the_caller_leave_their_worker_chosen(code):
    """Closed, or cancelled by the caller (a generate left early, a session dropped unclosed): no blame."""
    pool = pool_reaching([0, 1], of=2, size=2)
    calls = [pool.start("Stream") for _ in range(2)]
    calls[0].end(code)
    pool.start("Stream")
    assert workers_of(pool, 2) == [1, 1] and not pool._avoid_until


def test_unanswered_ignores_a_call_no_pool_started():
    unanswered(Call())
