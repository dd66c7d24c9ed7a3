"""Sessions free their state on every way out: close, cancel, disconnect, idle; capacity is enforced."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from stream_helpers import open_msg, read_rest, step_msg

from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc


def slots(srv, state: str) -> float | None:
    return srv.registry.get_sample_value("cellserve_state_pool_slots", {"model": "tiny", "state": state})


def test_cancel_and_disconnect_free_the_slot(running_server, wait_until):
    with running_server(capacity=4) as srv:

        async def main() -> None:
            ch = grpc.aio.insecure_channel(srv.address)
            calls = []
            for _ in range(4):
                call = pb_grpc.CellServeStub(ch).Stream()
                await call.write(open_msg())
                await call.read()
                await call.write(step_msg(0, np.array([1, 2], dtype=np.int64)))
                await call.read()
                calls.append(call)
            await wait_until.aio(lambda: slots(srv, "free") == 0, timeout_s=10)
            calls[0].cancel()  # client-side cancel
            calls[1].cancel()
            await wait_until.aio(lambda: slots(srv, "free") == 2, timeout_s=10)
            await ch.close()  # abrupt disconnect of the rest
            await wait_until.aio(lambda: slots(srv, "free") == 4, timeout_s=10)

        asyncio.run(main())
        closed = {
            reason: srv.registry.get_sample_value(
                "cellserve_sessions_closed_total", {"model": "tiny", "reason": reason}
            )
            or 0
            for reason in ("disconnect", "client")
        }
        # grpc sometimes delivers a closing channel's end of requests before the cancellation: "client"
        assert closed["disconnect"] + closed["client"] == 4 and closed["disconnect"] >= 1, closed
        assert srv.registry.get_sample_value("cellserve_sessions_active", {"model": "tiny"}) == 0


def test_capacity_plus_one_open_is_resource_exhausted(running_server):
    with running_server(capacity=3) as srv:

        async def main() -> tuple[grpc.StatusCode, str]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                held = []
                for _ in range(3):
                    call = pb_grpc.CellServeStub(ch).Stream()
                    await call.write(open_msg())
                    assert (await call.read()).WhichOneof("kind") == "opened"
                    held.append(call)
                extra = pb_grpc.CellServeStub(ch).Stream()
                await extra.write(open_msg())
                await read_rest(extra)
                for call in held:
                    await call.done_writing()
                return await extra.code(), await extra.details()

        code, details = asyncio.run(main())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "capacity" in details and "3" in details


def test_idle_session_gets_closed_reason_and_frees_its_slot(running_server):
    with running_server(idle_timeout_s=1, max_idle_timeout_s=5) as srv:

        async def main() -> list[pb.StreamResponse]:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                call = pb_grpc.CellServeStub(ch).Stream()
                await call.write(open_msg())
                opened = await call.read()
                assert opened.opened.idle_timeout_s == 1
                # no message: the server's reaper expires the session after ~1 s and tells us
                responses = await read_rest(call)
                assert await call.code() == grpc.StatusCode.OK
                return responses

        responses = asyncio.run(asyncio.wait_for(main(), 30))
        assert slots(srv, "free") == srv.server.settings.capacity
    assert [r.WhichOneof("kind") for r in responses] == ["closed"]
    assert responses[0].closed.reason == pb.CLOSE_REASON_IDLE
    assert "idle" in responses[0].closed.message


def test_idle_timeout_request_is_capped_at_the_server_maximum(running_server):
    with running_server(idle_timeout_s=10, max_idle_timeout_s=60) as srv:

        async def granted(requested: int) -> int:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                call = pb_grpc.CellServeStub(ch).Stream()
                await call.write(open_msg(idle_timeout_s=requested))
                opened = await call.read()
                await call.done_writing()
                return opened.opened.idle_timeout_s

        assert asyncio.run(granted(0)) == 10
        assert asyncio.run(granted(30)) == 30
        assert asyncio.run(granted(10_000)) == 60

def test_a_cancelled_step_keeps_its_slot_until_the_engine_is_done(running_server, wait_until):
    """Thread mode: a client that vanishes mid-step must not free a slot the engine is still writing."""
    import threading

    with running_server(engine_mode="thread") as srv:
        model = srv.server.models.get("tiny")
        engine_entered, release_engine = threading.Event(), threading.Event()
        real_run = model.engine.run_slots

        def slow_run(slots, x):
            engine_entered.set()
            release_engine.wait(30)
            return real_run(slots, x)

        async def main() -> tuple[int, int, int, int]:
            mgr = srv.server.sessions
            a = mgr.open("tiny")
            model.engine.run_slots = slow_run
            step = a.submit(np.array([1, 2, 3], dtype=np.int64))  # the scheduler's future
            await asyncio.get_running_loop().run_in_executor(None, engine_entered.wait, 30)
            step.cancel()
            mgr.close(a, "disconnect")
            model.engine.run_slots = real_run
            b = mgr.open("tiny")  # must not get a's slot while the engine still owns it
            used_during = model.pool.used
            release_engine.set()
            await wait_until.aio(lambda: not a.inflight, timeout_s=10)
            used_after = model.pool.used
            mgr.close(b, "client")
            return a.slot, b.slot, used_during, used_after

        a_slot, b_slot, used_during, used_after = srv.call(main())
    assert a_slot != b_slot
    assert used_during == 2 and used_after == 1


def test_quiet_stream_with_client_keepalive_pings_is_not_cut(running_server, tiny_oracle):
    """Client pings every 1 s on an idle stream; the server's ping policy (0.5 s) accepts them, so
    the stream is not ended by GOAWAY too_many_pings (grpc's default policy would end it after ~3 s)."""
    options = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    with running_server(min_client_ping_interval_s=0.5) as srv:

        async def main() -> str:
            async with grpc.aio.insecure_channel(srv.address, options=options) as ch:
                call = pb_grpc.CellServeStub(ch).Stream()
                await call.write(open_msg())
                await call.read()
                # The behaviour under test is about time passing on a quiet connection: ~4 pings.
                await asyncio.sleep(4.5)
                await call.write(step_msg(0, np.array([1], dtype=np.int64)))
                kind = (await call.read()).WhichOneof("kind")
                await call.done_writing()
                return kind

        assert asyncio.run(main()) == "output"
