"""The end of a drain's grace period meets work in flight: every session still gets its answer and token."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from stream_helpers import open_msg, read_rest

from cellserve.server.resume_token import TokenCodec
from cellserve.server.tensors import to_numpy
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto

GRACE_ENDED = "the drain grace period ended; resume with the draining token"


@pytest.mark.parametrize("engine_mode", ["inline", "thread"])
def test_a_checkpoint_step_queued_when_the_grace_ends_gets_its_output_and_the_final_token(
    running_server, tiny_oracle, engine_mode, wait_until
):
    tokens = np.array([72, 105, 33], dtype=np.int64)
    # two sessions open, so a lone step waits in the queue for max_wait_us (batch not full)
    with running_server(max_wait_us=300_000, engine_mode=engine_mode) as srv:

        async def main() -> tuple[list[pb.StreamResponse], grpc.StatusCode]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                stub = pb_grpc.CellServeStub(ch)
                a, b = stub.Stream(), stub.Stream()
                for call in (a, b):
                    await call.write(open_msg())
                    assert (await call.read()).WhichOneof("kind") == "opened"
                step = pb.Step(seq=1, input=to_proto(tokens), checkpoint=True)
                await a.write(pb.StreamRequest(step=step))
                sessions = srv.server.sessions
                await wait_until.aio(lambda: any(s.inflight for s in sessions.sessions.values()), 10, poll_s=0.005)
                srv.loop.call_soon_threadsafe(sessions.close_all, "drain", GRACE_ENDED)  # as a drain at grace end
                got = await read_rest(a)
                b.cancel()
                return got, await a.code()

        got, code = asyncio.run(main())
    assert code == grpc.StatusCode.OK
    assert [r.WhichOneof("kind") for r in got] == ["output", "draining", "closed"]
    want = tiny_oracle.sequence(tokens)
    np.testing.assert_allclose(to_numpy(got[0].output.output), want, atol=1e-5, rtol=0)
    assert got[0].output.resume_token == b""  # the session was closed under it: the final token follows
    state, _ = TokenCodec(srv.server.tokens.keys, 3600).decode(
        got[1].draining.resume_token, model="tiny", model_sha256=srv.server.models.get("tiny").manifest.sha256
    )
    assert state.steps == len(tokens)  # the final token includes the step that was in flight
    assert got[2].closed.reason == pb.CLOSE_REASON_DRAIN


def test_generate_cut_by_the_end_of_a_drain_is_unavailable(running_server):
    with running_server() as srv:

        async def main() -> tuple[int, grpc.StatusCode]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                call = pb_grpc.CellServeStub(ch).Generate(pb.GenerateRequest(prompt="de", max_tokens=4000))
                n = 0
                try:
                    async for _ in call:
                        n += 1
                        if n == 5:
                            sessions = srv.server.sessions
                            srv.loop.call_soon_threadsafe(setattr, sessions, "accepting", False)
                            srv.loop.call_soon_threadsafe(sessions.close_all, "drain", GRACE_ENDED)
                except grpc.aio.AioRpcError:
                    pass
                return n, await call.code()

        n, code = asyncio.run(main())
    assert code == grpc.StatusCode.UNAVAILABLE, code  # as every refusal of a draining server: go elsewhere
    assert 5 <= n < 4000
