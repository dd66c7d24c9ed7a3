"""What the SDK logs when a session cannot go on: one record through ``logging`` naming the session and
the reason (as fields, and in the text that Python's last-resort handler prints when the application set
up no logging); an ordinary idle expiry at INFO, a session lost for good at WARNING."""

from __future__ import annotations

import logging

import pytest
from replica_helpers import token_keys

from cellserve.client import SessionClosedError, UnavailableError

LOGGER = "cellserve.client.core"


def _lost_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and "cannot go on" in r.msg]


def test_an_idle_expiry_is_logged_at_info_with_the_session_and_reason(sdk, running_server, caplog, wait_until):
    caplog.set_level(logging.DEBUG, logger="cellserve.client")
    with running_server() as srv, sdk.client(srv.address) as client, client.session("tiny", idle_timeout_s=1) as s:
        s.step([1])
        session_id = s.session_id
        idle = {"model": "tiny", "reason": "idle"}  # the server's own idle timeout runs out
        wait_until(lambda: srv.registry.get_sample_value("cellserve_sessions_closed_total", idle), 10,
                   what="the server to expire the idle session")  # fmt: skip
        with pytest.raises(SessionClosedError) as closed:
            s.step([2])
        assert closed.value.reason == "idle"
        with pytest.raises(SessionClosedError):
            s.step([3])  # raised again, logged once
    (record,) = _lost_records(caplog)
    assert record.levelno == logging.INFO  # the server did what it was asked: not a warning
    assert record.session == session_id and record.reason == "idle"  # type: ignore[attr-defined]
    assert session_id in record.getMessage() and "idle" in record.getMessage()
    assert not [r for r in caplog.records if r.name.startswith("cellserve.client") and r.levelno >= logging.WARNING]


def test_a_session_lost_for_good_is_a_warning_with_the_session_and_reason(sdk, running_server, caplog):
    caplog.set_level(logging.DEBUG, logger="cellserve.client")
    keys = token_keys("ab", key_id="k")
    with (
        running_server(token_keys=keys) as srv,
        sdk.client(srv.address, resume_timeout_s=0.5) as client,
        client.session("tiny") as s,
    ):
        s.step([1, 2])
        session_id = s.session_id
        srv.call(srv.server.stop(0))  # gone without a drain, and no other server
        with pytest.raises(UnavailableError):
            s.step([3])
    (record,) = _lost_records(caplog)
    assert record.levelno == logging.WARNING
    assert record.session == session_id and record.reason == "unavailable"  # type: ignore[attr-defined]
    assert "no server took the session" in record.error  # type: ignore[attr-defined]
    assert session_id in record.getMessage() and "unavailable" in record.getMessage()
