"""The SDK against a real server on port 0: sessions (sync, async, chunked, pipelined), generate,
models, health, and every server error as its typed exception with the server's message."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
import pytest

from cellserve.client import (
    AsyncClient,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    InvalidInputError,
    NotFoundError,
    ResourceExhaustedError,
    SessionClosedError,
    StepRejected,
    UnavailableError,
)
from cellserve.v1 import cellserve_pb2 as pb

TOL = 1e-5


def oracle_y(oracle: Any, tokens: np.ndarray) -> np.ndarray:
    h, c = oracle.init_state(1)
    y, _, _ = oracle.run(tokens[None, :], h, c)
    return y[0]


def closed_count(srv: Any, reason: str) -> float:
    return srv.registry.get_sample_value("cellserve_sessions_closed_total", {"model": "tiny", "reason": reason}) or 0.0


def active(srv: Any) -> float:
    return srv.registry.get_sample_value("cellserve_sessions_active", {"model": "tiny"})


def test_single_and_chunked_steps_match_the_oracle(sdk, running_server, tiny_oracle):
    tokens = np.random.default_rng(1).integers(0, 256, size=12, dtype=np.int64)
    want = oracle_y(tiny_oracle, tokens)
    with running_server() as srv, sdk.client(srv.address) as client:
        with client.session("tiny") as s:
            singles = np.concatenate([s.step(int(t)) for t in tokens[:6]])
            chunk = s.step(tokens[6:])  # T = 6 in one message
            assert s.steps == 12
            assert s.session_id
        assert chunk.shape == (6, 256) and chunk.dtype == np.float32
        np.testing.assert_allclose(np.concatenate([singles, chunk]), want, atol=TOL)
        with client.session() as s:  # no name: the server's default model
            np.testing.assert_allclose(s.step(tokens[:3]), want[:3], atol=TOL)
            assert s.model == "tiny"
        assert active(srv) == 0


def test_async_session_step_and_pipelined_outputs_match_the_oracle(running_server, tiny_oracle):
    tokens = np.random.default_rng(2).integers(0, 256, size=20, dtype=np.int64)
    want = oracle_y(tiny_oracle, tokens)

    async def main(address: str) -> tuple[np.ndarray, list[Any]]:
        async with AsyncClient(address) as client:
            async with await client.session("tiny") as s:
                first = await s.step(tokens[:4])

                async def feed() -> None:
                    for i in range(4, 20, 2):
                        await s.send(tokens[i : i + 2])
                    await s.end()

                feeder = asyncio.create_task(feed())
                outs = [out async for out in s]
                await feeder
            return first, outs

    with running_server() as srv:
        first, outs = asyncio.run(main(srv.address))
    assert [o.seq for o in outs] == list(range(1, 9))
    np.testing.assert_allclose(np.concatenate([first] + [o.y for o in outs]), want, atol=TOL)


def test_rejected_step_raises_step_rejected_and_the_session_goes_on(sdk, running_server, tiny_oracle):
    tokens = np.arange(5, dtype=np.int64)
    with (
        running_server(max_chunk_steps=4) as srv,
        sdk.client(srv.address) as client,
        client.session("tiny") as s,
    ):
        y0 = s.step(tokens[:2])
        with pytest.raises(StepRejected) as info:
            s.step(np.arange(5, dtype=np.int64))  # T=5 > max_chunk_steps: the server refuses this step
        assert type(info.value) is InvalidInputError  # the same type as the client's own refusals
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "T=5" in info.value.details and info.value.seq == 1
        y1 = s.step(tokens[2:])  # state unchanged by the rejected step
        np.testing.assert_allclose(np.concatenate([y0, y1]), oracle_y(tiny_oracle, tokens), atol=TOL)


def test_async_iteration_survives_a_rejected_step(running_server):
    async def main(address: str) -> tuple[list[int], list[int]]:
        async with AsyncClient(address) as client, await client.session("tiny") as s:
            await s.send([1])
            await s.send(np.arange(5))  # rejected in-stream
            await s.send([2])
            await s.end()
            seqs, rejected = [], []
            it = aiter(s)
            while True:
                try:
                    seqs.append((await anext(it)).seq)
                except StepRejected as e:
                    rejected.append(e.seq)
                except StopAsyncIteration:
                    return seqs, rejected

    with running_server(max_chunk_steps=4) as srv:
        assert asyncio.run(main(srv.address)) == ([0, 2], [1])


def test_client_side_checks_refuse_bad_inputs_before_sending(sdk, running_server):
    with running_server() as srv, sdk.client(srv.address) as client, client.session("tiny") as s:
        with pytest.raises(InvalidInputError, match="out of range") as refused:
            s.step([300])
        assert isinstance(refused.value, StepRejected) and refused.value.seq is None  # caught like the server's
        with pytest.raises(InvalidInputError, match="integer token ids"):
            s.step(np.array([0.5]))
        with pytest.raises(StepRejected, match=r"input is empty \(shape \[0\]\); model 'tiny' expects integer"):
            s.step([])
        assert s.step([1]).shape == (1, 256)
        assert s.steps == 1
    assert srv.registry.get_sample_value("cellserve_errors_total", {"code": "INVALID_ARGUMENT"}) is None


def test_server_errors_surface_as_typed_exceptions_with_the_server_message(running_server):
    with running_server(capacity=1) as srv, Client(srv.address) as client:
        with pytest.raises(NotFoundError, match="'nope' is not loaded") as nf:
            client.session("nope")
        assert nf.value.code is grpc.StatusCode.NOT_FOUND
        with pytest.raises(NotFoundError):
            client.model_info("nope")
        with client.session("tiny"):
            with pytest.raises(ResourceExhaustedError) as full:
                client.session("tiny")
            assert full.value.details  # the server says which limit
        with pytest.raises(InvalidArgumentError, match="max_tokens is 0"):
            list(client.generate("ab", 0))
        with pytest.raises(InvalidArgumentError, match="prompt is empty"):
            list(client.generate("", 3))


def test_unreachable_server_is_unavailable():
    with Client("127.0.0.1:1", timeout_s=5) as client, pytest.raises(UnavailableError):
        client.list_models()


def test_idle_expired_session_raises_session_closed_with_deadline_exceeded(sdk, running_server):
    with (
        running_server(idle_timeout_s=100) as srv,
        sdk.client(srv.address) as client,
        client.session("tiny") as s,
    ):
        s.step([1])

        async def expire() -> int:
            return srv.server.sessions.expire_idle(time.monotonic() + 1000)

        assert srv.call(expire()) == 1
        with pytest.raises(SessionClosedError) as info:
            s.step([2])
        assert info.value.reason == "idle" and info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle" in info.value.details
        with pytest.raises(SessionClosedError):
            s.step([3])


def test_session_context_manager_closes_the_session_on_exception(running_server):
    with running_server() as srv, Client(srv.address) as client:
        before = closed_count(srv, "client")
        with pytest.raises(KeyError), client.session("tiny") as s:
            s.step([1])
            assert active(srv) == 1
            raise KeyError("user code failed")
        assert active(srv) == 0
        assert closed_count(srv, "client") == before + 1

        async def failing(address: str) -> None:
            async with AsyncClient(address) as ac, await ac.session("tiny") as s:
                await s.step([1])
                raise KeyError("async user code failed")

        with pytest.raises(KeyError):
            asyncio.run(failing(srv.address))
        assert active(srv) == 0
        assert closed_count(srv, "client") == before + 2


def test_async_step_while_pipelined_steps_are_pending_is_refused(running_server):
    async def main(address: str) -> None:
        async with AsyncClient(address) as client, await client.session("tiny") as s:
            await s.send([1])
            with pytest.raises(FailedPreconditionError, match="1 pipelined steps are unanswered"):
                await s.step([2])
            assert (await anext(aiter(s))).seq == 0
            assert (await s.step([2])).shape == (1, 256)

    with running_server() as srv:
        asyncio.run(main(srv.address))


def test_generate_streams_tokens_and_sync_equals_async_with_a_seed(running_server):
    async def agen(address: str) -> list[Any]:
        async with AsyncClient(address) as client:
            return [g async for g in client.generate("def ", 12, temperature=1.0, seed=7)]

    with running_server() as srv, Client(srv.address) as client:
        chunks = list(client.generate("def ", 12, temperature=1.0, seed=7))
        again = list(client.generate("def ", 12, temperature=1.0, seed=7, model="tiny"))
        achunks = asyncio.run(agen(srv.address))
    assert len(chunks) == 12  # one message per token: streamed as produced
    ids = [i for g in chunks for i in g.token_ids]
    assert b"".join(g.text for g in chunks) == bytes(ids)
    assert chunks == again == achunks


def test_list_models_model_info_and_health(running_server, tiny_model):
    with running_server() as srv, Client(srv.address) as client:
        (m,) = client.list_models()
        assert (m.name, m.input_kind, m.layers, m.hidden) == ("tiny", "tokens", 2, 32)
        assert m.sha256 == tiny_model.manifest.sha256
        assert {t.role for t in m.inputs} == {"input", "state_h", "state_c"}
        assert client.model_info("tiny") == m
        assert client.health() == "SERVING"
        assert client.health("tiny") == "SERVING"
        unknown = r"^NOT_FOUND: unknown health service 'nope'; a server's are '' \(itself\) and one per loaded model$"
        with pytest.raises(NotFoundError, match=unknown):
            client.health("nope")

        async def ahealth() -> tuple[str, list[Any]]:
            async with AsyncClient(srv.address) as ac:
                with pytest.raises(NotFoundError, match=unknown):
                    await ac.health("nope")
                return await ac.health(), await ac.list_models()

        status, models = asyncio.run(ahealth())
        assert status == "SERVING" and models == [m]


def test_a_stream_ended_by_a_protocol_error_raises_once_and_leaves_cleanly(running_server, wait_until):
    """Open twice on one stream (forced through the internals) ends the stream with FAILED_PRECONDITION:
    the next call raises it with the server's message, and leaving the block raises nothing more."""
    with running_server() as srv, Client(srv.address) as client:
        with client.session("tiny") as s:
            s._requests.put(pb.StreamRequest(open=pb.Open(model="tiny")))
            with pytest.raises(FailedPreconditionError, match="already has session"):
                s.step([1])
        # the client may see the status before the server's `finally` has run: its clean-up, bounded
        wait_until(lambda: active(srv) == 0, timeout_s=10)

        async def main() -> None:
            async with AsyncClient(srv.address) as ac, await ac.session("tiny") as a:
                await a._call.write(pb.StreamRequest(open=pb.Open(model="tiny")))
                await a._call.code()  # let the status arrive: a write racing it hits grpc/grpc#36066
                with pytest.raises(FailedPreconditionError, match="already has session"):
                    await a.step([1])

        asyncio.run(main())
        wait_until(lambda: active(srv) == 0, timeout_s=10)


def test_interleaved_sessions_with_random_chunkings_each_match_their_oracle(running_server, tiny_oracle):
    """Two sessions stepped alternately, each with its own random chunking: no state leaks between them."""
    rng = np.random.default_rng(5)
    with running_server() as srv, Client(srv.address) as client:
        for _ in range(6):
            seqs = [rng.integers(0, 256, size=int(rng.integers(1, 24)), dtype=np.int64) for _ in range(2)]
            cuts = [np.sort(rng.choice(np.arange(1, len(q)), size=min(3, len(q) - 1), replace=False)) for q in seqs]
            chunks = [np.split(q, c) for q, c in zip(seqs, cuts, strict=True)]
            with client.session("tiny") as a, client.session("tiny") as b:
                outs: list[list[np.ndarray]] = [[], []]
                for i in range(max(len(c) for c in chunks)):
                    for k, s in enumerate((a, b)):
                        if i < len(chunks[k]):
                            outs[k].append(s.step(chunks[k][i]))
            for k in range(2):
                np.testing.assert_allclose(np.concatenate(outs[k]), oracle_y(tiny_oracle, seqs[k]), atol=TOL)
