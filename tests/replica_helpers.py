"""Builders for tests that run replicas side by side: token keys, raw opens and snapshots over a
channel, drains of an in-process server, bearer-token and health checks."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

import grpc
import numpy as np
from waiting import WaitUntil

from cellserve.client import TLS, ChannelConfig, Client
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc


def token_keys(byte_hex: str, key_id: str = "k1") -> str:
    """``--token-keys`` JSON with one active 32-byte key made of ``byte_hex`` repeated (e.g. "3c")."""
    return '{"active": "' + key_id + '", "keys": {"' + key_id + '": "' + byte_hex * 32 + '"}}'


def drain(srv: Any, grace_s: float = 30) -> Future:
    """Start draining an in-process server (``running_server``) from the test's thread, and return once the
    drain has begun (new opens refused, every session told, so its notice precedes any later answer);
    ``.result()`` waits for the end."""
    done = asyncio.run_coroutine_threadsafe(srv.server.drain(grace_s), srv.loop)
    WaitUntil()(lambda: not srv.server.sessions.accepting or done.done(), timeout_s=30, what="the drain to begin")
    return done


def open_stream(channel: grpc.Channel, token: bytes = b"", metadata: tuple = ()) -> tuple[grpc.StatusCode, list]:
    """Open a session on model "tiny" (optionally resuming), then half-close; returns (status, responses)."""
    call = pb_grpc.CellServeStub(channel).Stream(
        iter([pb.StreamRequest(open=pb.Open(model="tiny", resume_token=token))]), metadata=metadata, timeout=10
    )
    try:
        return grpc.StatusCode.OK, list(call)
    except grpc.RpcError as e:
        return e.code(), []


def snapshot_after(channel: grpc.Channel, tokens: np.ndarray) -> bytes:
    """A token of a session that ran ``tokens``."""
    x = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[len(tokens)], raw=np.asarray(tokens, "<i8").tobytes())
    reqs = [
        pb.StreamRequest(open=pb.Open(model="tiny")),
        pb.StreamRequest(step=pb.Step(seq=0, input=x)),
        pb.StreamRequest(snapshot=pb.Snapshot()),
    ]
    responses = list(pb_grpc.CellServeStub(channel).Stream(iter(reqs), timeout=10))
    (snap,) = [r.snapshot for r in responses if r.WhichOneof("kind") == "snapshot"]
    assert snap.steps == len(tokens)
    return snap.token


def accepted(stub: pb_grpc.CellServeStub, token: str) -> bool:
    """Whether ``ListModels`` with bearer ``token`` is let through (any refusal must be UNAUTHENTICATED)."""
    try:
        stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        return False
    return True


def health(target: str, tls: TLS | None) -> str:
    """The server's health through the SDK, over TLS when ``tls`` is given."""
    with Client(target, ChannelConfig(tls=tls), timeout_s=5) as client:
        return client.health()
