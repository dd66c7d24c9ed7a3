"""An engine call that fails costs only the step that made it fail, through a real server and the native Stream:
that stream gets an in-stream error and steps on from its unchanged state; every other session goes on."""

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

MARKER = 255  # a valid token; the engine below runs out of memory on any call holding a chunk of it
CLIENTS = 5  # client 0 sends the bad chunk in round 1; 1..4 are innocent
ROUNDS = 4
T = 4


def fail_on_marker(engine: Any) -> None:
    """Make this server's real engine fail as onnxruntime does when memory runs out, for calls with MARKER."""
    run_slots = engine.run_slots

    def failing(slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        if (x == MARKER).all(axis=1).any():
            raise RuntimeError(
                "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running LSTM "
                "node. Failed to allocate memory for requested buffer of size 68719476736"
            )
        return run_slots(slots, x)

    engine.run_slots = failing


async def client(address: str, index: int, chunks: np.ndarray, opened_all: asyncio.Barrier) -> list[pb.StreamResponse]:
    """Open, wait until every client has opened (so each round is one batch of all of them), step every round."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.CellServeStub(channel).Stream()
        await call.write(open_msg())
        assert (await call.read()).WhichOneof("kind") == "opened"
        await opened_all.wait()
        answers = []
        for seq in range(ROUNDS):
            x = np.full(T, MARKER, np.int64) if (index, seq) == (0, 1) else chunks[seq]
            await call.write(step_msg(seq, x))
            answers.append(await call.read())
        await call.done_writing()
        rest = await read_rest(call)
        assert await call.code() == grpc.StatusCode.OK, await call.details()
        assert [r.WhichOneof("kind") for r in rest] == ["closed"]
        return answers


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_an_engine_failure_answers_its_step_in_stream_and_every_session_goes_on(running_server, tiny_oracle, mode):
    rng = np.random.default_rng(30)
    chunks = rng.integers(0, MARKER, size=(CLIENTS, ROUNDS, T), dtype=np.int64)  # no MARKER chunk among them
    # Batches close when every live session is in (max_wait_us is only a backstop), so round 1 is one engine call.
    with running_server(max_wait_us=5_000_000, engine_mode=mode) as srv:
        fail_on_marker(srv.server.models.get("tiny").engine)

        async def main() -> list[list[pb.StreamResponse]]:
            opened_all = asyncio.Barrier(CLIENTS)
            runs = (client(srv.address, i, chunks[i], opened_all) for i in range(CLIENTS))
            return await asyncio.wait_for(asyncio.gather(*runs), 60)

        answers = asyncio.run(main())
        value = srv.registry.get_sample_value
        errors = value("cellserve_errors_total", {"code": "RESOURCE_EXHAUSTED"})
        failures = value("cellserve_engine_failures_total", {"model": "tiny", "code": "RESOURCE_EXHAUSTED"})

    bad = answers[0][1]
    assert bad.WhichOneof("kind") == "error", bad
    assert bad.error.seq == 1 and bad.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "out of memory" in bad.error.message and f"T={T}" in bad.error.message
    assert "68719476736" not in bad.error.message  # no engine internals
    for i in range(CLIENTS):
        ok = [a for a in answers[i] if a is not bad]
        assert [a.WhichOneof("kind") for a in ok] == ["output"] * len(ok), ok
        assert [a.output.seq for a in ok] == [s for s in range(ROUNDS) if (i, s) != (0, 1)]
        sent = [chunks[i, s] for s in range(ROUNDS) if (i, s) != (0, 1)]  # the failed step left no trace
        got = np.concatenate([to_numpy(a.output.output) for a in ok])
        np.testing.assert_allclose(got, tiny_oracle.sequence(np.concatenate(sent)), atol=TOL, rtol=0)
    assert errors == 1 and failures == 1
