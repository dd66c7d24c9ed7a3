"""The Multiplex API (many sessions per stream and per message) against a real server on port 0: outputs equal
the numpy oracle, also interleaved with single-session streams and OIP sequences; entries fail alone; answers
keep request order; a drain hands every session's token out in one message; idle expiry and admission are per
session."""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
from multiplex_helpers import Gateway, output
from replica_helpers import drain, token_keys
from stream_helpers import TOL, oip_sequence_request, run_session

from cellserve.oip import grpc_service_pb2_grpc as oip_grpc
from cellserve.v1 import cellserve_pb2 as pb

RNG = np.random.default_rng(11)
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def token_block(n: int, t: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, t), dtype=np.int64)


def test_gateway_sessions_equal_the_oracle_interleaved_with_streams_and_oip(running_server, tiny_oracle):
    n, t, messages = 24, 3, 6
    xs = [token_block(n, t) for _ in range(messages)]
    single = RNG.integers(0, 256, size=20, dtype=np.int64)

    async def gateway(address: str) -> np.ndarray:
        async with grpc.aio.insecure_channel(address) as channel:
            gw = Gateway(channel)
            handles = await gw.open(n)
            ys = []
            for x in xs:
                answer = await gw.step(handles, x)
                assert not answer.errors and answer.WhichOneof("kind") == "output"
                ys.append(output(answer))
            await gw.call.done_writing()
            return np.concatenate(ys, axis=1)  # [N, messages*T, V]

    async def oip_sequence(address: str) -> list[np.ndarray]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)

            async def requests():
                for i in range(5):
                    yield oip_sequence_request(41, 2, start=i == 0, end=i == 4)

            ys = []
            async for response in stub.ModelStreamInfer(requests()):
                assert not response.error_message, response.error_message
                r = response.infer_response
                ys.append(np.frombuffer(r.raw_output_contents[0], "<f4").reshape(r.outputs[0].shape)[0])
            return ys

    with running_server(max_wait_us=2000) as srv:

        async def main():
            return await asyncio.gather(
                gateway(srv.address),
                run_session(srv.address, single, [4] * 5, random.Random(1)),
                oip_sequence(srv.address),
            )

        y_gateway, y_single, y_oip = asyncio.run(main())
    for i in range(n):
        tokens = np.concatenate([x[i] for x in xs])
        np.testing.assert_allclose(y_gateway[i], tiny_oracle.sequence(tokens), atol=TOL, rtol=0)
    np.testing.assert_allclose(y_single, tiny_oracle.sequence(single), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.concatenate(y_oip), tiny_oracle.sequence([7] * 10), atol=TOL, rtol=0)


def test_a_bad_entry_fails_alone_and_its_session_goes_on_unchanged(running_server, tiny_oracle):
    with running_server() as srv:

        async def main() -> None:
            async with grpc.aio.insecure_channel(srv.address) as channel:
                gw = Gateway(channel)
                a, b, c = await gw.open(3)
                first = token_block(3, 2)
                bad = first.copy()
                bad[1, 0] = 300  # out of the vocabulary
                answer = await gw.step([a, b, 99, c], np.concatenate([bad[:2], first[2:], first[2:]]))
                errors = {e.index: e for e in answer.errors}
                assert set(errors) == {1, 2}
                assert (
                    errors[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "token id 300" in errors[1].message
                )
                assert (
                    errors[2].code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "handle 99" in errors[2].message
                )
                y = output(answer)
                np.testing.assert_allclose(y[0], tiny_oracle.sequence(first[0]), atol=TOL, rtol=0)
                np.testing.assert_allclose(y[3], tiny_oracle.sequence(first[2]), atol=TOL, rtol=0)
                assert not y[1].any() and not y[2].any()
                again = await gw.step([b], first[1:2])  # b's state is as if the bad row was never sent
                np.testing.assert_allclose(output(again)[0], tiny_oracle.sequence(first[1]), atol=TOL, rtol=0)
                # the whole message is wrong: one error, nothing applied, the stream goes on
                whole = await gw.step([a, b], token_block(3, 2))
                assert whole.WhichOneof("kind") == "error" and "for 2 handles" in whole.error.message
                dtype = await gw.step([a], first[:1].astype(np.int32))
                assert dtype.WhichOneof("kind") == "error" and "dtype int32" in dtype.error.message
                twice = await gw.step([c, c], token_block(2, 1))
                assert [e.index for e in twice.errors] == [1] and "appears twice" in twice.errors[0].message

        asyncio.run(main())


def test_answers_keep_request_order_with_several_requests_in_flight(running_server, tiny_oracle):
    n, messages = 8, 6
    xs = [token_block(n, 1 + i % 3) for i in range(messages)]
    with running_server() as srv:

        async def main() -> list[pb.MultiplexResponse]:
            async with grpc.aio.insecure_channel(srv.address) as channel:
                gw = Gateway(channel)
                handles = await gw.open(n)
                base = gw.seq
                for i, x in enumerate(xs):  # all written before any answer is read
                    await gw.call.write(
                        pb.MultiplexRequest(seq=base + 1 + i, step=pb.StepSessions(handles=handles, input=to_tensor(x)))
                    )
                return [await gw.answer(base + 1 + i) for i in range(messages)]

        answers = asyncio.run(main())
    ys = np.concatenate([output(a) for a in answers], axis=1)
    for i in range(n):
        np.testing.assert_allclose(ys[i], tiny_oracle.sequence(np.concatenate([x[i] for x in xs])), atol=TOL, rtol=0)


def to_tensor(x: np.ndarray) -> pb.Tensor:
    from cellserve.wire import to_proto

    return to_proto(x)


def test_a_drain_sends_every_session_token_in_one_message_and_they_resume_elsewhere(running_server, tiny_oracle):
    n = 10
    first, rest = token_block(n, 3), token_block(n, 2)
    keys = token_keys("5a")
    with running_server(token_keys=keys) as a, running_server(token_keys=keys) as b:

        async def main() -> np.ndarray:
            async with grpc.aio.insecure_channel(a.address) as ca, grpc.aio.insecure_channel(b.address) as cb:
                gw = Gateway(ca)
                handles = await gw.open(n)
                await gw.step(handles, first)
                drained = drain(a, 30)
                notice = await asyncio.wait_for(gw.event(), 30)
                assert notice.WhichOneof("kind") == "draining"
                assert sorted(notice.draining.handles) == sorted(handles) and notice.draining.deadline_unix_ms > 0
                tokens = dict(zip(notice.draining.handles, notice.draining.resume_tokens, strict=True))
                moved = Gateway(cb)
                answer = await moved.request(
                    open=pb.OpenSessions(
                        sessions=[pb.SessionOpen(model="tiny", key=str(h), resume_token=tokens[h]) for h in handles]
                    )
                )
                assert not answer.errors and all(s.steps == 3 for s in answer.opened.sessions)
                y = output(await moved.step([s.handle for s in answer.opened.sessions], rest))
                closed = await gw.request(close=pb.CloseSessions(handles=handles))  # leave a: its drain ends
                assert sorted(closed.closed.handles) == sorted(handles)
                await gw.call.done_writing()
                await asyncio.wrap_future(drained)
                return y

        y = asyncio.run(main())
    for i in range(n):
        want = tiny_oracle.sequence(np.concatenate([first[i], rest[i]]))[3:]
        np.testing.assert_allclose(y[i], want, atol=TOL, rtol=0)


def test_idle_expiry_is_per_session_and_announced(running_server):
    with running_server() as srv:

        async def main() -> None:
            async with grpc.aio.insecure_channel(srv.address) as channel:
                gw = Gateway(channel)
                quick = (await gw.open(1, idle_timeout_s=1))[0]
                slow = await gw.open(2, idle_timeout_s=600)
                event = await asyncio.wait_for(gw.event(), 30)
                assert event.WhichOneof("kind") == "closed" and list(event.closed.handles) == [quick]
                assert event.closed.reason == pb.CLOSE_REASON_IDLE and "idle" in event.closed.message
                answer = await gw.step([quick, *slow], token_block(3, 1))
                assert [e.index for e in answer.errors] == [0] and "handle" in answer.errors[0].message

        asyncio.run(main())


def test_opens_beyond_capacity_fail_alone_naming_the_limit(running_server):
    with running_server(capacity=4, max_sessions_per_stream=3) as srv:

        async def main() -> None:
            async with grpc.aio.insecure_channel(srv.address) as channel:
                gw = Gateway(channel)
                answer = await gw.request(
                    open=pb.OpenSessions(sessions=[pb.SessionOpen(model="tiny", key=str(i)) for i in range(5)])
                )
                errors = {e.index: e for e in answer.errors}
                assert set(errors) == {3, 4}
                assert all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for e in errors.values())
                assert "max_sessions_per_stream" in errors[3].message
                assert [s.handle > 0 for s in answer.opened.sessions] == [True, True, True, False, False]
                other = Gateway(channel)
                second = await other.request(
                    open=pb.OpenSessions(sessions=[pb.SessionOpen(model="tiny", key=str(i)) for i in range(2)])
                )
                assert [e.index for e in second.errors] == [1] and "capacity" in second.errors[0].message
                # capacity is shared with single-session streams: a Stream open is refused too
                from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

                call = pb_grpc.CellServeStub(channel).Stream()
                await call.write(pb.StreamRequest(open=pb.Open(model="tiny")))
                try:
                    await call.read()
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in e.details()
                else:
                    raise AssertionError("a Stream opened past capacity")

        asyncio.run(main())


def test_session_steps_and_messages_are_counted_apart(running_server):
    with running_server() as srv:

        async def main() -> None:
            async with grpc.aio.insecure_channel(srv.address) as channel:
                gw = Gateway(channel)
                handles = await gw.open(16)
                for _ in range(3):
                    await gw.step(handles, token_block(16, 2))

        asyncio.run(main())
        value = srv.registry.get_sample_value
        assert value("cellserve_session_steps_total", {"model": "tiny"}) == 48
        assert value("cellserve_steps_total", {"model": "tiny"}) == 96
        assert value("cellserve_step_messages_total", {"model": "tiny"}) == 3


def test_bearer_tokens_guard_multiplex_as_every_rpc(running_server, tiny_oracle):
    with running_server(auth_tokens="s3cret") as srv:

        async def main() -> None:
            async with grpc.aio.insecure_channel(srv.address) as channel:
                # read before writing: the server ends an unauthenticated call at once, and a write racing that end
                # fails on the client's side with gRPC's own INTERNAL instead of the call's status
                refused = Gateway(channel)
                try:
                    await refused.call.read()
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                else:
                    raise AssertionError("Multiplex served a caller without a bearer token")
                gw = Gateway(channel, metadata=(("authorization", "Bearer s3cret"),))
                handles = await gw.open(2)
                x = token_block(2, 3)
                y = output(await gw.step(handles, x))
                for i in range(2):
                    np.testing.assert_allclose(y[i], tiny_oracle.sequence(x[i]), atol=TOL, rtol=0)

        asyncio.run(main())


def test_an_answer_over_max_message_bytes_is_refused_with_its_numbers(running_server):
    with running_server(max_message_bytes=64 * 1024) as srv:

        async def main() -> None:
            async with grpc.aio.insecure_channel(srv.address) as channel:
                gw = Gateway(channel)
                handles = await gw.open(40)
                answer = await gw.step(handles, token_block(40, 2))  # 40 x 2 x 256 x 4 bytes = 80 KiB
                assert answer.WhichOneof("kind") == "error"
                assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                assert (
                    "max_message_bytes (65536)" in answer.error.message and "40 sessions x T=2" in answer.error.message
                )
                assert not (await gw.step(handles[:10], token_block(10, 2))).errors  # the stream goes on

        asyncio.run(main())
