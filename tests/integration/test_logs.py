"""Log lines keep every field: key=value text (default) and JSON, both parsed back here; and what an
operator reads from a real `cellserve serve`: the startup line and the drain lines."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from cellserve.server.cli import build_parser
from cellserve.server.cli import main as cli_main
from cellserve.server.logs import (
    JsonFormatter,
    KeyValueFormatter,
    bind_log_fields,
    configure_logging,
    reset_log_fields,
    session_log_fields,
)
from cellserve.server.security import is_loopback
from cellserve.server.serve import settings_from_args
from cellserve.server.settings import Settings
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto

LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    """A logfmt line back into its fields (quoted values are JSON strings)."""
    pairs = {k: json.loads(v) if v.startswith('"') else v for k, v in LOGFMT_PAIR.findall(line)}
    assert " ".join(f"{k}={v}" for k, v in LOGFMT_PAIR.findall(line)) == line, "nothing outside key=value pairs"
    return pairs


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("cellserve.test")
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError as e:
            exc_info = (type(e), e, e.__traceback__)
    return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra)


FIELDS = {
    "port": 50051,
    "models": {"pychar": "8a60c07a"},
    "reason": 'cert "a.pem" = unreadable',
    "batch_sizes": [1, 64],
    "tls": False,
    "level": "shadowed",
}


def test_key_value_line_parses_back_with_every_extra_field():
    line = KeyValueFormatter().format(_record("reloaded %s", "tokens", **FIELDS))
    assert "\n" not in line
    fields = parse_logfmt(line)
    assert fields["level"] == "WARNING" and fields["logger"] == "cellserve.test"
    assert fields["msg"] == "reloaded tokens"
    assert fields["port"] == "50051" and fields["models"] == "pychar:8a60c07a" and fields["batch_sizes"] == "1,64"
    assert fields["reason"] == 'cert "a.pem" = unreadable' and fields["tls"] == "false"
    assert fields["extra_level"] == "shadowed"  # an extra never overwrites a base key
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["time"])


def test_json_line_parses_back_with_every_extra_field_and_the_traceback():
    line = JsonFormatter().format(_record("reloaded %s", "tokens", exc=True, **FIELDS, path=Path("/x")))
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["msg"] == "reloaded tokens" and fields["level"] == "WARNING"
    assert fields["port"] == 50051 and fields["models"] == {"pychar": "8a60c07a"} and fields["batch_sizes"] == [1, 64]
    assert fields["tls"] is False and fields["extra_level"] == "shadowed" and fields["path"] == "/x"
    assert "RuntimeError: boom" in fields["exc_info"]


def test_lines_inside_a_session_carry_its_bound_ids_in_text_and_json_and_a_calls_extra_wins():
    ids = {"session_id": "ab12", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}
    token = bind_log_fields(ids)
    try:
        text = parse_logfmt(KeyValueFormatter().format(_record("step refused", code="INVALID_ARGUMENT")))
        line = json.loads(JsonFormatter().format(_record("step refused", session_id="explicit")))
        with session_log_fields(None):  # work for many sessions at once names none of them
            outside = parse_logfmt(KeyValueFormatter().format(_record("batch failed")))
    finally:
        reset_log_fields(token)
    assert {k: text[k] for k in ids} == ids and text["code"] == "INVALID_ARGUMENT"
    assert line["session_id"] == "explicit" and line["trace_id"] == ids["trace_id"]
    assert "session_id" not in outside
    assert "session_id" not in parse_logfmt(KeyValueFormatter().format(_record("serving")))


def test_text_traceback_follows_its_line():
    first, *rest = KeyValueFormatter().format(_record("failed", exc=True)).splitlines()
    assert parse_logfmt(first)["msg"] == "failed"
    assert rest[-1] == "RuntimeError: boom"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configure_logging_routes_the_root_logger(fmt):
    stream = io.StringIO()
    try:
        configure_logging("warning", fmt, stream)
        logging.getLogger("cellserve.x").info("dropped: below the level")
        logging.getLogger("cellserve.x").warning("kept", extra={"n": 3})
    finally:
        configure_logging("INFO")
    (line,) = stream.getvalue().splitlines()
    fields = json.loads(line) if fmt == "json" else parse_logfmt(line)
    assert fields["msg"] == "kept" and str(fields["n"]) == "3"


def test_log_settings_are_settings_fields_with_env_and_validation(monkeypatch):
    monkeypatch.setenv("CELLSERVE_LOG_LEVEL", "debug")
    monkeypatch.setenv("CELLSERVE_LOG_FORMAT", "json")
    s = Settings()
    assert (s.log_level, s.log_format) == ("DEBUG", "json")
    with pytest.raises(ValidationError, match="log level 'loud' is not one of DEBUG, INFO"):
        Settings(log_level="loud")
    with pytest.raises(ValidationError):
        Settings(log_format="xml")


def test_log_flags_work_before_and_after_serve():
    parser = build_parser()
    after = settings_from_args(parser.parse_args(["serve", "--log-level", "debug", "--log-format", "json"]))
    assert (after.log_level, after.log_format) == ("DEBUG", "json")
    before = settings_from_args(parser.parse_args(["--log-level", "error", "serve"]))
    assert before.log_level == "ERROR"
    both = settings_from_args(parser.parse_args(["--log-level", "error", "serve", "--log-level", "warning"]))
    assert both.log_level == "WARNING", "the flag after serve wins"
    other = parser.parse_args(["--log-level", "debug", "--log-format", "json", "models"])
    assert (other.log_level, other.log_format) == ("debug", "json")


@pytest.mark.parametrize(
    ("argv", "env", "said"),
    [
        (["serve", "--log-level", "verbose"], {}, "cellserve serve: error: --log-level: log level 'verbose'"),
        (["--log-level", "verbose", "models"], {}, "cellserve models: error: --log-level: log level 'verbose'"),
        (["models"], {"CELLSERVE_LOG_LEVEL": "loud"}, "cellserve models: error: CELLSERVE_LOG_LEVEL: log level 'loud'"),
        (["models"], {"CELLSERVE_LOG_FORMAT": "xml"}, "cellserve models: error: CELLSERVE_LOG_FORMAT: 'xml'"),
    ],
)
def test_a_bad_log_setting_is_one_line_naming_where_it_came_from(argv, env, said, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1, err  # no usage text: the one line says it all


@pytest.mark.parametrize(("host", "local"), [("127.0.0.1", True), ("[::1]", True), ("localhost", True),
                                             ("[::]", False), ("0.0.0.0", False), ("10.0.0.7", False)])
def test_is_loopback(host, local):
    assert is_loopback(host) is local


def _hold_a_session_and_sigterm(server) -> list[str]:
    """Open one session, step it, SIGTERM the server while it is open; the server's stderr lines."""
    done = threading.Event()

    def requests():
        yield pb.StreamRequest(open=pb.Open(model="tiny"))
        yield pb.StreamRequest(step=pb.Step(seq=1, input=to_proto(np.array([1, 2], dtype=np.int64))))
        done.wait(60)  # no half-close: the session is still open when the drain starts

    try:
        with grpc.insecure_channel(server.address) as channel:
            call = pb_grpc.CellServeStub(channel).Stream(requests())
            assert next(call).WhichOneof("kind") == "opened"
            assert next(call).WhichOneof("kind") == "output"
            server.proc.send_signal(signal.SIGTERM)
            kinds = [r.WhichOneof("kind") for r in call]
            assert "draining" in kinds and kinds[-1] == "closed"
        _, err = server.proc.communicate(timeout=60)
        assert server.proc.returncode == 0, err
    finally:
        done.set()
        server.proc.kill()
    return err.splitlines()


def test_serve_json_logs_say_where_it_listens_what_it_serves_and_what_it_drained(spawn_server, tiny_model):
    server = spawn_server("--log-format", "json", "--grace-s", "0.5")
    lines = [json.loads(line) for line in _hold_a_session_and_sigterm(server)]  # every line is JSON
    by_msg = {line["msg"]: line for line in lines}
    serving = by_msg["serving"]
    assert serving["port"] == server.port and serving["address"] == f"127.0.0.1:{server.port}"
    assert serving["metrics_port"] == server.metrics_port
    assert serving["metrics"] == f"127.0.0.1:{server.metrics_port}/metrics"
    assert serving["models"] == {"tiny": tiny_model.manifest.sha256}
    assert (serving["device"], serving["tls"], serving["auth"], serving["oip"]) == ("cpu", "off", "off", True)
    draining = by_msg["draining"]
    assert (draining["sessions"], draining["sent_resume_token"], draining["grace_s"]) == (1, 1, 0.5)
    drained = by_msg["drained"]
    assert drained["sessions"] == 1 and drained["left_within_grace"] + drained["closed_at_grace_end"] == 1
    assert by_msg["signal received; draining"]["signal"] == "SIGTERM" and "stopped" in by_msg
    assert "the gRPC port is open to the network without TLS or bearer tokens" not in by_msg  # loopback


def test_serve_logs_key_value_text_by_default_with_level_from_the_environment(spawn_server, tiny_model):
    env = {**os.environ, "CELLSERVE_LOG_LEVEL": "info"}
    server = spawn_server("--auth-tokens", "s3cret", "--grace-s", "0.5", env=env)
    server.proc.send_signal(signal.SIGTERM)
    _, err = server.proc.communicate(timeout=60)
    lines = [parse_logfmt(line) for line in err.splitlines()]
    (serving,) = [line for line in lines if line["msg"] == "serving"]
    assert serving["port"] == str(server.port) and serving["auth"] == "bearer" and serving["tls"] == "off"
    assert serving["models"] == f"tiny:{tiny_model.manifest.sha256}"
    assert "s3cret" not in err
    quiet = spawn_server("--log-level", "warning", "--grace-s", "0")
    quiet.proc.send_signal(signal.SIGTERM)
    _, err = quiet.proc.communicate(timeout=60)
    assert all(parse_logfmt(line)["level"] == "WARNING" for line in err.splitlines()), err


def test_workers_log_json_lines_with_their_index_and_the_supervisor_serves_metrics_only(spawn_server):
    server = spawn_server("--workers", "2", "--log-format", "json", "--grace-s", "0")
    base = f"http://127.0.0.1:{server.metrics_port}"
    with urllib.request.urlopen(base + "/metrics", timeout=10) as reply:  # the supervisor's summed /metrics
        assert b"cellserve_build_info" in reply.read()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/healthz", timeout=10)
    assert e.value.code == 404
    server.proc.send_signal(signal.SIGTERM)
    _, err = server.proc.communicate(timeout=120)
    assert server.proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines()]  # every line, supervisor's and workers', is JSON
    serving = [line for line in lines if line["msg"] == "serving"]
    assert sorted(line["worker"] for line in serving) == [0, 1]
    assert all(line["port"] == server.port and line["models"] for line in serving)
    assert sorted(line["worker"] for line in lines if line["msg"] == "drained") == [0, 1]
