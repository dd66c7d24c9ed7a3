"""The load generator: worker processes, each driving its share of the streams with grpc.aio.

Every stream runs closed-loop (send one message, wait for its reply, repeat), timing each round
trip. Requests are encoded before the clock starts, so the client does as little as it can. All
workers start measuring at the same wall-clock instant (after a warm-up) and stop at a deadline or
after a message count; progress is shared through a counter the parent shows as a bar.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import grpc
import numpy as np

PROGRESS_EVERY = 32  # messages between progress-counter updates
DYNAMIC_DIM = 64  # a dynamic frame dim is sent at this size when neither the manifest nor the server gives an example


@dataclass(frozen=True)
class LoadSpec:
    """One worker's job. ``target`` is cellserve (raw stream), sdk (``AsyncSession.step``), echo or naive."""

    target: str
    address: str
    model: str
    streams: int
    t: int
    input_kind: str
    input_size: int
    output_size: int
    layers: int
    hidden: int
    warmup_s: float  # unmeasured load before the window opens
    duration_s: float  # window length (0: use messages_per_stream)
    messages_per_stream: int
    seed: int
    checkpoint_every: int = 0  # sdk: the sessions' checkpoint_every (0 = checkpointing off)
    input_dtype: str = ""  # a step's dtype: int64, float32 or float16 ("": from input_kind)
    frame: tuple[int, ...] | None = None  # a step's dims after T, -1 dynamic (None: from input_kind, input_size)
    output_frame: tuple[int, ...] | None = None  # an output step's dims after T, -1 dynamic (None: [output_size])
    state_bytes: int = 0  # one session's state, every tensor (the naive client carries it; 0: our LSTM's h and c)
    example: tuple[int, ...] | None = None  # a frame the model runs (its manifest's): sizes of the dynamic dims
    sessions: int = 1  # sessions one message steps (multiplex: [sessions, T, *frame] per message)
    inflight: int = 1  # messages a stream keeps in flight (multiplex and its echo; answers come in order)
    multiplex: bool = False  # Multiplex-sized messages: the multiplex target, or echo of its sizes

    def step_shape(self) -> tuple[int, ...]:
        """One message's input: ``[T, *frame]``, a dynamic frame dim at the example's size, else DYNAMIC_DIM."""
        frame = self.frame if self.frame is not None else (() if self.input_kind == "tokens" else (self.input_size,))
        example = self.example if self.example is not None and len(self.example) == len(frame) else None
        return (self.t, *(d if d >= 0 else example[i] if example else DYNAMIC_DIM for i, d in enumerate(frame)))

    def output_shape(self) -> tuple[int, ...]:
        """One reply's output: ``[T, *output_frame]``, a dynamic dim at DYNAMIC_DIM (a guess: only its size matters,
        for the echo baseline's replies)."""
        frame = self.output_frame if self.output_frame is not None else (self.output_size,)
        return (self.t, *(DYNAMIC_DIM if d < 0 else d for d in frame))

    @property
    def x_dtype(self) -> np.dtype:
        return np.dtype(self.input_dtype or ("int64" if self.input_kind == "tokens" else "float32"))

    @property
    def session_state_bytes(self) -> int:
        return self.state_bytes or 2 * self.layers * self.hidden * 4  # an older caller's LSTM: h and c float32


@dataclass(frozen=True)
class Window:
    """The measured window, shared by every stream of every worker (time.time() values)."""

    start_at: float
    end_at: float  # 0: count-bound


def _inputs(spec: LoadSpec, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """``n`` valid messages' inputs: token ids in the vocabulary, or normal values of the model's float dtype."""
    shape = spec.step_shape()
    if spec.input_kind == "tokens":
        return [rng.integers(0, spec.input_size, size=shape, dtype=np.int64) for _ in range(n)]
    return [rng.standard_normal(shape, dtype=np.float32).astype(spec.x_dtype) for _ in range(n)]


def timed(lat: list[float], dt: float, progress: Synchronized) -> None:
    """Record one message of the window: its latency, and every PROGRESS_EVERY of them on the shared progress
    counter (one lock per PROGRESS_EVERY messages; :func:`timed_rest` adds what is left at the end)."""
    lat.append(dt)
    if len(lat) % PROGRESS_EVERY == 0:
        with progress.get_lock():
            progress.value += PROGRESS_EVERY


def timed_rest(lat: list[float], progress: Synchronized) -> None:
    """The last messages :func:`timed` recorded but has not yet put on the progress counter."""
    with progress.get_lock():
        progress.value += len(lat) % PROGRESS_EVERY


async def _closed_loop(spec: LoadSpec, w: Window, roundtrip: Any, progress: Synchronized) -> tuple[list[float], int]:
    """Run ``await roundtrip(i)`` until the deadline / count: (latencies in the window, messages sent)."""
    lat: list[float] = []
    i = 0
    while True:
        now = time.time()
        if w.end_at and now >= w.end_at:
            break
        if not w.end_at and len(lat) >= spec.messages_per_stream:
            break
        t0 = time.perf_counter()
        await roundtrip(i)
        dt = time.perf_counter() - t0
        i += 1
        if now >= w.start_at:
            timed(lat, dt, progress)
    timed_rest(lat, progress)
    return lat, i


Roundtrip = Callable[[int], Awaitable[None]]
Close = Callable[[], Awaitable[None]]


OUTPUT_TAG = bytes(((2 << 3) | 2,))  # StreamResponse.output: field 2, wire type 2 (length-delimited)


def _described(reply: object) -> str:
    """A reply that is not what the bench expected, as text: the parsed response where it parses."""
    from cellserve.v1 import cellserve_pb2 as pb

    if not isinstance(reply, bytes):
        return repr(reply)
    try:
        return repr(pb.StreamResponse.FromString(reply))
    except Exception:  # not a StreamResponse at all
        return f"{reply!r:.80}"


async def _open_cellserve(spec: LoadSpec, channel: Any, seed: int) -> tuple[Roundtrip, Close]:
    from cellserve.client.tensors import to_proto
    from cellserve.v1 import cellserve_pb2 as pb

    # Bytes both ways, as for echo: a reply is checked to be an output by its first byte (the tag of
    # StreamResponse.output, field 2, length-delimited), and parsed only to report one that is not.
    method = channel.stream_stream(
        "/cellserve.v1.CellServe/Stream", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    call = method()
    await call.write(pb.StreamRequest(open=pb.Open(model=spec.model)).SerializeToString())
    opened = await call.read()
    if not isinstance(opened, bytes) or pb.StreamResponse.FromString(opened).WhichOneof("kind") != "opened":
        raise RuntimeError(f"cellserve open failed: {_described(opened)} {await call.details()}")
    xs = [to_proto(x) for x in _inputs(spec, np.random.default_rng(seed), 16)]
    reqs = [pb.StreamRequest(step=pb.Step(seq=s, input=xs[s % 16])).SerializeToString() for s in range(64)]

    async def roundtrip(i: int) -> None:
        await call.write(reqs[i % 64])
        resp = await call.read()
        if not isinstance(resp, bytes) or resp[:1] != OUTPUT_TAG:
            raise RuntimeError(f"cellserve step failed: {_described(resp)}")

    async def close() -> None:
        await call.write(pb.StreamRequest(close=pb.Close()).SerializeToString())
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass

    return roundtrip, close


async def _open_sdk(spec: LoadSpec, client: Any, seed: int) -> tuple[Roundtrip, Close]:
    """A session through the asyncio SDK (client-side input check, checkpoints, replay buffer included)."""
    session = await client.session(spec.model)
    xs = _inputs(spec, np.random.default_rng(seed), 16)

    async def roundtrip(i: int) -> None:
        await session.step(xs[i % 16])

    return roundtrip, session.close


async def _open_echo(spec: LoadSpec, channel: Any, seed: int) -> tuple[Roundtrip, Close]:
    from cellserve.client.bench.baselines.echo import echo_stream
    from cellserve.client.bench.baselines.sizes import message_sizes

    send, receive, close = echo_stream(channel, *message_sizes(spec))

    async def roundtrip(i: int) -> None:
        await send()
        await receive()

    await roundtrip(0)  # the stream is up before the clock starts, as cellserve's open is
    return roundtrip, close


async def _open_naive(spec: LoadSpec, channel: Any, seed: int) -> tuple[Roundtrip, Close]:
    """A session of the naive server: every step sends x and the whole state, and keeps the state it gets back."""
    from cellserve.client.bench.baselines.naive import METHOD, decode_reply, dynamic_axes, encode_request

    method = channel.unary_unary(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    xs = [x[None] for x in _inputs(spec, np.random.default_rng(seed), 16)]  # [1, T, *frame]
    dynamic = dynamic_axes(spec.frame or ())
    n_state = spec.session_state_bytes
    state = [bytes(n_state)]  # zeros: every state starts at zero, whatever its dtype

    async def roundtrip(i: int) -> None:
        reply = await method(encode_request(xs[i % 16], state[0], dynamic))  # x and every state, every step
        _, state[0] = decode_reply(reply, n_state)

    async def close() -> None:
        return None

    return roundtrip, close


OPENERS = {"cellserve": _open_cellserve, "sdk": _open_sdk, "echo": _open_echo, "naive": _open_naive}


@dataclass(frozen=True)
class WorkerResult:
    latencies: bytes  # float64 seconds of the messages in the window
    finished: float  # time.time() when the last stream stopped
    cpu_s: float  # this process's CPU time while its streams ran (warm-up included)
    sent: int  # messages sent in that time (warm-up included)
    error: str = ""


async def _run(spec: LoadSpec, sync: Any, progress: Synchronized) -> WorkerResult:
    # One channel (HTTP/2 connection) per 16 streams: like many clients, not one multiplexed pipe. A Multiplex
    # stream gets its own, spread over the workers as the SDK's gateway spreads its streams (spread_channels).
    if spec.multiplex:
        from cellserve.client.bench.multiplex_load import spread_channels

        placed, channels = await spread_channels(spec.address, spec.streams)
    else:
        channels = [_connection(spec) for _ in range(max(1, -(-spec.streams // 16)))]
    try:
        if spec.multiplex:  # pipes: one message in flight, or several (--inflight)
            from cellserve.client.bench.multiplex_load import open_pipes, pipe_loop

            pipes = await open_pipes(spec, placed)
            streams = [(p.roundtrip, p.close) for p in pipes]
            window = sync.wait_window()
            cpu0 = time.process_time()
            loops = await asyncio.gather(*(pipe_loop(spec, window, p, progress) for p in pipes))
        else:
            opener = OPENERS[spec.target]
            streams = await asyncio.gather(
                *(opener(spec, channels[i % len(channels)], spec.seed * 100_003 + i) for i in range(spec.streams))
            )
            window = sync.wait_window()  # blocks until every worker has its streams open
            cpu0 = time.process_time()
            loops = await asyncio.gather(*(_closed_loop(spec, window, rt, progress) for rt, _ in streams))
        cpu, finished = time.process_time() - cpu0, time.time()
        await asyncio.gather(*(close() for _, close in streams))
        lat = np.concatenate([np.asarray(lat, np.float64) for lat, _ in loops])
        return WorkerResult(lat.tobytes(), finished, cpu, sum(n for _, n in loops))
    finally:
        for ch in channels:
            await ch.close()


def _connection(spec: LoadSpec) -> Any:
    """A channel, or for the sdk target an AsyncClient (its own channel); both close with ``await close()``."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    if spec.target == "sdk":
        from cellserve.client import AsyncClient, ChannelConfig

        # one connection per AsyncClient, as for the raw channels: the bench spreads its streams itself
        config = ChannelConfig(extra_options=tuple(options), connections_per_target=1)
        return AsyncClient(spec.address, config, checkpoint_every=spec.checkpoint_every)
    return grpc.aio.insecure_channel(spec.address, options=options)


class StartSync:
    """Two barriers: workers report ready; the parent publishes the window; all start together."""

    def __init__(self, ctx: Any, workers: int) -> None:
        self.ready = ctx.Barrier(workers + 1)
        self.go = ctx.Barrier(workers + 1)
        self.start_at = ctx.Value("d", 0.0)
        self.end_at = ctx.Value("d", 0.0)

    def wait_window(self, timeout_s: float = 300.0) -> Window:
        self.ready.wait(timeout_s)
        self.go.wait(timeout_s)
        return Window(self.start_at.value, self.end_at.value)

    def publish(self, warmup_s: float, duration_s: float, timeout_s: float = 300.0) -> Window:
        """Parent side: wait for the workers, open the window ``warmup_s`` from now, release them."""
        self.ready.wait(timeout_s)
        start = time.time() + warmup_s
        self.start_at.value = start
        self.end_at.value = start + duration_s if duration_s else 0.0
        self.go.wait(timeout_s)
        return Window(self.start_at.value, self.end_at.value)


def worker(spec: LoadSpec, sync: StartSync, progress: Synchronized, results: Any) -> None:
    """Process entry point: put a WorkerResult on ``results`` (its ``error`` set if the run failed)."""
    try:
        results.put(asyncio.run(_run(spec, sync, progress)))
    except Exception as e:  # reported to the parent, which fails the bench with it
        for barrier in (sync.ready, sync.go):
            barrier.abort()
        results.put(WorkerResult(b"", 0.0, 0.0, 0, f"{type(e).__name__}: {e}"))
