"""The load of ``cellserve bench --sessions-per-message K``: Multiplex streams, each holding K sessions and stepping
all of them in every message, and the echo server driven with messages of the same sizes.

A stream is a :class:`Pipe`: ``send(i)`` writes message i, ``recv()`` reads the next answer (the server answers
in request order). With one message in flight a stream runs closed-loop like every other target; with
``--inflight D`` a writer keeps up to D messages unanswered and a reader times each from its write to its answer.
Requests are encoded before the clock starts; each differs only in its ``seq`` varint, put in front of a
pre-encoded ``step`` field (protobuf fields may come in any order, and the server echoes ``seq``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import grpc
import numpy as np

from cellserve.client.bench.load import LoadSpec, Window, _closed_loop, _inputs, timed, timed_rest
from cellserve.client.channel import DEFAULT_CONNECTIONS_PER_TARGET
from cellserve.client.connection_pool import PROBE_TIMEOUT_S, ConnectionPool, ask_worker_aio
from cellserve.client.tensors import to_proto
from cellserve.v1 import cellserve_pb2 as pb

MULTIPLEX_METHOD = "/cellserve.v1.CellServe/Multiplex"
DISTINCT_INPUTS = 16  # different [K, T, *frame] tensors a stream cycles through
FIRST_STEP_SEQ = 2  # seq 1 is the stream's open; the server's own events carry 0


@dataclass(frozen=True)
class Pipe:
    """One stream: write message ``i``; read (and check) the next answer; close the stream."""

    send: Callable[[int], Awaitable[None]]
    recv: Callable[[], Awaitable[None]]
    close: Callable[[], Awaitable[None]]

    async def roundtrip(self, i: int) -> None:
        await self.send(i)
        await self.recv()


def varint(n: int) -> bytes:
    """``n`` as a protobuf base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def step_field(step: bytes) -> bytes:
    """A serialized StepSessions as MultiplexRequest's ``step`` field (3): tag, length, bytes."""
    return bytes(((3 << 3) | 2,)) + varint(len(step)) + step


def step_request(seq: int, field: bytes) -> bytes:
    """A MultiplexRequest: ``seq`` (field 1) in front of a :func:`step_field`."""
    return b"\x08" + varint(seq) + field


def row_inputs(spec: LoadSpec, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """``n`` valid messages' inputs, each ``[K, T, *frame]`` (K = ``spec.sessions``)."""
    return [np.stack(_inputs(spec, rng, spec.sessions)) for _ in range(n)]


async def open_multiplex(spec: LoadSpec, channel: Any, seed: int) -> Pipe:
    """A Multiplex stream with ``spec.sessions`` sessions of ``spec.model`` open on it."""
    method = channel.stream_stream(MULTIPLEX_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    call = method()
    opens = [pb.SessionOpen(model=spec.model, key=str(i)) for i in range(spec.sessions)]
    await call.write(pb.MultiplexRequest(seq=1, open=pb.OpenSessions(sessions=opens)).SerializeToString())
    opened = _answer(await call.read(), 1, "opened", "open")
    handles = [s.handle for s in opened.opened.sessions]
    # the step field (3) of each request, encoded once: tag, length, StepSessions
    bodies = []
    for x in row_inputs(spec, np.random.default_rng(seed), DISTINCT_INPUTS):
        bodies.append(step_field(pb.StepSessions(handles=handles, input=to_proto(x)).SerializeToString()))
    answered = [FIRST_STEP_SEQ]

    async def send(i: int) -> None:
        await call.write(step_request(FIRST_STEP_SEQ + i, bodies[i % DISTINCT_INPUTS]))

    async def recv() -> None:
        _answer(await call.read(), answered[0], "output", "step")
        answered[0] += 1

    async def close() -> None:
        await call.write(pb.MultiplexRequest(seq=1, close=pb.CloseSessions(handles=handles)).SerializeToString())
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass

    return Pipe(send, recv, close)


def _answer(reply: object, seq: int, kind: str, what: str) -> Any:
    """The parsed answer to request ``seq``; RuntimeError unless it is a whole ``kind`` answer with no entry
    failed (a bench must not count a failed step as served)."""
    if not isinstance(reply, bytes):
        raise RuntimeError(f"multiplex {what} got no answer: {reply!r}")
    resp = pb.MultiplexResponse.FromString(reply)
    if resp.seq != seq or resp.WhichOneof("kind") != kind or resp.errors:
        raise RuntimeError(f"multiplex {what} (seq {seq}) was answered {str(resp)[:300]!r}")
    return resp


async def open_echo(spec: LoadSpec, channel: Any, seed: int) -> Pipe:
    """An echo stream whose requests and replies are the size of a Multiplex step and its answer."""
    from cellserve.client.bench.baselines.echo import echo_stream
    from cellserve.client.bench.baselines.sizes import multiplex_sizes

    write, recv, close = echo_stream(channel, *multiplex_sizes(spec))

    async def send(i: int) -> None:
        await write()

    pipe = Pipe(send, recv, close)
    await pipe.roundtrip(0)  # the stream is up before the clock starts, as the multiplex sessions are open
    return pipe


PIPES = {"multiplex": open_multiplex, "echo": open_echo}


async def spread_channels(address: str, streams: int) -> tuple[list[Any], list[Any]]:
    """A channel for each of ``streams`` streams, from a pool that spreads them over the server's workers as the
    SDK's does (client/connection_pool.py), and every channel the pool made (to close)."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # each channel its own connection
    make = lambda target: grpc.aio.insecure_channel(target, options=options)  # noqa: E731
    size = max(DEFAULT_CONNECTIONS_PER_TARGET, streams)  # a connection per stream, as in runs before the pool
    pool = ConnectionPool(address, size, make, ask_worker_aio((), PROBE_TIMEOUT_S))
    placed = [pool.count(await pool.apick()) for _ in range(streams)]
    return placed, pool.channels()


async def open_pipes(spec: LoadSpec, channels: list[Any]) -> list[Pipe]:
    """``spec.streams`` pipes of ``spec.target``, spread over ``channels``."""
    opener = PIPES[spec.target]
    return list(
        await asyncio.gather(
            *(opener(spec, channels[i % len(channels)], spec.seed * 100_003 + i) for i in range(spec.streams))
        )
    )


async def pipe_loop(spec: LoadSpec, w: Window, pipe: Pipe, progress: Synchronized) -> tuple[list[float], int]:
    """(latencies in the window, messages sent): the closed loop over ``pipe.roundtrip`` with one message in
    flight, else a writer up to ``spec.inflight`` messages ahead of the reader. A message belongs to the window
    when it was written in it."""
    if spec.inflight <= 1:
        return await _closed_loop(spec, w, pipe.roundtrip, progress)
    free = asyncio.Semaphore(spec.inflight)  # messages the writer may still put in flight
    written = asyncio.Semaphore(0)  # messages (or the writer's end) the reader has to take
    in_flight: deque[tuple[float, bool]] = deque()  # (perf_counter at write, written in the window)
    sent = [0]

    async def writer() -> None:
        i = counted = 0
        while True:
            await free.acquire()
            now = time.time()
            if (w.end_at and now >= w.end_at) or (not w.end_at and counted >= spec.messages_per_stream):
                break
            in_window = now >= w.start_at
            counted += in_window
            in_flight.append((time.perf_counter(), in_window))
            written.release()
            await pipe.send(i)
            i += 1
        sent[0] = i
        written.release()  # the end: the reader finds nothing in flight

    async def reader() -> list[float]:
        lat: list[float] = []
        while True:
            await written.acquire()
            if not in_flight:
                break
            await pipe.recv()
            t0, in_window = in_flight.popleft()
            free.release()
            if in_window:
                timed(lat, time.perf_counter() - t0, progress)
        timed_rest(lat, progress)
        return lat

    lat, _ = await asyncio.gather(reader(), writer())
    return lat, sent[0]
