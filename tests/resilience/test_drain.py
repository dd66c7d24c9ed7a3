"""Zero-loss drain: 200 live sessions on replica A, SIGTERM A, every session continues on B."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from typing import Any

import grpc
import numpy as np

from cellserve.server.tensors import to_numpy
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto

KEYS = '{"active": "k1", "keys": {"k1": "' + "5a" * 32 + '"}}'
SESSIONS, LENGTH = 200, 24


async def step(call: Any, seq: int, x: np.ndarray) -> np.ndarray:
    await call.write(pb.StreamRequest(step=pb.Step(seq=seq, input=to_proto(x))))
    resp = await call.read()
    assert resp.WhichOneof("kind") == "output" and resp.output.seq == seq, resp
    return to_numpy(resp.output.output)


async def session(
    i: int, tokens: np.ndarray, a: str, b: str, all_ready: asyncio.Event, counter: list[int]
) -> tuple[np.ndarray, int]:
    """Steps part of ``tokens`` on A, waits for `draining`, resumes on B and finishes. Returns (y, resumed at)."""
    split = 4 + i % 16
    outputs = []
    async with grpc.aio.insecure_channel(a) as ch_a:
        call = pb_grpc.CellServeStub(ch_a).Stream()
        await call.write(pb.StreamRequest(open=pb.Open(model="tiny")))
        assert (await call.read()).WhichOneof("kind") == "opened"
        for t in range(split):
            outputs.append(await step(call, t, tokens[t : t + 1]))
        counter[0] += 1
        if counter[0] == SESSIONS:
            all_ready.set()
        draining = await call.read()  # nothing in flight: the next message is the server's drain notice
        assert draining.WhichOneof("kind") == "draining", draining
        token = draining.draining.resume_token
        if i % 2:  # half of the clients take a fresh snapshot instead (the same state: nothing ran since)
            await call.write(pb.StreamRequest(snapshot=pb.Snapshot()))
            snap = await call.read()
            assert snap.snapshot.steps == split
            token = snap.snapshot.token
        await call.write(pb.StreamRequest(close=pb.Close()))
        assert (await call.read()).closed.steps == split
        await call.done_writing()
    async with grpc.aio.insecure_channel(b) as ch_b:
        call = pb_grpc.CellServeStub(ch_b).Stream()
        await call.write(pb.StreamRequest(open=pb.Open(model="tiny", resume_token=token)))
        opened = await call.read()
        assert opened.opened.steps == split
        outputs.append(await step(call, split, tokens[split:]))  # the rest as one chunk
        await call.done_writing()
    return np.concatenate(outputs), split


def test_200_sessions_drain_from_a_and_continue_on_b_with_zero_loss(spawn_server, tiny_oracle):
    a = spawn_server("--token-keys", KEYS, "--grace-s", "60", "--capacity", "256")
    b = spawn_server("--token-keys", KEYS, "--capacity", "256")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, size=LENGTH, dtype=np.int64) for _ in range(SESSIONS)]

    async def main() -> list[tuple[np.ndarray, int]]:
        all_ready, counter = asyncio.Event(), [0]
        tasks = [
            asyncio.ensure_future(session(i, s, a.address, b.address, all_ready, counter))
            for i, s in enumerate(seqs)
        ]
        await asyncio.wait_for(all_ready.wait(), 120)
        a.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    results = asyncio.run(main())
    assert a.proc.wait(timeout=60) == 0  # A left early: every session had moved on before the grace ended
    assert len(results) == SESSIONS
    for tokens, (got, _) in zip(seqs, results, strict=True):
        np.testing.assert_allclose(got, tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)
    assert b.proc.poll() is None


def test_opens_during_drain_are_unavailable_and_health_is_not_serving(spawn_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    a = spawn_server("--grace-s", "30")

    async def main() -> tuple[int, grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(a.address) as ch:
            held = pb_grpc.CellServeStub(ch).Stream()  # keeps A draining (not stopped) during the checks
            await held.write(pb.StreamRequest(open=pb.Open(model="tiny")))
            await held.read()
            a.proc.send_signal(signal.SIGTERM)
            assert (await held.read()).WhichOneof("kind") == "draining"
            status = (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())).status
            late = pb_grpc.CellServeStub(ch).Stream()
            await late.write(pb.StreamRequest(open=pb.Open(model="tiny")))
            try:
                while await late.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError:
                pass
            await held.write(pb.StreamRequest(close=pb.Close()))
            await held.read()
            await held.done_writing()
            return status, await late.code(), await late.details()

    status, code, details = asyncio.run(main())
    assert status == 2  # NOT_SERVING
    assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
    assert a.proc.wait(timeout=60) == 0


def test_resume_with_a_token_from_another_key_is_unauthenticated(spawn_server):
    a = spawn_server("--token-keys", KEYS)
    other = spawn_server()  # a random per-process key

    async def main() -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(a.address) as ch:
            call = pb_grpc.CellServeStub(ch).Stream()
            await call.write(pb.StreamRequest(open=pb.Open(model="tiny")))
            await call.read()
            await call.write(pb.StreamRequest(snapshot=pb.Snapshot()))
            token = (await call.read()).snapshot.token
            await call.done_writing()
        async with grpc.aio.insecure_channel(other.address) as ch:
            call = pb_grpc.CellServeStub(ch).Stream()
            await call.write(pb.StreamRequest(open=pb.Open(model="tiny", resume_token=token)))
            try:
                await call.read()
            except grpc.aio.AioRpcError:
                pass
            return await call.code(), await call.details()

    code, details = asyncio.run(main())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # The key is named by a digest an operator can compare, never by the token's own bytes (its key id).
    assert f"key id sha256 {hashlib.sha256(b'k1').hexdigest()[:12]}" in details and "k1" not in details, details
