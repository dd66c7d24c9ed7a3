"""One target's connections: a few channels, each its own TCP connection, with the streams spread over them.

Why several: behind one address may be several processes (``cellserve serve --workers N`` shares one port
with SO_REUSEPORT). The kernel balances *connections* over them, not the streams on a connection, and
gRPC gives every channel to one target in a process the same connection (its global subchannel pool). With
one connection, every session of a process lands on one worker. So each channel of a pool has its own
subchannel pool (``grpc.use_local_subchannel_pool``, set by ``ChannelConfig.options``).

Which worker a connection reaches is the kernel's choice (a hash of the address pair), so the pool asks:
each connection's first call is ``ListModels``, whose answer says which worker answered and how many share
the port (the ``probe``). A new stream then goes to a worker carrying the fewest open streams, on a
connection of its with no stream; where there is none and the pool has room, a new connection is made and
asked (the kernel puts it on some worker), then the choice is made again; with no room left, the
least-loaded connection of such a worker. So N streams from one process sit N/workers on each worker,
whichever ports the kernel hashed, and one connection carries one stream while the pool has room.

What a connection said can go stale: gRPC reconnects a broken connection on its own, maybe to another
worker. So a connection that went idle is asked again before it is reused. One that does not answer in
``PROBE_TIMEOUT_S`` (a hung worker, no connection yet) is not chosen by worker nor asked again for
``QUIET_S``; the stream goes where what is known says. A worker that fails a stream takes no new one for
``QUIET_S`` while another can, and meanwhile no new connection is made (it might land there): an open the
SDK gave up on (``unanswered``: a hung worker), a connection asked again that no longer answers, a stream
ended UNAVAILABLE (connection lost) or RESOURCE_EXHAUSTED (no room). So with a hung worker one open fails,
not every other one. A stream the caller cancels (a generate left early) blames nobody. A server that
answers with another count voids what the others said. Against one process (or a server that does not
say), streams go to the least-loaded connection (ties in turn, so that an open retried after a connection
that did not answer tries the next one), made on first use.

Unary calls (models, health) use the first connection; they carry no state, any worker answers them.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar

import grpc

from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

C = TypeVar("C")  # grpc.Channel or grpc.aio.Channel
# A connection's (worker, workers) as its server said, or None where it could not be asked (no answer in
# time, an older server): such a connection still carries streams, by the least-loaded rule.
Probe = Callable[[pb_grpc.CellServeStub], Any]  # returns (worker, workers) | None, or an awaitable of it
# How the pool decides where a stream goes, as a routine: it yields a connection to ask its worker, is sent the
# answer (None: none in time), and returns the connection to take (or, for ``behind``, the worker count).
Asking = Generator[int, "tuple[int, int] | None", int]
PROBE_TIMEOUT_S = 2.0  # at most this long (or connect_timeout_s) to ask a connection its worker
QUIET_S = 5.0  # a connection that did not answer is not asked again for this long
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# How a stream ends when its worker is the trouble: the connection lost, or refused for lack of room (a full
# worker). A hung worker's stream ends CANCELLED, as many healthy ones do (a generate left early, a session
# dropped unclosed): the SDK says so itself where an open timed out (``unanswered``).
AVOID = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Each started call's pool and connection, while the call lives: for ``unanswered``.
_PLACED: weakref.WeakKeyDictionary[Any, tuple[ConnectionPool[Any], int]] = weakref.WeakKeyDictionary()


def unanswered(call: Any) -> None:
    """The SDK gave up on ``call``: no answer within its open timeout (a hung worker). The worker it reached
    takes no new stream for ``QUIET_S`` while another can (a call not started by a pool: nothing)."""
    placed = _PLACED.get(call)
    if placed is not None:
        pool, index = placed
        pool.avoid(index)


def _failed(error: grpc.RpcError) -> tuple[int, int] | None:
    """A probe's failure: no answer yet (no connection, a hung process: None, asked again later), or a server
    that will not say (no ListModels, as an echo server; a refusal): 0 of 0, streams spread by connection."""
    return None if error.code() in TRANSIENT else (0, 0)  # type: ignore[attr-defined]


def ask_worker(metadata: tuple[tuple[str, str], ...], timeout_s: float) -> Probe:
    """The probe of a sync pool: ``ListModels`` on the connection; None where it does not answer in time."""

    def probe(stub: pb_grpc.CellServeStub) -> tuple[int, int] | None:
        try:
            answer = stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=timeout_s)
        except grpc.RpcError as e:
            return _failed(e)
        return answer.worker, answer.workers

    return probe


def ask_worker_aio(metadata: tuple[tuple[str, str], ...], timeout_s: float) -> Probe:
    """``ask_worker`` for a grpc.aio pool."""

    async def probe(stub: pb_grpc.CellServeStub) -> tuple[int, int] | None:
        try:
            answer = await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=timeout_s)
        except grpc.RpcError as e:
            return _failed(e)
        return answer.worker, answer.workers

    return probe


class ConnectionPool(Generic[C]):
    """Up to ``size`` channels to ``target`` and the streams open on each (see the module docstring)."""

    def __init__(self, target: str, size: int, make: Callable[[str], C], probe: Probe | None = None) -> None:
        if size < 1:
            raise ValueError(f"a connection pool of {size} channels; use 1 or more")
        self.target = target
        self._make = make
        self._probe = probe  # None: never ask, spread by connection only
        self._channels: list[C | None] = [None] * size
        self._stubs: list[pb_grpc.CellServeStub | None] = [None] * size
        self._open = [0] * size  # streams started on each connection and not yet done
        self._worker: list[int | None] = [None] * size  # the worker each connection reached, where known
        self._fresh = [False] * size  # asked since it last went idle (an idle one may have reconnected elsewhere)
        self._quiet_until = [0.0] * size  # a connection that did not answer is not asked again before this
        self._avoid_until: dict[int, float] = {}  # a worker that failed a stream takes none before this
        self._judging: set[asyncio.Future[None]] = set()  # asyncio: the ended streams' statuses being read
        self._workers: int | None = None if probe is not None else 0  # behind the target (None: not asked yet)
        self._next = 0  # where the search for the least-loaded connection starts: ties go in turn
        self._next_worker = 0  # the same for workers
        self._lock = threading.RLock()  # sync sessions open from many threads; grpc calls done-callbacks on its own
        self.channel(0)

    def channel(self, index: int = 0) -> C:
        """The ``index``-th connection's channel, made now if it is not yet."""
        channel = self._channels[index]
        if channel is None:
            channel = self._channels[index] = self._make(self.target)
        return channel

    def stub(self, index: int = 0) -> pb_grpc.CellServeStub:
        stub = self._stubs[index]
        if stub is None:
            stub = self._stubs[index] = pb_grpc.CellServeStub(self.channel(index))
        return stub

    def pick(self) -> int:
        """The connection the next stream should take, asking connections their worker (blocking)."""
        with self._lock:
            return self._asked(self._picking())

    async def apick(self) -> int:
        """``pick`` for grpc.aio channels: the asking is awaited."""
        return await self._aasked(self._picking())

    def behind(self) -> int:
        """How many workers share the target's port, as its connections say (asking one if none has yet); 1
        where nothing says (one process, an older server, no answer)."""
        with self._lock:
            return self._asked(self._learning())

    async def abehind(self) -> int:
        """``behind`` for grpc.aio channels."""
        return await self._aasked(self._learning())

    def _picking(self) -> Asking:
        """Where the next stream goes: choose, asking connections as the choice needs, until one is taken."""
        while True:
            index, ask = self._choose()
            if not ask:
                return index
            chosen = self._heard(index, (yield index))
            if chosen is not None:
                return chosen

    def _learning(self) -> Asking:
        """How many workers there are: asked of a connection if nothing is known yet."""
        if self._workers is None:
            index = self._in_turn()
            self._heard(index, (yield index))
        return self._workers or 1

    def _asked(self, routine: Asking) -> int:
        """Run ``routine``, asking each connection it names with the (blocking) probe."""
        try:
            index = next(routine)
            while True:
                index = routine.send(self._probe(self._asking(index)))  # type: ignore[misc]
        except StopIteration as done:
            return done.value

    async def _aasked(self, routine: Asking) -> int:
        """``_asked`` with the asyncio probe, awaited."""
        try:
            index = next(routine)
            while True:
                index = routine.send(await self._probe(self._asking(index)))  # type: ignore[misc]
        except StopIteration as done:
            return done.value

    def _asking(self, index: int) -> pb_grpc.CellServeStub:
        """Connection ``index``, made now if it is not yet, to be asked its worker: its stub."""
        self.channel(index)
        return self.stub(index)

    def start(self, method: str, *args: Any, index: int | None = None, **kwargs: Any) -> Any:
        """Start a streaming call (``Stream``, ``Multiplex``, ``Generate``) on connection ``index`` (default:
        ``pick()``; an asyncio caller passes ``await apick()``).

        The call counts against its connection until it is done, however it ends (closed, cancelled, reset).
        """
        with self._lock:  # reentrant: a pick and its count are one step for threads opening at once
            if index is None:
                index = self.pick()
            self.count(index)
            stub = self.stub(index)
        try:
            call = getattr(stub, method)(*args, **kwargs)
        except BaseException:
            self._done(index)
            raise
        call.add_done_callback(lambda ended: self._ended(index, ended))
        _PLACED[call] = (self, index)
        return call

    def _ended(self, index: int, call: Any) -> None:
        """A stream on connection ``index`` is done: uncount it; a worker that failed it is avoided a while."""
        self._done(index)
        code = call.code()  # a sync call's status; an asyncio call's is a coroutine
        if not inspect.isawaitable(code):
            if code in AVOID:
                self.avoid(index)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # ended off its loop (collected after it closed): nothing to read it on
            code.close()  # type: ignore[attr-defined]
            return
        task = loop.create_task(self._aended(index, code))
        self._judging.add(task)  # held until done (the loop keeps only weak references to tasks)
        task.add_done_callback(self._judging.discard)

    async def _aended(self, index: int, code: Awaitable[grpc.StatusCode]) -> None:
        if await code in AVOID:
            self.avoid(index)

    def avoid(self, index: int) -> None:
        """Connection ``index``'s worker failed a stream (no answer in time, the connection lost, no room): it
        takes no new stream for ``QUIET_S`` while another worker can; the connection is asked again before reuse."""
        with self._lock:
            worker = self._worker[index]
            self._fresh[index] = False
            if worker is not None:
                self._avoid_until[worker] = time.monotonic() + QUIET_S

    def _choose(self, asking: bool = True) -> tuple[int, bool]:
        """The connection for the next stream, and whether it must first be asked its worker (never when not
        ``asking``: then the best by what is known)."""
        size = len(self._open)
        if self._workers is None:  # not known yet: ask the next connection in turn (a retry tries another)
            return self._in_turn(), asking
        if self._workers < 2:
            return self._in_turn(), False
        on: dict[int, list[int]] = {}  # each reached worker's connections
        for i, w in enumerate(self._worker):
            if w is not None:
                on.setdefault(w, []).append(i)
        loads = [sum(self._open[i] for i in on.get(w, ())) for w in range(self._workers)]
        now = time.monotonic()
        order = sorted(((self._next_worker + k) % self._workers for k in range(self._workers)), key=loads.__getitem__)
        usable = [w for w in order if self._avoid_until.get(w, 0.0) <= now]
        # while a worker is avoided, no new connection (it might land there), unless no usable one is reached
        hunting = asking and (len(usable) == len(order) or not on.keys() & set(usable))
        order = usable or order  # all avoided: none is
        for w in (w for w in order if loads[w] == loads[order[0]]):  # an idle connection of a least-loaded worker
            idle = next((i for i in on.get(w, ()) if self._open[i] == 0), None)
            if idle is not None:
                if asking and not self._fresh[idle]:
                    return idle, True  # idle since it was asked: it may have reconnected elsewhere, or hung
                self._next_worker = (w + 1) % self._workers
                return idle, False
        if hunting:  # a connection not asked yet (one made, or a new one: wherever the kernel puts it)
            unknown = [i for i in range(size) if self._worker[i] is None and self._quiet_until[i] <= now]
            made = [i for i in unknown if self._channels[i] is not None]
            if made or unknown:
                return (made or unknown)[0], True
        for w in order:  # no room for more: the least-loaded connection of the least-loaded worker reached
            if w in on:
                self._next_worker = (w + 1) % self._workers
                return min(on[w], key=self._open.__getitem__), False
        return self._in_turn(), False

    def _in_turn(self) -> int:
        """The least-loaded connection, ties in turn."""
        size = len(self._open)
        index = min(((self._next + k) % size for k in range(size)), key=self._open.__getitem__)
        self._next = (index + 1) % size
        return index

    def _heard(self, index: int, answer: tuple[int, int] | None) -> int | None:
        """Note what connection ``index`` said; the connection to take now, or None to choose again with it.

        No answer in time (not connected yet, a hung worker): the connection is not asked again for ``QUIET_S``
        nor chosen by worker meanwhile, the worker it reached (if known) is avoided as long, and the stream goes
        where what is known says. A server that does not say (0 of 0): streams spread by connection from now on.
        Another worker count than before (a restarted server): what the other connections said is void."""
        if answer is None:
            self.avoid(index)  # a connection asked again whose worker no longer answers: that worker hangs
            self._worker[index] = None
            self._quiet_until[index] = time.monotonic() + QUIET_S
            return self._choose(asking=False)[0]
        worker, workers = answer
        if workers < 1 or not 0 <= worker < workers:
            self._workers = 0
            return index
        if workers != self._workers:
            self._worker = [None] * len(self._worker)
            self._fresh = [False] * len(self._fresh)
            self._avoid_until.clear()
        self._worker[index], self._fresh[index], self._quiet_until[index] = worker, True, 0.0
        self._workers = workers
        return None if workers > 1 else index

    def count(self, index: int) -> C:
        """Count a stream on connection ``index`` (one the caller starts itself, as the bench does); its channel."""
        with self._lock:
            self._open[index] += 1
            return self.channel(index)

    def _done(self, index: int) -> None:
        with self._lock:
            self._open[index] -= 1
            if self._open[index] == 0:
                self._fresh[index] = False

    def open_streams(self) -> list[int]:
        """Streams open on each connection now (0 for one not made yet)."""
        with self._lock:
            return list(self._open)

    def workers(self) -> list[int | None]:
        """The worker each connection reached, as it said (None: not made, or not asked)."""
        return list(self._worker)

    def channels(self) -> list[C]:
        """The channels made so far."""
        return [c for c in self._channels if c is not None]
