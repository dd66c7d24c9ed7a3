"""The checks on the trace wiring of the deployment (README "Observability: traces"): the compose OpenTelemetry
Collector's config, cellserve's ``OTEL_*`` variables in compose and in the Kubernetes ``tracing`` Component, the
Grafana/Prometheus exemplar links, and the image's OpenTelemetry packages. Each ``*_problems`` function returns
what is wrong, [] when nothing is.

No collector binary runs here (no registry; the core distribution is a Go build), so its config is checked
against closed subset schemas of the components it uses, as deploy_crd_schemas does for custom resources: a
misspelt key or an unknown component type is an error, and the pipelines must name only defined components.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import jsonschema
import yaml
from deploy_checks import REPO

from cellserve.server.settings import Settings
from cellserve.server.trace_config import TraceConfig

COLLECTOR_IMAGE = "otel/opentelemetry-collector:"  # the core distribution: otlp, batch, memory_limiter, debug
COLLECTOR_SERVICE = "otel-collector"
MAX_RATIO = 0.01  # what a deployment samples at most: 1% costs no measurable CPU (README), 100% ~1.7x
EXEMPLAR_TRACE_LABEL = "trace_id"  # the exemplar label cellserve writes (server/tracing.py)
SIGNALS = ("traces", "metrics", "logs")

_DURATION = {"type": "string", "pattern": r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$"}
_ENDPOINT = {"type": "string", "pattern": r"^[^:/\s]+:\d+$"}  # host:port (a receiver binds, an exporter dials)
_TLS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {k: {"type": "string"} for k in ("ca_file", "cert_file", "key_file", "min_version")}
    | {"insecure": {"type": "boolean"}, "insecure_skip_verify": {"type": "boolean"}},
}
_SERVER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["endpoint"],
    "properties": {
        "endpoint": _ENDPOINT,
        "tls": _TLS,
        "include_metadata": {"type": "boolean"},
        "max_recv_msg_size_mib": {"type": "integer", "minimum": 1},
        "traces_url_path": {"type": "string"},
    },
}
# Closed subsets of the core components' configs, by component type: what the shipped config uses, and no typo.
COMPONENT_SCHEMAS: dict[str, dict[str, dict[str, Any]]] = {
    "receivers": {
        "otlp": {
            "type": "object",
            "additionalProperties": False,
            "required": ["protocols"],
            "properties": {
                "protocols": {
                    "type": "object",
                    "additionalProperties": False,
                    "minProperties": 1,
                    "properties": {"grpc": _SERVER, "http": _SERVER},
                }
            },
        },
    },
    "processors": {
        "batch": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "timeout": _DURATION,
                "send_batch_size": {"type": "integer", "minimum": 0},
                "send_batch_max_size": {"type": "integer", "minimum": 0},
            },
        },
        "memory_limiter": {
            "type": "object",
            "additionalProperties": False,
            "required": ["check_interval", "limit_mib", "spike_limit_mib"],
            "properties": {
                "check_interval": _DURATION,
                "limit_mib": {"type": "integer", "minimum": 1},
                "spike_limit_mib": {"type": "integer", "minimum": 1},
            },
        },
    },
    "exporters": {
        "debug": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "verbosity": {"enum": ["basic", "normal", "detailed"]},
                "sampling_initial": {"type": "integer", "minimum": 1},
                "sampling_thereafter": {"type": "integer", "minimum": 1},
            },
        },
        "otlp_grpc": {  # OTLP over gRPC (its old name `otlp` is a deprecated alias)
            "type": "object",
            "additionalProperties": False,
            "required": ["endpoint"],
            "properties": {
                "endpoint": _ENDPOINT,
                "tls": _TLS,
                "compression": {"enum": ["gzip", "zstd", "snappy", "none"]},
                "timeout": _DURATION,
            },
        },
    },
}


def otel_variables() -> set[str]:
    """The ``OTEL_*`` variables a deployment may set: those server/trace_config.py reads, and the SDK's resource
    attributes (read by ``Resource.create`` in server/tracing.py)."""
    from opentelemetry.sdk import environment_variables

    read = set(re.findall(r'"(OTEL_[A-Z_]+)"', (REPO / "server/trace_config.py").read_text()))
    return read | {environment_variables.OTEL_RESOURCE_ATTRIBUTES}


def collector_problems(config: dict[str, Any]) -> list[str]:
    """The collector config: known components with valid settings, pipelines naming only defined components and
    every defined component in a pipeline, an OTLP receiver other containers reach, a batched traces pipeline."""
    problems = [f"collector: unknown top-level key {k!r}" for k in config if k not in (*COMPONENT_SCHEMAS, "service")]
    defined: dict[str, set[str]] = {}
    for kind, schemas in COMPONENT_SCHEMAS.items():
        defined[kind] = set()
        for cid, body in (config.get(kind) or {}).items():
            defined[kind].add(cid)
            schema = schemas.get(cid.split("/", 1)[0])
            if schema is None:
                problems.append(f"collector: {kind} {cid}: unknown type (known: {', '.join(sorted(schemas))})")
                continue
            try:
                jsonschema.validate(body if body is not None else {}, schema)
            except jsonschema.ValidationError as e:
                problems.append(f"collector: {kind} {cid}: {e.message}")
    pipelines = (config.get("service") or {}).get("pipelines") or {}
    used: dict[str, set[str]] = {kind: set() for kind in COMPONENT_SCHEMAS}
    for name, pipeline in pipelines.items():
        if name.split("/", 1)[0] not in SIGNALS:
            problems.append(f"collector: pipeline {name}: not a signal ({', '.join(SIGNALS)})")
        extra = set(pipeline) - set(COMPONENT_SCHEMAS)
        problems += [f"collector: pipeline {name}: unknown key {k!r}" for k in sorted(extra)]
        for kind in COMPONENT_SCHEMAS:
            for cid in pipeline.get(kind) or []:
                used[kind].add(cid)
                if cid not in defined[kind]:
                    problems.append(f"collector: pipeline {name} names {kind[:-1]} {cid}, which is not defined")
        if not pipeline.get("receivers") or not pipeline.get("exporters"):
            problems.append(f"collector: pipeline {name} needs receivers and exporters")
    for kind in COMPONENT_SCHEMAS:
        problems += [f"collector: {kind[:-1]} {cid} is in no pipeline" for cid in sorted(defined[kind] - used[kind])]
    traces = pipelines.get("traces") or {}
    processors = traces.get("processors") or []
    if "otlp" not in (traces.get("receivers") or []):
        problems.append("collector: the traces pipeline must receive OTLP (receiver otlp)")
    if "batch" not in processors or processors[-1] != "batch":
        problems.append("collector: the traces pipeline must batch (processor batch, last)")
    if "memory_limiter" in processors and processors[0] != "memory_limiter":
        problems.append("collector: memory_limiter must come first in the traces pipeline")
    if not any(e.split("/", 1)[0] == "debug" for e in traces.get("exporters") or []):
        problems.append("collector: the traces pipeline must export to debug (the collector's log)")
    for proto, server in otlp_protocols(config).items():
        if server["host"] not in ("0.0.0.0", "::", "[::]"):
            problems.append(f"collector: otlp {proto} listens on {server['host']}; other containers reach 0.0.0.0 only")
    return problems


def otlp_protocols(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The OTLP receiver's protocols: {"grpc"|"http": {"host", "port", "tls"}}."""
    protocols = (((config.get("receivers") or {}).get("otlp") or {}).get("protocols")) or {}
    out = {}
    for proto, server in protocols.items():
        host, _, port = str((server or {}).get("endpoint", "")).rpartition(":")
        out[proto] = {"host": host, "port": int(port) if port.isdigit() else None, "tls": "tls" in (server or {})}
    return out


@contextmanager
def _only_otel(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ without any OTEL_*/CELLSERVE_* variable but ``env``'s (the SDK reads os.environ itself)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CELLSERVE_"))}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        yield


def otel_env_problems(env: Mapping[str, str], where: str) -> tuple[TraceConfig | None, list[str]]:
    """``env``'s OTEL_* variables as the server resolves them: known names, tracing on, valid values, a low
    sampling ratio, resource attributes the SDK parses. Returns the resolved config too."""
    from opentelemetry.sdk.resources import OTELResourceDetector

    known = otel_variables()
    problems = [f"{where}: {k} is not a variable cellserve or the SDK reads" for k in env if k.startswith("OTEL_")
                and k not in known]  # fmt: skip
    otel = {k: v for k, v in env.items() if k.startswith("OTEL_")}
    try:
        with _only_otel(otel):
            config = TraceConfig.resolve(Settings(), otel)
            resource = OTELResourceDetector().detect().attributes
    except ValueError as e:
        return None, [*problems, f"{where}: {e}"]
    if config is None:
        return None, [*problems, f"{where}: the OTEL_* variables leave tracing off"]
    if config.step_ratio > MAX_RATIO:
        problems.append(f"{where}: samples {config.step_ratio:.0%} of steps; at most {MAX_RATIO:.0%} (README: cost)")
    attributes = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    wanted = {pair.split("=", 1)[0].strip() for pair in attributes.split(",") if pair.strip()}
    if wanted - set(resource):
        problems.append(f"{where}: OTEL_RESOURCE_ATTRIBUTES {attributes!r} does not parse (got {dict(resource)})")
    return config, problems


def compose_tracing_problems(compose_file: Path) -> list[str]:
    """Compose: the collector service and its config, cellserve's OTEL_* pointing at its receiver, Jaeger behind it,
    Prometheus keeping exemplars and Grafana linking them to Jaeger."""
    services = yaml.safe_load(compose_file.read_text())["services"]
    collector = services.get(COLLECTOR_SERVICE)
    if collector is None:
        return [f"compose: no {COLLECTOR_SERVICE} service"]
    problems = []
    image = str(collector.get("image", ""))
    if not image.startswith(COLLECTOR_IMAGE) or image.endswith((":", ":latest")):
        problems.append(f"compose: {COLLECTOR_SERVICE} must run a pinned {COLLECTOR_IMAGE}<version>, not {image!r}")
    flags = [str(a) for a in collector.get("command") or []]
    path = next((f.split("=", 1)[1] for f in flags if f.startswith("--config=")), "/etc/otelcol/config.yaml")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in collector.get("volumes", [])}
    config_file = compose_file.parent / mounts.get(path, "/nonexistent")
    if not config_file.is_file():
        return [*problems, f"compose: {COLLECTOR_SERVICE} reads {path}, which no volume provides from a file here"]
    config = yaml.safe_load(config_file.read_text())
    problems += collector_problems(config)
    receivers = otlp_protocols(config)
    names = set(services) | {alias for svc in services.values() for alias in _aliases(svc)}
    for exporter, body in (config.get("exporters") or {}).items():
        host = str((body or {}).get("endpoint", "")).rpartition(":")[0]
        if host and host not in names:
            problems.append(f"compose: collector exporter {exporter} sends to {host!r}, not a compose service")
    for name in ("cellserve-gpu", "cellserve-cpu"):
        env = {k: str(v) for k, v in (services.get(name, {}).get("environment") or {}).items()}
        trace, found = otel_env_problems(env, f"compose: {name}")
        problems += found
        if trace is not None:
            problems += _endpoint_problems(trace, receivers, f"compose: {name}", {COLLECTOR_SERVICE})
    prometheus = [str(a) for a in services.get("prometheus", {}).get("command", [])]
    if "--enable-feature=exemplar-storage" not in prometheus:
        problems.append("compose: prometheus needs --enable-feature=exemplar-storage to keep cellserve's exemplars")
    return problems + _grafana_problems(compose_file.parent.parent / "grafana/provisioning/datasources", names)


def _aliases(service: dict[str, Any]) -> list[str]:
    """A compose service's network aliases (``networks`` as a mapping; its list form has none)."""
    networks = service.get("networks") or {}
    return (
        [a for net in networks.values() for a in (net or {}).get("aliases", [])] if isinstance(networks, dict) else []
    )


def _endpoint_problems(
    trace: TraceConfig, receivers: dict[str, dict[str, Any]], where: str, hosts: set[str]
) -> list[str]:
    """The exporter's endpoint must be the collector's receiver for its protocol, plaintext unless it has TLS."""
    url = urlsplit(trace.endpoint)
    proto = "grpc" if trace.protocol == "grpc" else "http"
    server = receivers.get(proto)
    if server is None:
        return [f"{where}: sends OTLP/{trace.protocol}, which the collector does not receive"]
    problems = []
    if url.hostname not in hosts:
        problems.append(f"{where}: endpoint {trace.endpoint} is not the collector ({', '.join(sorted(hosts))})")
    if url.port != server["port"]:
        problems.append(f"{where}: endpoint {trace.endpoint} is not the collector's OTLP/{proto} port {server['port']}")
    if (url.scheme == "https") != server["tls"]:
        problems.append(f"{where}: endpoint {trace.endpoint}: the receiver {'has' if server['tls'] else 'has no'} TLS")
    return problems


def _grafana_problems(datasources_dir: Path, services: set[str]) -> list[str]:
    sources = [ds for f in sorted(datasources_dir.glob("*.yml")) for ds in yaml.safe_load(f.read_text())["datasources"]]
    by_uid = {ds["uid"]: ds for ds in sources}
    problems = []
    jaeger = [ds for ds in sources if ds["type"] == "jaeger"]
    if not jaeger:
        problems.append("grafana: no Jaeger datasource")
    for ds in jaeger:
        if urlsplit(ds["url"]).hostname not in services:
            problems.append(f"grafana: datasource {ds['uid']} points at {ds['url']}, not a compose service")
    links = [d for ds in sources if ds["type"] == "prometheus"
             for d in ds.get("jsonData", {}).get("exemplarTraceIdDestinations", [])]  # fmt: skip
    if not any(d.get("name") == EXEMPLAR_TRACE_LABEL for d in links):
        problems.append(f"grafana: Prometheus exemplars need a {EXEMPLAR_TRACE_LABEL!r} trace link")
    for d in links:
        if by_uid.get(d.get("datasourceUid"), {}).get("type") not in ("jaeger", "tempo", "zipkin"):
            problems.append(f"grafana: exemplar link {d.get('name')} goes to {d.get('datasourceUid')!r}, not traces")
    return problems


def k8s_tracing_problems(docs: list[dict[str, Any]]) -> list[str]:
    """A rendered overlay with the ``tracing`` Component: OTEL_* in the container's env resolve to tracing at a low
    ratio, sent to a Service's OTLP port; $(VAR)s refer to downward-API variables listed before them."""
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "cellserve")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    problems: list[str] = []
    env: dict[str, str] = {}
    for item in container.get("env", []):
        name, source = item["name"], item.get("valueFrom", {})
        if "fieldRef" in source:
            env[name] = f"<{source['fieldRef']['fieldPath']}>"  # what the kubelet puts there: the pod's own
            continue
        value = str(item.get("value", ""))
        for ref in re.findall(r"\$\((\w+)\)", value):
            if ref not in env:
                problems.append(f"Deployment: {name} refers to $({ref}), which no variable before it defines")
        env[name] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)
    if not any(k.startswith("OTEL_") for k in env):
        return [*problems, "Deployment: no OTEL_* variables (the tracing Component is not applied)"]
    trace, found = otel_env_problems(env, "Deployment")
    problems += found
    if trace is not None:
        url = urlsplit(trace.endpoint)
        if not re.fullmatch(r"[a-z0-9-]+\.[a-z0-9-]+\.svc(\.[a-z0-9.-]+)?", url.hostname or ""):
            problems.append(f"Deployment: endpoint {trace.endpoint}: want a Service, http(s)://NAME.NAMESPACE.svc")
        want = 4317 if trace.protocol == "grpc" else 4318
        if url.port != want:
            problems.append(f"Deployment: endpoint {trace.endpoint}: OTLP/{trace.protocol} is port {want}")
    attributes = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    for key in ("k8s.pod.name", "k8s.namespace.name"):
        if f"{key}=<" not in attributes:
            problems.append(f"Deployment: OTEL_RESOURCE_ATTRIBUTES needs {key} from the downward API")
    return problems
