"""Tracing's configuration: off by default, switched on by OTEL_* or the settings that mirror them, bad values
refused in one line naming where they came from; an unreachable collector costs spans (counted), never serving."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from cellserve.server.metrics import Metrics
from cellserve.server.settings import Settings
from cellserve.server.trace_config import TraceConfig, build_tracing


def resolve(env: dict[str, str] | None = None, **settings: object) -> TraceConfig | None:
    return TraceConfig.resolve(Settings(**settings), env or {})


def test_tracing_is_off_without_settings_or_otel_variables():
    assert resolve() is None
    assert resolve({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) is None
    assert resolve({"OTEL_SDK_DISABLED": "true"}, otlp_endpoint="http://c:4317") is None
    assert build_tracing(Settings(), Metrics(CollectorRegistry()).trace_spans_dropped, {}) is None


def test_otel_variables_switch_tracing_on_with_the_specifications_defaults():
    config = resolve({"OTEL_TRACES_EXPORTER": "otlp"})
    assert config == TraceConfig("http://localhost:4317", "grpc", "parentbased_always_on", 1.0, "cellserve", 0.1)
    config = resolve(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
            "OTEL_SERVICE_NAME": "lstm-eu",
        }
    )
    assert config is not None
    assert config.endpoint == "http://collector:4318/v1/traces"  # the generic variable gets the signal's path
    assert (config.protocol, config.sampler, config.ratio, config.step_ratio, config.service_name) == (
        "http/protobuf",
        "parentbased_traceidratio",
        0.01,
        0.01,
        "lstm-eu",
    )
    specific = resolve(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    )
    assert specific is not None and specific.endpoint == "http://c:4318/custom"  # the traces variable is taken as is


def test_settings_win_over_otel_variables():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317", "OTEL_TRACES_SAMPLER": "always_off"}
    config = resolve(
        env,
        otlp_endpoint="http://flag:4317",
        trace_sampler="traceidratio",
        trace_sampler_ratio=0.5,
        service_name="s",
        trace_slow_step_ms=20,
    )
    assert config == TraceConfig("http://flag:4317", "grpc", "traceidratio", 0.5, "s", 0.02)
    assert resolve(trace_sampler="always_off", otlp_endpoint="http://c:4317").step_ratio == 0.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("env", "settings", "named"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, {}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:99999"}, {}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ({}, {"otlp_endpoint": "ftp://c:4317"}, "otlp_endpoint / CELLSERVE_OTLP_ENDPOINT"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "sometimes"}, {}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, {},
         "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, {}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, {},
         "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ],
)  # fmt: skip
def test_a_bad_value_fails_in_one_line_naming_where_it_came_from(env, settings, named):
    with pytest.raises(ValueError, match="^" + named + ": ") as raised:
        resolve(env, **settings)
    assert "\n" not in str(raised.value)


def test_bad_settings_values_are_refused_by_the_settings_themselves(monkeypatch):
    monkeypatch.setenv("CELLSERVE_TRACE_SAMPLER", "sometimes")
    with pytest.raises(ValidationError, match="trace_sampler"):
        Settings()
    monkeypatch.delenv("CELLSERVE_TRACE_SAMPLER")
    with pytest.raises(ValidationError, match="trace_sampler_ratio"):
        Settings(trace_sampler_ratio=1.5)


def test_serve_with_a_bad_otel_variable_exits_with_one_line_naming_it(tiny_model_dir, tmp_path):
    env = {"PATH": "", "HOME": str(tmp_path), "OTEL_EXPORTER_OTLP_ENDPOINT": "not a url"}
    args = ["--model-dirs", str(tiny_model_dir), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "cellserve.server.cli", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [
        "cellserve serve: error: OTEL_EXPORTER_OTLP_ENDPOINT: 'not a url' is not a collector URL; give "
        "http(s)://HOST:PORT (e.g. http://otel-collector:4317)"
    ]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once it is closed


def test_an_unreachable_collector_costs_counted_spans_and_one_log_line_not_serving_time(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")  # each export gives up after 1 s
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    tracing = build_tracing(
        Settings(otlp_endpoint=f"http://127.0.0.1:{_closed_port()}"), metrics.trace_spans_dropped, {}
    )
    assert tracing is not None
    try:
        with caplog.at_level(logging.INFO):
            for round_ in range(2):
                started = time.perf_counter()
                for i in range(5):
                    tracing.tracer.start_span(f"span {round_}.{i}").end()
                assert time.perf_counter() - started < 0.5  # ending a span only queues it
                tracing.processor.force_flush(10_000)
    finally:
        tracing.shutdown()
    dropped = registry.get_sample_value("cellserve_trace_spans_dropped_total", {"reason": "export_failed"})
    assert dropped == 10
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in said] == [
        "cannot export traces; their spans are dropped until the collector answers"
    ]
