"""The SDK's connect deadline (``ChannelConfig.connect_timeout_s``): a target that accepts TCP but never
speaks HTTP/2 (a hung or stopped process) is left after the deadline, for a new session and for a resume
alike, through the sync and the asyncio SDK (the ``sdk`` fixture)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from replica_helpers import token_keys

from cellserve.client import ChannelConfig

KEYS = token_keys("5d")
GRPC_CONNECT_TIMEOUT_S = 20.0  # gRPC's own minimum connect timeout, which held opens before


@pytest.fixture
def silent_target() -> Iterator[str]:
    """A listening socket on 127.0.0.1 that never accepts: the kernel completes the TCP handshake, no
    process ever answers (what a client sees of a stopped server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_the_default_connect_deadline_is_a_few_seconds() -> None:
    config = ChannelConfig()
    assert 1 <= config.connect_timeout_s <= 5
    assert dict(config.options())["grpc.min_reconnect_backoff_ms"] == config.connect_timeout_s * 1000
    with pytest.raises(ValueError, match="connect_timeout_s"):
        ChannelConfig(connect_timeout_s=0)


def test_a_new_session_moves_on_from_a_target_that_never_answers(sdk, running_server, silent_target) -> None:
    with running_server() as srv, sdk.client([silent_target, srv.address]) as client:  # the default deadline
        start = time.monotonic()
        with client.session("tiny") as s:
            elapsed = time.monotonic() - start
            assert s.target == srv.address
            assert s.step([1, 2]).shape == (2, 256)
    assert elapsed < ChannelConfig().connect_timeout_s + 5 < GRPC_CONNECT_TIMEOUT_S, elapsed


def test_a_resume_moves_on_from_a_target_that_never_answers(sdk, running_server, silent_target, tiny_oracle) -> None:
    tokens = np.random.default_rng(3).integers(0, 256, size=12, dtype=np.int64)
    config = ChannelConfig(connect_timeout_s=1)
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        sdk.client([a.address, silent_target, b.address], config, resume_timeout_s=30) as client,
        client.session("tiny", checkpoint_every=1) as s,
    ):
        ys = [s.step(tokens[:6])]
        a.call(a.server.stop(0))  # A vanishes: the resume tries the silent target next, then B
        start = time.monotonic()
        ys.append(s.step(tokens[6:]))
        elapsed = time.monotonic() - start
        assert s.target == b.address
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)
    assert elapsed < config.connect_timeout_s + 5 < GRPC_CONNECT_TIMEOUT_S, elapsed
