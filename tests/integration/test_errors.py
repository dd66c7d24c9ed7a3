"""Every error of the serving core gets its precise status; a bad step leaves all state untouched."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from stream_helpers import TOL, open_msg, read_rest, step_msg

from cellserve.server.tensors import to_numpy
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def bad_tensor(kind: str) -> pb.Tensor:
    """Malformed step inputs for the tiny token model (vocabulary 256, int64 [T])."""
    ok = np.array([1, 2, 3], dtype=np.int64)
    return {
        "wrong dtype": to_proto(ok.astype(np.float32)),
        "wrong dtype int32": to_proto(ok.astype(np.int32)),
        "wrong rank": to_proto(ok.reshape(1, 3)),
        "byte length": pb.Tensor(dtype=pb.DTYPE_INT64, shape=[3], raw=ok.tobytes()[:-1]),
        "token too big": to_proto(np.array([1, 256], dtype=np.int64)),
        "negative token": to_proto(np.array([-1], dtype=np.int64)),
        "empty": pb.Tensor(dtype=pb.DTYPE_INT64, shape=[0], raw=b""),
        "no shape": pb.Tensor(dtype=pb.DTYPE_INT64, raw=ok.tobytes()),
        "unknown dtype": pb.Tensor(dtype=99, shape=[3], raw=ok.tobytes()),
        "too many steps": to_proto(np.zeros(9, dtype=np.int64)),
    }[kind]


BAD_KINDS = [
    "wrong dtype",
    "wrong dtype int32",
    "wrong rank",
    "byte length",
    "token too big",
    "negative token",
    "empty",
    "no shape",
    "unknown dtype",
    "too many steps",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_step_is_answered_in_stream_and_state_is_untouched(running_server, tiny_oracle, kind):
    tokens = np.arange(20, dtype=np.int64) * 7 % 256
    with running_server(max_chunk_steps=8) as srv:

        async def main() -> tuple[pb.StreamResponse, np.ndarray]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                call = pb_grpc.CellServeStub(ch).Stream()
                await call.write(open_msg())
                await call.read()
                ys = []
                await call.write(step_msg(0, tokens[:10][:8]))
                ys.append(to_numpy((await call.read()).output.output))
                await call.write(pb.StreamRequest(step=pb.Step(seq=1, input=bad_tensor(kind))))
                err = await call.read()
                await call.write(step_msg(2, tokens[8:16]))
                ys.append(to_numpy((await call.read()).output.output))
                await call.done_writing()
                return err, np.concatenate(ys)

        err, got = asyncio.run(main())
        errors = srv.registry.get_sample_value("cellserve_errors_total", {"code": "INVALID_ARGUMENT"})
    assert err.WhichOneof("kind") == "error"
    assert err.error.seq == 1 and err.error.code == INVALID.value[0]
    assert err.error.message
    np.testing.assert_allclose(got, tiny_oracle.sequence(tokens[:16]), atol=TOL, rtol=0)
    assert errors == 1


def test_nan_features_are_invalid_argument(running_server, tmp_path):
    from cellserve.model.export import export_random_model

    export_random_model(tmp_path, name="feat", input_kind="features", input_size=4, output_size=3, layers=1, hidden=8)
    with running_server(model_dirs=[tmp_path]) as srv:

        async def main() -> pb.StreamResponse:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                call = pb_grpc.CellServeStub(ch).Stream()
                await call.write(open_msg("feat"))
                await call.read()
                x = np.ones((2, 4), dtype=np.float32)
                x[1, 2] = np.nan
                await call.write(step_msg(5, x))
                err = await call.read()
                await call.write(step_msg(6, np.ones((2, 4), dtype=np.float32)))
                ok = await call.read()
                assert ok.WhichOneof("kind") == "output" and list(ok.output.output.shape) == [2, 3]
                await call.done_writing()
                return err

        err = asyncio.run(main())
    assert err.error.code == INVALID.value[0] and "NaN" in err.error.message


async def _stream_status(address: str, messages: list[pb.StreamRequest]) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as ch:
        call = pb_grpc.CellServeStub(ch).Stream()
        try:
            for m in messages:
                await call.write(m)
            await call.done_writing()
            async for _ in call:
                pass
        except grpc.aio.AioRpcError:
            pass  # the server ended the stream early; its status is what we check
        return await call.code(), await call.details()


OPEN = open_msg()
STEP = step_msg(0, np.array([1], dtype=np.int64))
CLOSE = pb.StreamRequest(close=pb.Close())


@pytest.mark.parametrize(
    ("messages", "code", "words"),
    [
        ([open_msg("nope")], grpc.StatusCode.NOT_FOUND, "nope"),
        ([STEP], grpc.StatusCode.FAILED_PRECONDITION, "before open"),
        ([pb.StreamRequest(snapshot=pb.Snapshot())], grpc.StatusCode.FAILED_PRECONDITION, "before open"),
        ([pb.StreamRequest()], grpc.StatusCode.FAILED_PRECONDITION, "before open"),
        ([OPEN, OPEN], grpc.StatusCode.FAILED_PRECONDITION, "already has session"),
        ([OPEN, pb.StreamRequest()], INVALID, "none of"),
    ],
    ids=["unknown-model", "step-before-open", "snapshot-before-open", "empty-first", "open-twice", "empty-request"],
)
def test_protocol_errors_end_the_stream_with_precise_status(running_server, messages, code, words):
    with running_server() as srv:
        got, details = asyncio.run(_stream_status(srv.address, messages))
    assert got == code, details
    assert words in details


@pytest.mark.parametrize(
    ("after", "words"),
    [(STEP, "closed"), (pb.StreamRequest(snapshot=pb.Snapshot()), "closed"), (CLOSE, "already closed")],
    ids=["step", "snapshot", "close"],
)
def test_step_after_close_is_failed_precondition(running_server, after, words):
    with running_server() as srv:

        async def main() -> tuple[list[str], grpc.StatusCode, str]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                call = pb_grpc.CellServeStub(ch).Stream()
                for m in (OPEN, CLOSE, after):
                    await call.write(m)
                await call.done_writing()
                kinds = []
                try:
                    async for r in call:
                        kinds.append(r.WhichOneof("kind"))
                except grpc.aio.AioRpcError:
                    pass  # the stream ends with the status checked below
                return kinds, await call.code(), await call.details()

        kinds, code, details = asyncio.run(main())
        assert not srv.server.sessions.sessions
    assert kinds == ["opened", "closed"]
    assert code == grpc.StatusCode.FAILED_PRECONDITION and words in details


def test_session_step_after_close_raises_failed_precondition(running_server):
    """The domain rule behind the wire behaviour: a closed session refuses steps."""
    from cellserve.server.errors import FailedPrecondition

    with running_server() as srv:

        async def main() -> None:
            s = srv.server.sessions.open("tiny")
            srv.server.sessions.close(s, "client")
            with pytest.raises(FailedPrecondition, match="closed"):
                s.submit(np.array([1], dtype=np.int64))

        srv.call(main())


def test_errors_never_reach_a_concurrent_healthy_session(running_server, tiny_oracle):
    tokens = np.random.default_rng(5).integers(0, 256, size=60, dtype=np.int64)
    with running_server(max_chunk_steps=8) as srv:

        async def healthy() -> np.ndarray:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                call = pb_grpc.CellServeStub(ch).Stream()
                await call.write(OPEN)
                await call.read()
                ys = []
                for i in range(60):
                    await call.write(step_msg(i, tokens[i : i + 1]))
                    ys.append(to_numpy((await call.read()).output.output))
                    await asyncio.sleep(0)
                await call.done_writing()
                return np.concatenate(ys)

        async def hostile() -> list[Any]:
            codes = []
            for kind in BAD_KINDS:
                async with grpc.aio.insecure_channel(srv.address) as ch:
                    call = pb_grpc.CellServeStub(ch).Stream()
                    await call.write(OPEN)
                    await call.read()
                    await call.write(pb.StreamRequest(step=pb.Step(seq=1, input=bad_tensor(kind))))
                    codes.append((await call.read()).error.code)
                    await call.write(OPEN)  # protocol error: ends this stream only
                    await read_rest(call)
                    codes.append(await call.code())
            return codes

        async def main() -> tuple[np.ndarray, list[Any]]:
            return await asyncio.gather(healthy(), hostile())

        got, codes = asyncio.run(main())
    np.testing.assert_allclose(got, tiny_oracle.sequence(tokens), atol=TOL, rtol=0)
    assert grpc.StatusCode.UNKNOWN not in codes and grpc.StatusCode.INTERNAL not in codes
    assert codes == [INVALID.value[0], grpc.StatusCode.FAILED_PRECONDITION] * len(BAD_KINDS)
