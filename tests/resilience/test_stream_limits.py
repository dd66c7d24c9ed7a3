"""Clients that hold streams without using them: never opening, not reading, too many sequences, frozen.

Each must cost a bounded, short-lived share of the server (a ``max_streams`` slot, answers held in
memory, state slots), never lock other clients out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import grpc
import numpy as np
from stream_helpers import oip_sequence_request, open_msg, read_rest, step_msg

from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import grpc_service_pb2_grpc as oip_grpc
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc


def test_a_stream_that_never_opens_ends_deadline_exceeded_and_frees_its_stream_slot(running_server):
    with running_server(open_timeout_s=0.5, max_streams=1) as srv:

        async def main() -> tuple[Any, str, str]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                silent = pb_grpc.CellServeStub(ch).Stream()  # never writes
                code, details = await silent.code(), await silent.details()
                # its slot is free again: the one stream allowed opens
                call = pb_grpc.CellServeStub(ch).Stream()
                await call.write(open_msg())
                opened = await call.read()
                call.cancel()
                return code, details, opened.WhichOneof("kind")

        code, details, kind = asyncio.run(asyncio.wait_for(main(), 20))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "open_timeout_s" in details and "0.5 s" in details
    assert kind == "opened"


def test_an_oip_stream_that_never_sends_ends_deadline_exceeded(running_server):
    with running_server(open_timeout_s=0.5) as srv:

        async def main() -> tuple[Any, str]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                silent = oip_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()
                return await silent.code(), await silent.details()

        code, details = asyncio.run(asyncio.wait_for(main(), 20))
        assert srv.server.streams.active == 0
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "open_timeout_s" in details


def test_an_oip_stream_idle_with_no_sequence_ends_and_frees_its_slot(running_server, wait_until):
    with running_server(idle_timeout_s=1, max_idle_timeout_s=1) as srv:

        async def main() -> tuple[Any, str, list]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                call = oip_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()
                await call.write(oip_sequence_request(1, 2, start=True, end=True))  # one whole sequence
                answers = [await call.read()]
                answers += await read_rest(call)  # then silence: the stream ends by itself
                return await call.code(), await call.details(), answers

        code, details, answers = asyncio.run(asyncio.wait_for(main(), 20))
        assert srv.server.streams.active == 0
    assert not answers[0].error_message
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "idle_timeout_s" in details


def test_one_oip_stream_cannot_start_more_sequences_than_max_sessions_per_stream(running_server):
    with running_server(max_sessions_per_stream=2) as srv:

        async def main() -> list[oip.ModelStreamInferResponse]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                call = oip_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()
                answers = []
                for req in (
                    oip_sequence_request(1, 1, start=True),
                    oip_sequence_request(2, 1, start=True),
                    oip_sequence_request(3, 1, start=True),  # one too many
                    oip_sequence_request(1, 1, end=True),
                    oip_sequence_request(3, 1, start=True),  # fits again
                ):
                    await call.write(req)
                    answers.append(await call.read())
                call.cancel()
                return answers

        answers = asyncio.run(asyncio.wait_for(main(), 20))
    errors = [a.error_message for a in answers]
    assert errors[0] == errors[1] == errors[3] == errors[4] == ""
    assert "max_sessions_per_stream" in errors[2] and "2 sequences running" in errors[2]


def test_an_oip_client_that_stops_reading_is_not_read_past_max_stream_buffer_bytes(running_server, wait_until):
    # The tiny model answers a T=16 step with 16 x 256 float32 (+ its state, if asked): ~17 KB charged each.
    sent = 400
    with running_server(max_stream_buffer_bytes=64 * 1024) as srv:

        def paused() -> float:
            return srv.registry.get_sample_value("cellserve_streams_paused") or 0.0

        async def main() -> float:
            # bdp_probe off: the client's HTTP/2 window stays at 64 KB, so its own buffers take few answers
            async with grpc.aio.insecure_channel(srv.address, options=[("grpc.http2.bdp_probe", 0)]) as ch:
                call = oip_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()
                for i in range(sent):
                    await call.write(oip_sequence_request(i + 1, 16, start=True, end=True))
                await wait_until.aio(lambda: paused() == 1, 20, what="the server to stop reading the stream")
                steps = srv.registry.get_sample_value("cellserve_steps_total", {"model": "tiny"}) or 0.0
                call.cancel()
                return steps

        steps = asyncio.run(asyncio.wait_for(main(), 40))
        wait_until(lambda: paused() == 0 and srv.server.streams.active == 0, what="the paused stream to end")
    # Read (and run) only what the client's window and the 64 KB of answers owed hold: a few, not 400.
    assert steps <= 40 * 16, f"{steps / 16:.0f} of {sent} requests were run for a client that reads nothing"


def test_a_native_stream_whose_session_expired_while_its_client_stopped_reading_ends(running_server, wait_until):
    with running_server(idle_timeout_s=1, max_idle_timeout_s=1) as srv:

        async def main() -> None:
            async with grpc.aio.insecure_channel(srv.address, options=[("grpc.http2.bdp_probe", 0)]) as ch:
                call = pb_grpc.CellServeStub(ch).Stream()
                await call.write(open_msg())
                assert (await call.read()).WhichOneof("kind") == "opened"
                x = np.full(2048, 7, np.int64)  # 2 MB answers: the server's write blocks at once
                for seq in range(1, 9):
                    await call.write(step_msg(seq, x))
                # never read again: the session idles out, and the stream it cannot tell ends too
                await wait_until.aio(lambda: srv.server.streams.active == 0, 30, what="the stream to end")
                assert not srv.server.sessions.sessions
                call.cancel()

        asyncio.run(asyncio.wait_for(main(), 40))
        closed = srv.registry.get_sample_value("cellserve_sessions_closed_total", {"model": "tiny", "reason": "idle"})
    assert closed == 1


def test_a_frozen_client_loses_its_session_within_keepalive_time_plus_timeout(running_server, wait_until, tmp_path):
    # The client opens a session, then is SIGSTOPped: TCP stays open, nothing answers the server's pings.
    script = tmp_path / "frozen_client.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, threading, grpc
            from cellserve.v1 import cellserve_pb2 as pb, cellserve_pb2_grpc as pb_grpc
            hold = threading.Event()
            def requests():
                yield pb.StreamRequest(open=pb.Open(model="tiny"))
                hold.wait()
            channel = grpc.insecure_channel(sys.argv[1])
            call = pb_grpc.CellServeStub(channel).Stream(requests())
            print(next(call).WhichOneof("kind"), flush=True)
            hold.wait()
            """
        )
    )
    with running_server(keepalive_time_s=1, keepalive_timeout_s=1) as srv:
        client = subprocess.Popen(
            [sys.executable, str(script), srv.address], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
        )
        try:
            assert client.stdout is not None and client.stdout.readline().strip() == "opened"
            assert len(srv.server.sessions.sessions) == 1
            client.send_signal(signal.SIGSTOP)
            # keepalive_time_s + keepalive_timeout_s = 2 s, plus a margin for a loaded 2-core box; gRPC's own
            # ping timeout (60 s) would keep it far longer
            wait_until(lambda: not srv.server.sessions.sessions, 10, what="the frozen client's session to end")
            wait_until(lambda: srv.server.streams.active == 0, 5, what="its stream slot to be freed")
        finally:
            client.send_signal(signal.SIGCONT)
            client.kill()
            client.wait(10)


def test_the_sdk_channel_gives_up_on_a_frozen_server_within_keepalive_time_plus_timeout(spawn_server):
    from cellserve.client.channel import ChannelConfig

    server = spawn_server("--min-client-ping-interval-s", "0.5")
    config = ChannelConfig(keepalive_time_ms=1000, keepalive_timeout_ms=1000)

    async def main() -> Any:
        async with config.aio_channel(server.address) as ch:
            call = pb_grpc.CellServeStub(ch).Stream()
            await call.write(open_msg())
            assert (await call.read()).WhichOneof("kind") == "opened"
            server.proc.send_signal(signal.SIGSTOP)  # TCP stays open; nothing answers the client's pings
            try:
                # 1 s + 1 s, plus a margin for a loaded box; gRPC's own ping timeout (60 s) would hang far longer
                await asyncio.wait_for(call.read(), 10)
            except grpc.aio.AioRpcError as e:
                return e.code()
            return "answered"

    try:
        code = asyncio.run(main())
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_a_failed_sequence_end_still_ends_its_sequence_and_frees_its_slot(running_server):
    with running_server() as srv:

        async def main() -> tuple[list[str], int]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                call = oip_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()
                bad_end = oip_sequence_request(5, 1, end=True)
                bad_end.inputs[0].datatype = "FP64"  # the tiny model takes INT64 tokens
                errors = []
                for req in (oip_sequence_request(5, 1, start=True), bad_end):
                    await call.write(req)
                    errors.append((await call.read()).error_message)
                held = len(srv.server.sessions.sessions)
                await call.write(oip_sequence_request(5, 1, start=True, end=True))  # the id is free to start again
                errors.append((await call.read()).error_message)
                call.cancel()
                return errors, held

        errors, held = asyncio.run(asyncio.wait_for(main(), 20))
    assert errors[0] == "" and errors[1] and errors[2] == ""
    assert held == 0
