"""Where traces go and which are kept: the ``otlp_*``/``trace_*`` settings, then the standard ``OTEL_*`` variables.

Kept apart from :mod:`cellserve.server.tracing` so that resolving it needs no OpenTelemetry: a server whose
tracing is off neither imports the SDK nor needs it installed, and a bad value fails at start-up in one line
naming the setting or variable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args
from urllib.parse import urlsplit

from cellserve.server.settings import OtlpProtocol, Settings, TraceSampler

if TYPE_CHECKING:
    from prometheus_client import Counter

    from cellserve.server.tracing import Tracing

log = logging.getLogger(__name__)

SAMPLERS: tuple[str, ...] = get_args(TraceSampler)
PROTOCOLS: tuple[str, ...] = get_args(OtlpProtocol)


@dataclass(frozen=True)
class TraceConfig:
    """Tracing as configured: settings first, then the ``OTEL_*`` variables, then the OpenTelemetry defaults."""

    endpoint: str
    protocol: str
    sampler: str
    ratio: float
    service_name: str
    slow_step_s: float

    @property
    def step_ratio(self) -> float:
        """The share of steps traced by sampling alone (failed and slow steps come on top)."""
        if self.sampler.endswith("always_on"):
            return 1.0
        if self.sampler.endswith("always_off"):
            return 0.0
        return self.ratio

    @classmethod
    def resolve(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> TraceConfig | None:
        """None when tracing is off; ValueError, in one line naming the setting or variable, for a bad value."""
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        endpoint, where = settings.otlp_endpoint, "otlp_endpoint / CELLSERVE_OTLP_ENDPOINT"
        protocol, protocol_from = settings.otlp_protocol, "otlp_protocol"
        if protocol is None:
            protocol_from, protocol = _env(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
        protocol = protocol or "grpc"
        if protocol not in PROTOCOLS:
            raise ValueError(f"{protocol_from}: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if endpoint is None:
            exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
            if exporter in ("none", ""):
                exporter_on = False
            elif exporter == "otlp":
                exporter_on = True
            else:
                raise ValueError(f"OTEL_TRACES_EXPORTER: {exporter!r} is not supported; use otlp or none")
            if (specific := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) is not None:
                endpoint, where = specific, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
            elif (generic := env.get("OTEL_EXPORTER_OTLP_ENDPOINT")) is not None:
                endpoint, where = _signal_path(generic, protocol), "OTEL_EXPORTER_OTLP_ENDPOINT"
            elif exporter_on:  # the specification's defaults
                endpoint = "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318/v1/traces"
                where = "OTEL_TRACES_EXPORTER"
            if exporter == "none" or endpoint is None:
                return None
        else:
            endpoint = _signal_path(endpoint, protocol)
        _check_endpoint(endpoint.strip(), where)
        sampler = (
            settings.trace_sampler or env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
        )
        if sampler not in SAMPLERS:
            raise ValueError(f"OTEL_TRACES_SAMPLER: {sampler!r} is not one of {', '.join(SAMPLERS)}")
        ratio = settings.trace_sampler_ratio
        if ratio is None:
            ratio = _ratio(env.get("OTEL_TRACES_SAMPLER_ARG", "").strip() if sampler.endswith("traceidratio") else "")
        service = settings.service_name or env.get("OTEL_SERVICE_NAME", "").strip() or "cellserve"
        return cls(endpoint.strip(), protocol, sampler, ratio, service, settings.trace_slow_step_ms / 1000)


def _env(env: Mapping[str, str], *names: str) -> tuple[str, str | None]:
    """The first of ``names`` set (lower case), and which it was."""
    for name in names:
        value = env.get(name, "").strip().lower()
        if value:
            return name, value
    return names[-1], None


def _ratio(text: str) -> float:
    if not text:
        return 1.0
    try:
        ratio = float(text)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG: {text!r} is not a ratio between 0 and 1")
    return ratio


def _signal_path(endpoint: str, protocol: str) -> str:
    """OTLP/HTTP's base URL gets the traces path (as the specification says for the generic variable)."""
    if protocol == "http/protobuf" and urlsplit(endpoint.strip()).path in ("", "/"):
        return endpoint.strip().rstrip("/") + "/v1/traces"
    return endpoint


def _check_endpoint(endpoint: str, where: str) -> None:
    parts = urlsplit(endpoint)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(
            f"{where}: {endpoint!r} is not a collector URL; give http(s)://HOST:PORT (e.g. http://otel-collector:4317)"
        )


def build_tracing(settings: Settings, dropped: Counter, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """The server's tracing from its settings and the ``OTEL_*`` environment; None when tracing is off (and then
    OpenTelemetry is not imported). ``dropped`` counts the spans the collector never got."""
    config = TraceConfig.resolve(settings, environ)
    if config is None:
        return None
    try:
        from cellserve.server.tracing import Tracing
    except ImportError as e:
        raise ValueError(
            f"tracing is configured (endpoint {config.endpoint}) but OpenTelemetry is not installed ({e}); "
            "install cellserve[otel], or unset otlp_endpoint and the OTEL_* variables"
        ) from None
    tracing = Tracing(config, dropped)
    log.info(
        "tracing on",
        extra={
            "endpoint": config.endpoint,
            "protocol": config.protocol,
            "sampler": config.sampler,
            "step_ratio": config.step_ratio,
            "service_name": config.service_name,
            "slow_step_ms": config.slow_step_s * 1000,
        },
    )
    return tracing
