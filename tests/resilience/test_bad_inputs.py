"""The bad-input corpus: every bad request gets its exact status; a healthy session never notices."""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from stream_helpers import read_rest

from cellserve.server.resume_state import ResumeState
from cellserve.server.resume_token import TokenCodec, TokenKeys
from cellserve.server.tensors import to_numpy
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto

KEY = b"7" * 32
KEYS_JSON = '{"active": "main", "keys": {"main": "' + KEY.hex() + '"}}'
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
PRECONDITION, EXHAUSTED = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
CAPACITY, MAX_CHUNK, MAX_BYTES = 16, 64, 64 * 1024
# How a call can end on the client with no answer from the server (see many_opens_at_once)
CLIENT_SIDE = (grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED)
CODES = {c.value[0]: c for c in grpc.StatusCode}

OPEN = pb.StreamRequest(open=pb.Open(model="tiny"))
CLOSE = pb.StreamRequest(close=pb.Close())
SNAPSHOT = pb.StreamRequest(snapshot=pb.Snapshot())


def step(x: np.ndarray | pb.Tensor | None, seq: int = 1) -> pb.StreamRequest:
    if x is None:
        return pb.StreamRequest(step=pb.Step(seq=seq))
    return pb.StreamRequest(step=pb.Step(seq=seq, input=x if isinstance(x, pb.Tensor) else to_proto(x)))


def tensor(dtype: int, shape: list[int], raw: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, raw=raw)


async def write_all_then_read(call: Any, items: tuple[Any, ...]) -> None:
    """Write ``items`` and half-close (a refusal may end the stream first), then read it to its end."""
    try:
        for item in items:
            await call.write(item)
        await call.done_writing()
    except grpc.aio.AioRpcError:
        pass
    await read_rest(call)


class Corpus:
    """Each probe returns the gRPC code the server answered with (in-stream error or stream status)."""

    def __init__(
        self, channel: grpc.aio.Channel, address: str, feature_token: bytes, registry: Any, wait_until: Any,
        tiny_sha256: str,
    ) -> None:  # fmt: skip
        self.wait_until = wait_until
        self.tiny_sha256 = tiny_sha256
        self.ch = channel
        self.address = address
        self.registry = registry
        self.stub = pb_grpc.CellServeStub(channel)
        self.feature_token = feature_token

    def steps(self) -> float:
        return self.registry.get_sample_value("cellserve_steps_total", {"model": "tiny"}) or 0.0

    def error_counts(self) -> dict[str, float]:
        """Every code the server has answered with so far, and how often."""
        return {
            sample.labels["code"]: sample.value
            for family in self.registry.collect()
            if family.name == "cellserve_errors"
            for sample in family.samples
            if sample.name == "cellserve_errors_total"
        }

    async def in_stream(self, x: Any, model: str = "tiny") -> grpc.StatusCode:
        call = self.stub.Stream()
        await call.write(pb.StreamRequest(open=pb.Open(model=model)))
        assert (await call.read()).WhichOneof("kind") == "opened"
        await call.write(step(x))
        resp = await call.read()
        await call.write(CLOSE)
        await call.done_writing()
        await read_rest(call)
        if resp.WhichOneof("kind") != "error":
            return grpc.StatusCode.OK
        assert resp.error.seq == 1 and resp.error.message
        return CODES[resp.error.code]

    async def stream_status(self, *messages: pb.StreamRequest) -> grpc.StatusCode:
        call = self.stub.Stream()
        await write_all_then_read(call, messages)
        assert await call.details() or await call.code() == grpc.StatusCode.OK
        return await call.code()

    async def raw_stream(self, *frames: bytes) -> grpc.StatusCode:
        raw = self.ch.stream_stream(
            "/cellserve.v1.CellServe/Stream", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        call = raw()
        await write_all_then_read(call, frames)
        return await call.code()

    async def unary_status(self, coro: Awaitable[Any]) -> grpc.StatusCode:
        try:
            await coro
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    async def generate_status(self, **kw: Any) -> grpc.StatusCode:
        call = self.stub.Generate(pb.GenerateRequest(**kw))
        await read_rest(call)
        return await call.code()

    def resume(self, token: bytes, model: str = "tiny") -> Awaitable[grpc.StatusCode]:
        return self.stream_status(pb.StreamRequest(open=pb.Open(model=model, resume_token=token)))

    async def capacity_plus_one(self) -> grpc.StatusCode:
        held, refused = [], []
        for _ in range(CAPACITY):  # one slot is the healthy session's: the last of these is refused
            call = self.stub.Stream()
            await call.write(OPEN)
            try:
                held.append((call, await call.read()))
            except grpc.aio.AioRpcError:
                refused.append(await call.code())
        for c, _ in held:
            c.cancel()
        assert len(held) == CAPACITY - 1
        return refused[0] if len(refused) == 1 else grpc.StatusCode.OK

    async def many_opens_at_once(self, n: int) -> grpc.StatusCode:
        """n opens at once, all held until every one is answered: each opens or is refused
        RESOURCE_EXHAUSTED (capacity); returns RESOURCE_EXHAUSTED, or any other code seen."""
        answered, everyone = [0], asyncio.Event()
        lost: collections.Counter[str] = collections.Counter()  # calls that ended on the client, for messages

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            yield OPEN
            await everyone.wait()  # no half-close: an opened session stays open until all are answered

        async def one() -> grpc.StatusCode:
            # a request iterator, not call.write(): an explicit write racing the server's refusal turns
            # the status into a client-side INTERNAL in grpc.aio (grpc/grpc#36066)
            channel = next(turn) % len(stubs)
            call = stubs[channel].Stream(requests())
            try:
                first = await call.read()
                code = grpc.StatusCode.OK if first is not grpc.aio.EOF else await call.code()
            except grpc.aio.AioRpcError:
                code = await call.code()
            if code in CLIENT_SIDE:
                lost[f"{code.name} ({await call.details()}) on channel {channel}"] += 1
            answered[0] += 1
            if answered[0] == n:
                everyone.set()
            await everyone.wait()
            call.cancel()
            return code

        answered_before = self.error_counts()
        channels = [grpc.aio.insecure_channel(self.address) for _ in range(n // 500 + 1)]
        stubs, turn = [pb_grpc.CellServeStub(ch) for ch in channels], itertools.count()
        codes = await asyncio.gather(*(one() for _ in range(n)))
        for ch in channels:
            await ch.close()
        opened = codes.count(grpc.StatusCode.OK)
        assert opened == CAPACITY - 1  # the healthy session holds the last slot
        # Ground truth is the server's own count of what it answered: every open it received was admitted
        # or refused with RESOURCE_EXHAUSTED, and it answered no other code. Calls can also end on the
        # client without an answer: grpc.aio fails some locally with INTERNAL ("Failed execute_batch" on its
        # own send, grpc/grpc#36066 family), and on a starved box a connection whose peer (this same
        # process) cannot answer HTTP/2 in time is lost with all its pending calls, CANCELLED together.
        after = self.error_counts()
        answered_by_server = {k: v - answered_before.get(k, 0) for k, v in after.items()}
        answered_by_server = {k: v for k, v in answered_by_server.items() if v}
        refused = codes.count(EXHAUSTED)
        assert answered_by_server == ({"RESOURCE_EXHAUSTED": refused} if refused else {}), dict(lost)
        client_side = sum(codes.count(c) for c in CLIENT_SIDE)
        assert opened + refused + client_side == n, dict(lost)
        others = {c for c in codes if c not in (grpc.StatusCode.OK, EXHAUSTED, *CLIENT_SIDE)}
        return others.pop() if others else EXHAUSTED

    async def slow_reader(self) -> str:
        """Sends steps and never reads: the server must stop working for it (flow control), not buffer."""
        call = self.stub.Stream()
        await call.write(OPEN)
        await call.read()
        before = self.steps()
        x, written = to_proto(np.zeros(32, dtype=np.int64)), 0  # 32 steps → 32 KiB responses
        try:
            for seq in range(3000):
                await asyncio.wait_for(call.write(step(x, seq)), 2.0)
                written += 1
        except TimeoutError:
            pass  # the client's writes stalled too
        seen = {"processed": -1, "stable_polls": 0}

        def settled() -> bool:  # the server stopped stepping this session: 5 polls without a change
            now = (self.steps() - before) // 32
            seen["stable_polls"] = seen["stable_polls"] + 1 if now == seen["processed"] else 0
            seen["processed"] = now
            return seen["stable_polls"] >= 5

        await self.wait_until.aio(settled, timeout_s=50, poll_s=0.1)  # inside the probe's 60 s
        processed = seen["processed"]
        call.cancel()
        if processed < min(written, 1000):
            return "bounded"
        return f"unbounded: the server answered {processed} of {written} unread steps"

    async def disconnect_mid_step(self) -> grpc.StatusCode:
        call = self.stub.Stream()
        await call.write(OPEN)
        await call.read()
        await call.write(step(np.zeros(MAX_CHUNK, dtype=np.int64)))
        call.cancel()
        return await call.code()


def build_cases(c: Corpus) -> list[tuple[str, Callable[[], Awaitable[grpc.StatusCode]], grpc.StatusCode]]:
    ok = np.array([1, 2, 3], dtype=np.int64)
    feats = np.ones((2, 4), dtype=np.float32)
    nan, inf = feats.copy(), feats.copy()
    nan[0, 1], inf[1, 3] = np.nan, np.inf
    hc = (np.zeros((2, 32), np.float32), np.zeros((2, 32), np.float32))  # the tiny model's h and c, [L, H]
    good_state = ResumeState("tiny", "00" * 32, 0, hc, ("h0", "c0"))
    main = TokenCodec(TokenKeys({"main": KEY}, "main"), ttl_s=60)

    def layout(states: tuple[np.ndarray, ...], names: tuple[str, ...]) -> bytes:
        """A valid token for this server's tiny model whose state does not match the model's."""
        return main.encode(ResumeState("tiny", c.tiny_sha256, 0, states, names))[0]

    h33 = np.zeros((2, 33), np.float32)
    expired = main.encode(good_state, now_ms=int(time.time() * 1000) - 3_600_000)[0]
    forged = TokenCodec(TokenKeys({"main": b"f" * 32}, "main"), ttl_s=60).encode(good_state)[0]
    unknown_kid = TokenCodec(TokenKeys({"old": KEY}, "old"), ttl_s=60).encode(good_state)[0]
    return [
        ("token model, float32 input", lambda: c.in_stream(ok.astype(np.float32)), INVALID),
        ("token model, int32 input", lambda: c.in_stream(ok.astype(np.int32)), INVALID),
        ("token model, float64 input", lambda: c.in_stream(ok.astype(np.float64)), INVALID),
        ("token model, float16 input", lambda: c.in_stream(ok.astype(np.float16)), INVALID),
        ("token model, rank 2", lambda: c.in_stream(ok.reshape(1, 3)), INVALID),
        ("no shape", lambda: c.in_stream(tensor(pb.DTYPE_INT64, [], ok.tobytes())), INVALID),
        ("raw shorter than shape", lambda: c.in_stream(tensor(pb.DTYPE_INT64, [3], ok.tobytes()[:-1])), INVALID),
        ("raw longer than shape", lambda: c.in_stream(tensor(pb.DTYPE_INT64, [2], ok.tobytes())), INVALID),
        ("negative dimension", lambda: c.in_stream(tensor(pb.DTYPE_INT64, [-3], ok.tobytes())), INVALID),
        ("empty tensor", lambda: c.in_stream(tensor(pb.DTYPE_INT64, [0], b"")), INVALID),
        ("unknown dtype", lambda: c.in_stream(tensor(99, [3], ok.tobytes())), INVALID),
        ("unspecified dtype", lambda: c.in_stream(tensor(0, [3], ok.tobytes())), INVALID),
        ("token id = vocabulary size", lambda: c.in_stream(np.array([256], dtype=np.int64)), INVALID),
        ("negative token id", lambda: c.in_stream(np.array([-1], dtype=np.int64)), INVALID),
        ("huge T", lambda: c.in_stream(np.zeros(MAX_CHUNK + 1, dtype=np.int64)), INVALID),
        ("step without input", lambda: c.in_stream(None), INVALID),
        ("features with NaN", lambda: c.in_stream(nan, "feat"), INVALID),
        ("features with Inf", lambda: c.in_stream(inf, "feat"), INVALID),
        ("features of wrong width", lambda: c.in_stream(np.ones((2, 5), np.float32), "feat"), INVALID),
        ("features of rank 1", lambda: c.in_stream(np.ones(4, np.float32), "feat"), INVALID),
        ("features as int64", lambda: c.in_stream(np.ones((2, 4), np.int64), "feat"), INVALID),
        ("unknown model", lambda: c.stream_status(pb.StreamRequest(open=pb.Open(model="nope"))), NOT_FOUND),
        ("step before open", lambda: c.stream_status(step(ok)), PRECONDITION),
        ("snapshot before open", lambda: c.stream_status(SNAPSHOT), PRECONDITION),
        ("close before open", lambda: c.stream_status(CLOSE), PRECONDITION),
        ("empty first message", lambda: c.stream_status(pb.StreamRequest()), PRECONDITION),
        ("open twice", lambda: c.stream_status(OPEN, OPEN), PRECONDITION),
        ("step after close", lambda: c.stream_status(OPEN, CLOSE, step(ok)), PRECONDITION),
        ("snapshot after close", lambda: c.stream_status(OPEN, CLOSE, SNAPSHOT), PRECONDITION),
        ("close twice", lambda: c.stream_status(OPEN, CLOSE, CLOSE), PRECONDITION),
        ("empty message after open", lambda: c.stream_status(OPEN, pb.StreamRequest()), INVALID),
        ("garbage bytes as the first message", lambda: c.raw_stream(b"\xff\xfe garbage \x00\x01"), INVALID),
        ("garbage bytes after open", lambda: c.raw_stream(OPEN.SerializeToString(), b"\x0a\xff\xff\xff"), INVALID),
        ("oversized message", lambda: c.stream_status(OPEN, step(np.zeros(MAX_BYTES // 8 + 16, np.int64))), EXHAUSTED),
        ("resume token of garbage", lambda: c.resume(b"not a token at all, really not"), INVALID),
        ("resume token forged", lambda: c.resume(forged), UNAUTH),
        ("resume token truncated", lambda: c.resume(expired[:-7]), UNAUTH),
        ("resume token expired", lambda: c.resume(expired), PRECONDITION),
        ("resume token of another model", lambda: c.resume(c.feature_token), PRECONDITION),
        ("resume token for a model file that changed", lambda: c.resume(main.encode(good_state)[0]), PRECONDITION),
        ("resume token with unknown key id", lambda: c.resume(unknown_kid), UNAUTH),
        ("resume token whose state has another shape", lambda: c.resume(layout((h33, h33), ("h0", "c0"))),
         PRECONDITION),
        ("resume token whose state has another dtype",
         lambda: c.resume(layout(tuple(a.astype(np.float16) for a in hc), ("h0", "c0"))), PRECONDITION),
        ("resume token whose states have other names", lambda: c.resume(layout(hc, ("c0", "h0"))), PRECONDITION),
        ("resume token with three states", lambda: c.resume(layout((*hc, hc[0]), ("h0", "c0", "x0"))),
         PRECONDITION),
        ("resume token with one state", lambda: c.resume(layout(hc[:1], ("h0",))), PRECONDITION),
        ("resume token on an unknown model", lambda: c.resume(expired, model="nope"), NOT_FOUND),
        ("ModelInfo of unknown model", lambda: c.unary_status(c.stub.ModelInfo(pb.ModelInfoRequest(model="x"))),
         NOT_FOUND),
        ("Generate with empty prompt", lambda: c.generate_status(model="tiny", prompt="", max_tokens=3), INVALID),
        ("Generate on a feature model", lambda: c.generate_status(model="feat", prompt="a", max_tokens=3),
         PRECONDITION),
        ("capacity + 1 opens", c.capacity_plus_one, EXHAUSTED),
        ("10k opens at once", lambda: c.many_opens_at_once(10_000), EXHAUSTED),
        ("slow reader", c.slow_reader, "bounded"),
        ("T whose output exceeds the message limit", lambda: c.in_stream(np.zeros(MAX_CHUNK, np.int64)), INVALID),
        ("disconnect mid-step", c.disconnect_mid_step, grpc.StatusCode.CANCELLED),
    ]


def test_bad_input_corpus_gets_exact_codes_and_a_healthy_session_is_untouched(
    running_server, tiny_model_dir, tiny_oracle, tmp_path, wait_until
):
    from cellserve.model.export import export_random_model

    feat = tmp_path / "feat"
    export_random_model(feat, name="feat", input_kind="features", input_size=4, output_size=3, layers=1, hidden=8)
    tokens = np.random.default_rng(9).integers(0, 256, size=40, dtype=np.int64)
    with running_server(
        model_dirs=[tiny_model_dir, feat], capacity=CAPACITY, max_chunk_steps=MAX_CHUNK,
        max_message_bytes=MAX_BYTES, token_keys=KEYS_JSON, max_streams=20_000,
    ) as srv:

        async def main() -> tuple[list[tuple[str, Any, Any]], np.ndarray]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                stub = pb_grpc.CellServeStub(ch)
                healthy = stub.Stream()
                await healthy.write(OPEN)
                await healthy.read()
                ys = []
                for i in range(20):  # half its sequence before the corpus
                    await healthy.write(step(tokens[i : i + 1], i))
                    ys.append(to_numpy((await healthy.read()).output.output))
                feature = stub.Stream()
                await feature.write(pb.StreamRequest(open=pb.Open(model="feat")))
                await feature.read()
                await feature.write(SNAPSHOT)
                feature_token = (await feature.read()).snapshot.token
                await feature.write(CLOSE)
                await feature.done_writing()
                await read_rest(feature)
                tiny_sha256 = srv.server.models.get("tiny").manifest.sha256
                corpus = Corpus(ch, srv.address, feature_token, srv.registry, wait_until, tiny_sha256)
                results = []
                for name, probe, want in build_cases(corpus):
                    try:
                        code: Any = await asyncio.wait_for(probe(), 60)
                    except TimeoutError:
                        code = "no answer within 60 s"
                    results.append((name, code, want))
                await healthy.write(step(tokens[20:], 20))  # the rest, after everything above
                ys.append(to_numpy((await healthy.read()).output.output))
                await healthy.write(CLOSE)
                await healthy.done_writing()
                await read_rest(healthy)
                return results, np.concatenate(ys)

        results, got = asyncio.run(main())
        assert srv.server.models.get("tiny").pool.used == 0  # every probe's slot was freed
    wrong = [(name, got_code, want) for name, got_code, want in results if got_code != want]
    assert not wrong, "\n".join(f"{n}: got {g}, want {w}" for n, g, w in wrong)
    assert len(results) >= 30
    assert not {g for _, g, _ in results} & {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
    assert not srv.registry.get_sample_value("cellserve_errors_total", {"code": "INTERNAL"})
    h, c = tiny_oracle.init_state(1)
    np.testing.assert_allclose(got, tiny_oracle.run(tokens[None], h, c)[0][0], atol=1e-5, rtol=0)
