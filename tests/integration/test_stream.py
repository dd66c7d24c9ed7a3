"""The native Stream API against a real server on port 0, checked against the numpy oracle."""

from __future__ import annotations

import asyncio
import json
import random
import time

import grpc
import numpy as np
import pytest
from stream_helpers import TOL, open_msg, run_session, step_msg
from token_helpers import v1_token

from cellserve.server.resume_token import TokenCodec, TokenKeys
from cellserve.server.tensors import to_numpy
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto


def random_chunks(total: int, rng: random.Random, hi: int = 16) -> list[int]:
    chunks = []
    while total > 0:
        n = min(total, rng.randint(1, hi))
        chunks.append(n)
        total -= n
    return chunks


def test_served_equals_oracle_for_100_interleaved_chunked_sessions(running_server, tiny_oracle):
    rng = random.Random(7)
    np_rng = np.random.default_rng(7)
    seqs = [np_rng.integers(0, 256, size=200, dtype=np.int64) for _ in range(100)]
    chunkings = [random_chunks(200, rng) for _ in seqs]

    with running_server() as srv:

        async def main() -> list[np.ndarray]:
            pairs = enumerate(zip(seqs, chunkings, strict=True))
            return await asyncio.gather(*(run_session(srv.address, s, ch, random.Random(i)) for i, (s, ch) in pairs))

        results = asyncio.run(main())
        batch = srv.registry.get_sample_value("cellserve_batch_size_count", {"model": "tiny"})
    for tokens, got in zip(seqs, results, strict=True):
        np.testing.assert_allclose(got, tiny_oracle.sequence(tokens), atol=TOL, rtol=0)
    assert batch is not None and batch > 0


def test_batching_is_real_with_64_single_step_streams(running_server, tiny_oracle):
    """Every session opens before any of them steps, so each batch is closed by the "every live session is
    in" rule, not by a max-wait window a busy shared box can miss; max_wait is long enough that no window
    closes a batch early (1 s), and a scheduler that stopped batching would still show a mean of 1."""
    np_rng = np.random.default_rng(3)
    seqs = [np_rng.integers(0, 256, size=40, dtype=np.int64) for _ in range(64)]
    with running_server(max_wait_us=1_000_000) as srv:

        async def main() -> list[np.ndarray]:
            opened_all = asyncio.Barrier(len(seqs))
            return await asyncio.gather(
                *(run_session(srv.address, s, [1] * len(s), random.Random(i), opened_all) for i, s in enumerate(seqs))
            )

        results = asyncio.run(main())
        total = srv.registry.get_sample_value("cellserve_batch_size_sum", {"model": "tiny"})
        calls = srv.registry.get_sample_value("cellserve_batch_size_count", {"model": "tiny"})
    assert total == 64 * 40
    assert total / calls > 8, f"mean batch size {total / calls:.1f} shows no real cross-session batching"
    for tokens, got in zip(seqs, results, strict=True):
        np.testing.assert_allclose(got, tiny_oracle.sequence(tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize("engine_mode", ["inline", "thread"])
def test_both_engine_modes_match_the_oracle(running_server, tiny_oracle, engine_mode):
    rng = random.Random(1)
    tokens = np.random.default_rng(1).integers(0, 256, size=60, dtype=np.int64)
    with running_server(engine_mode=engine_mode) as srv:
        got = asyncio.run(run_session(srv.address, tokens, random_chunks(60, rng), rng))
    np.testing.assert_allclose(got, tiny_oracle.sequence(tokens), atol=TOL, rtol=0)


def test_a_checkpoint_step_carries_a_token_that_resumes_exactly_after_it(running_server, tiny_oracle):
    tokens = np.random.default_rng(5).integers(0, 256, size=30, dtype=np.int64)

    async def main(address: str) -> tuple[np.ndarray, np.ndarray]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.CellServeStub(channel)
            first = stub.Stream()
            await first.write(open_msg())
            await first.read()
            await first.write(step_msg(0, tokens[:10]))
            plain = await first.read()
            assert plain.output.resume_token == b""  # no token unless asked for
            await first.write(pb.StreamRequest(step=pb.Step(seq=1, input=to_proto(tokens[10:20]), checkpoint=True)))
            marked = await first.read()
            token = marked.output.resume_token
            assert token, "a checkpoint step must carry a resume token"
            first.cancel()  # the server "vanishes" for this client; the token is all it kept
            second = stub.Stream()
            await second.write(open_msg(resume_token=token))
            opened = await second.read()
            assert opened.opened.steps == 20
            await second.write(step_msg(0, tokens[20:]))
            rest = await second.read()
            await second.done_writing()
            return to_numpy(marked.output.output), to_numpy(rest.output.output)

    with running_server() as srv:
        middle, rest = asyncio.run(main(srv.address))
    want = tiny_oracle.sequence(tokens)
    np.testing.assert_allclose(middle, want[10:20], atol=TOL, rtol=0)
    np.testing.assert_allclose(rest, want[20:], atol=TOL, rtol=0)


def test_a_version_1_token_from_an_older_server_still_resumes_and_its_snapshot_is_version_2(
    running_server, tiny_model, tiny_oracle
):
    """A token an older server issued (version 1: h and c by position) continues the session exactly; a snapshot
    of the resumed session is a version-2 token carrying both states by name."""
    tokens = np.random.default_rng(11).integers(0, 256, size=30, dtype=np.int64)
    _, h, c = tiny_oracle.run(tokens[None, :20])  # the state after 20 steps, [L, 1, H]
    key = b"v" * 32
    now_ms = int(time.time() * 1000)
    token = v1_token("old", key, model="tiny", sha256=tiny_model.manifest.sha256, steps=20,
                     h=h[:, 0].astype(np.float32), c=c[:, 0].astype(np.float32), issued_ms=now_ms,
                     expires_ms=now_ms + 600_000)  # fmt: skip
    keys_json = json.dumps({"active": "old", "keys": {"old": key.hex()}})

    async def main(address: str) -> tuple[np.ndarray, bytes]:
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.CellServeStub(channel).Stream()
            await call.write(open_msg(resume_token=token))
            opened = await call.read()
            assert opened.WhichOneof("kind") == "opened", opened
            assert opened.opened.steps == 20
            await call.write(step_msg(0, tokens[20:]))
            rest = await call.read()
            assert rest.WhichOneof("kind") == "output", rest
            await call.write(pb.StreamRequest(snapshot=pb.Snapshot()))
            snap = await call.read()
            await call.write(pb.StreamRequest(close=pb.Close()))
            await call.done_writing()
            return to_numpy(rest.output.output), snap.snapshot.token

    with running_server(token_keys=keys_json) as srv:
        rest, again = asyncio.run(main(srv.address))
    np.testing.assert_allclose(rest, tiny_oracle.sequence(tokens)[20:], atol=TOL, rtol=0)
    state, _ = TokenCodec(TokenKeys.from_json(keys_json), ttl_s=60).decode(
        again, model="tiny", model_sha256=tiny_model.manifest.sha256
    )
    assert again[4] == 2 and state.steps == 30 and state.names == ("h0", "c0")
    _, hn, cn = tiny_oracle.run(tokens[None])
    np.testing.assert_allclose(state.states[0], hn[:, 0], atol=TOL, rtol=0)
    np.testing.assert_allclose(state.states[1], cn[:, 0], atol=TOL, rtol=0)
