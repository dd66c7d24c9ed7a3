"""Gateways: many sessions of one model, stepped many per message over a few ``Multiplex`` streams.

A gateway (a media server with a session per call, a stream processor with one per device, a game server with
one per agent) names its sessions by its own keys and steps any number of them in one call::

    with Client(["a:50051", "b:50051"]) as client, client.gateway("pychar", keys=["c1", "c2", "c3"]) as gw:
        ys = gw.step({"c1": [104, 105], "c2": [33], "c3": b"hi"})  # {key: [T, 256]}, each key its own T
        y = gw.step_arrays(["c1", "c2"], x)  # x [2, T] int64 (row i for keys[i]) -> y [2, T, 256]
        gw.open(["c4"]); gw.close(["c1"]); tokens = gw.snapshot()  # {key: resume token}

``step`` sends one request per stream (per step shape, for a mapping whose keys' T differ), all of them before
it awaits any answer; each request's N steps are one engine batch on the server. Outputs come back in the
layout of the inputs: a dict by key, or ``[N, T, *out]`` in the order of ``keys``.

**Per-key errors.** A call whose sessions all succeed returns its result. When some fail (a bad row, a session
the server closed after its idle timeout, an open beyond capacity), the others still run, and the call raises
``GatewayError``: ``.errors`` maps each failed key to its typed error (``InvalidInputError``,
``SessionClosedError`` with ``reason`` "idle", ...) and ``.result`` holds the others' results (for
``step_arrays``, zero rows for the failed keys). A failed key's state is unchanged; a key whose session cannot
go on fails on every later call until it is closed or opened again.

**Streams.** A stream holds at most ``sessions_per_stream`` sessions (default 256, the server's
``max_sessions_per_stream``); the gateway opens as many streams as its sessions need, at least ``streams``,
and puts each new session on the least-loaded one. ``streams`` defaults to the number of ``--workers``
processes behind the address (its ``ListModels`` says), and the client's connection pool puts each stream on
the worker holding the fewest (client/connection_pool.py), so one gateway uses every worker.

**Crash safety**, as for single sessions (README, "Crash-safe sessions"): every ``checkpoint_every`` answered
steps of a session, a request asks for every stepped session's resume token (``StepSessions.checkpoint``);
the gateway keeps each session's newest token and the inputs since. When a stream breaks (UNAVAILABLE, a
reset, a SIGKILLed server) or its server closes the sessions for a drain, its sessions reopen from their tokens
on another target (the others first, then the same address again), replay the inputs since and send again
what was unanswered; on a ``draining`` notice they move at once. Every output reaches the caller exactly once,
and no exception does unless no server takes a session within ``resume_timeout_s`` (then its key fails alone).

One call at a time per gateway: a call from another thread (asyncio: task) waits for the one in progress.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from cellserve.client.connection_pool import unanswered
from cellserve.client.errors import UnavailableError, from_rpc_error
from cellserve.client.gateway_core import GatewayCore
from cellserve.client.gateway_errors import GatewayError
from cellserve.client.gateway_ops import (
    Describe,
    Ended,
    EndLane,
    GatewayReply,
    GatewayRoutine,
    GatewaySession,
    Pause,
    PollOn,
    ReceiveOn,
    SendOn,
    StartLane,
)
from cellserve.client.model_info import ModelInfo
from cellserve.client.ops import leave, perform, whole_seconds
from cellserve.client.trace_context import trace_metadata
from cellserve.v1 import cellserve_pb2 as pb

if TYPE_CHECKING:
    from cellserve.client.client import ClientBase

T = TypeVar("T")
_END = object()  # half-closes a request stream

__all__ = ["Gateway", "GatewayBase", "GatewayError", "GatewaySession", "new_core"]


def new_core(
    client: ClientBase[Any], model: str | None, *, idle_timeout_s: int, checkpoint_every: int | None,
    sessions_per_stream: int, streams: int,
) -> GatewayCore:  # fmt: skip
    """A gateway core with ``client``'s targets, session policy and open timeout; its messages sized for the
    smaller of the client's and the server's message limits (the server's from its ModelInfo)."""
    policy = client.policy if checkpoint_every is None else replace(client.policy, checkpoint_every=checkpoint_every)
    return GatewayCore(
        client.targets, policy, model=model or "", idle_timeout_s=whole_seconds(idle_timeout_s),
        sessions_per_stream=sessions_per_stream, streams=streams, open_timeout_s=client.open_timeout_s,
        max_message_bytes=client.config.max_message_bytes, start=client._channels.preferred,
    )  # fmt: skip


def multiplex_on(client: ClientBase[Any]) -> Callable[..., Any]:
    """Starts a ``Multiplex`` call on a target: the connection its pool picks (so streams spread over workers)."""
    return lambda target, *args, **kwargs: client._channels.pool(target).start("Multiplex", *args, **kwargs)


def amultiplex_on(client: ClientBase[Any]) -> Callable[..., Any]:
    """``multiplex_on`` for an AsyncClient: an awaitable start."""
    return lambda target, *args, **kwargs: client._channels.astart(target, "Multiplex", *args, **kwargs)


class GatewayBase:
    """What a gateway shows, alike for the sync ``Gateway`` and the ``AsyncGateway``."""

    def __init__(self, core: GatewayCore, start: Callable[..., Any], metadata: tuple) -> None:
        self._core = core
        self._start = start  # starts a Multiplex call on a target (multiplex_on)
        self._metadata = metadata + trace_metadata()  # the caller's span as the gateway opens: its streams' parent
        self._streams: dict[int, Any] = {}  # lane id -> the shell's _Stream of that lane

    @property
    def keys(self) -> list[str]:
        """The keys of the sessions that can be stepped, in the order they were opened."""
        return self._core.keys

    @property
    def model(self) -> str:
        """The model's name (as asked; the server's name for it once a session is open)."""
        return self._core.model

    @property
    def info(self) -> ModelInfo | None:
        """The model's description, once a session is open."""
        return self._core.info

    @property
    def streams(self) -> list[str]:
        """The address of each stream the gateway holds now."""
        return self._core.open_streams()

    def session(self, key: str) -> GatewaySession:
        """A read-only view of one session: its server id, address, steps, resume token, error (KeyError if none)."""
        return self._core.session(key)

    def __contains__(self, key: object) -> bool:
        """Whether the gateway holds a session of this key (one that cannot go on included, until closed)."""
        return isinstance(key, str) and key in self._core.members

    def __len__(self) -> int:
        """Sessions held (those that cannot go on included, until closed); ``len(gw.keys)``: those that can."""
        return len(self._core.members)

    def __iter__(self) -> Iterator[str]:
        """The keys held, in the order they were opened (those that cannot go on included)."""
        return iter(list(self._core.members))

    # -- the shell's streams ----------------------------------------------------------------------

    def _prune(self) -> None:
        """Cancel the streams the core no longer holds (a call that failed before it let go of one)."""
        held = {lane.id for lane in self._core.lanes}
        for lane in [lane for lane in self._streams if lane not in held]:
            self._streams.pop(lane).cancel()

    def _abandon(self) -> None:
        """Cancel every stream (a close that failed)."""
        for stream in self._streams.values():
            stream.cancel()
        self._streams.clear()


class _Stream:
    """One lane's blocking ``Multiplex`` call: requests from a queue, responses read by a thread into an inbox."""

    def __init__(self, target: str, call: Any, requests: queue.Queue[object]) -> None:
        self.target, self.call, self.requests = target, call, requests
        self.inbox: queue.Queue[pb.MultiplexResponse | Ended] = queue.Queue()
        self.ended: Ended | None = None
        threading.Thread(target=self._pump, name="cellserve-gateway-reader", daemon=True).start()

    def _pump(self) -> None:
        try:
            for resp in self.call:
                self.inbox.put(resp)
            self.inbox.put(Ended())
        except grpc.RpcError as e:
            self.inbox.put(Ended(from_rpc_error(e)))

    def get(self, timeout_s: float | None, *, wait: bool = True) -> pb.MultiplexResponse | Ended | None:
        """The next response or how the stream ended (then for ever); None if nothing came in time."""
        if self.ended is not None:
            return self.ended
        try:
            item = self.inbox.get(timeout=timeout_s) if wait else self.inbox.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, Ended):
            self.ended = item
        return item

    def end(self, *, graceful: bool) -> None:
        self.requests.put(_END)
        if not graceful:
            self.call.cancel()

    def cancel(self) -> None:
        self.end(graceful=False)


class Gateway(GatewayBase):
    """Many sessions of one model by key, over a few streams (see the module docstring). ``with`` closes them."""

    def __init__(
        self, core: GatewayCore, start: Callable[..., Any], info_for: Callable[[str, str], ModelInfo], metadata: tuple
    ) -> None:
        super().__init__(core, start, metadata)
        self._info_for = info_for
        self._lock = threading.Lock()  # one call at a time: the core is one record; other threads wait their turn

    def open(self, keys: Iterable[str], *, resume_tokens: Mapping[str, bytes] | None = None) -> list[str]:
        """Open a session per key (zero state, or from ``resume_tokens[key]``); returns the keys opened.
        GatewayError for keys that could not be (``.result``: those that were)."""
        return self._perform(self._core.open(keys, resume_tokens or {}))

    def step(self, inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
        """Step each key once: ``inputs[key]`` is one chunk ([T] token ids, bytes, or [T, *frame]); returns
        {key: [T, *out] float32}. GatewayError if some keys fail (``.result``: the others' outputs)."""
        return self._perform(self._core.step(inputs))

    def step_arrays(self, keys: Sequence[str], x: object) -> np.ndarray:
        """Step ``keys`` with one columnar input ``x`` [N, T, *frame] (row i for keys[i]); returns [N, T, *out].
        GatewayError if some keys fail (``.result``: the array, zero rows for them)."""
        return self._perform(self._core.step_arrays(keys, x))

    def snapshot(self, keys: Iterable[str] | None = None) -> dict[str, bytes]:
        """Exact resume tokens of these sessions (None: every one): {key: token}."""
        return self._perform(self._core.snapshot(keys))

    def close(self, keys: Iterable[str] | None = None) -> None:
        """Close these sessions; with no keys, every session and the gateway's streams (what ``with`` does).
        Idempotent: closed and unknown keys are ignored."""
        self._perform(self._core.close(keys) if keys is not None else self._core.shutdown())

    def __enter__(self) -> Gateway:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        leave(self.close, self._abandon, exc)

    # -- performing the core's operations ---------------------------------------------------------

    def _perform(self, routine: GatewayRoutine[T]) -> T:
        with self._lock:
            try:
                return perform(routine, self)
            finally:
                self._prune()

    def _start_lane(self, op: StartLane) -> None:
        requests: queue.Queue[object] = queue.Queue()
        call = self._start(op.target, iter(requests.get, _END), metadata=self._metadata)
        self._streams[op.lane] = _Stream(op.target, call, requests)

    def _send_on(self, op: SendOn) -> None:
        stream = self._streams.get(op.lane)
        if stream is not None:
            stream.requests.put(op.request)

    def _receive_on(self, op: ReceiveOn) -> GatewayReply:
        stream = self._streams[op.lane]
        reply = stream.get(op.timeout_s)
        if reply is None:  # no answer in time: the target accepted the connection and hangs
            unanswered(stream.call)  # its worker takes no new stream for a while
            stream.cancel()
            return Ended(UnavailableError(f"{stream.target} did not answer within {op.timeout_s:g} s"))
        return reply

    def _poll_on(self, op: PollOn) -> GatewayReply:
        return self._streams[op.lane].get(None, wait=False)

    def _end_lane(self, op: EndLane) -> None:
        stream = self._streams.pop(op.lane, None)
        if stream is not None:
            stream.end(graceful=op.graceful)

    def _describe(self, op: Describe) -> ModelInfo:
        return self._info_for(op.model, op.target)

    def _pause(self, op: Pause) -> None:
        time.sleep(op.seconds)  # backoff between resume rounds: this thread has nothing else to do
