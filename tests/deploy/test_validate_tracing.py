"""Offline validation of the trace wiring (README "Observability: traces", deploy/README.md): the compose
OpenTelemetry Collector and cellserve's OTEL_* pointing at it, the Kubernetes `tracing` Component on every device
overlay, and the image's OpenTelemetry packages; and proof that each check rejects a broken copy."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest
import yaml
from deploy_checks import DEPLOY, REPO, deployment_problems, edit, manifest_problems, render
from deploy_tracing import (
    collector_problems,
    compose_tracing_problems,
    k8s_tracing_problems,
    otel_variables,
)

COLLECTOR = DEPLOY / "otel-collector/otel-collector.yml"
COMPONENT = "k8s/components/tracing"
OVERLAYS = ("gpu", "cpu", "secure/gpu", "secure/cpu")


def traced(deploy_copy: Path, overlay: str) -> Path:
    """A kustomization of ``overlay`` (in the copy) with the tracing Component added, as an operator adds it."""
    root = deploy_copy / "deploy/k8s/overlays/traced" / overlay.replace("/", "-")
    root.mkdir(parents=True)
    up = "../" * 4  # overlays/traced/<name> -> deploy/
    (root / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {up}k8s/overlays/{overlay}\ncomponents:\n  - {up}{COMPONENT}\n"
    )
    return root


def test_the_collector_config_is_consistent():
    assert collector_problems(yaml.safe_load(COLLECTOR.read_text())) == []


def test_compose_sends_cellserve_traces_to_its_collector_and_links_exemplars_to_jaeger():
    assert compose_tracing_problems(DEPLOY / "compose/docker-compose.yml") == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_tracing_component_validates_on_every_overlay(tool, deploy_copy, overlay):
    docs = render(tool("kubectl"), traced(deploy_copy, overlay))
    assert manifest_problems(docs) == []
    assert k8s_tracing_problems(docs) == []
    if not overlay.startswith("secure"):
        assert deployment_problems(docs, gpu=overlay == "gpu") == []  # the serving rules still hold


def test_tracing_is_opt_in_on_kubernetes(tool):
    docs = render(tool("kubectl"), DEPLOY / "k8s/overlays/cpu")
    assert k8s_tracing_problems(docs) == ["Deployment: no OTEL_* variables (the tracing Component is not applied)"]


def test_the_images_install_the_otel_extra_and_it_can_export_both_protocols():
    dockerfile = (REPO / "Dockerfile").read_text()
    deps = dockerfile.split(" AS deps", 1)[1].split("\nFROM ", 1)[0]
    assert "ENV TRACING_EXTRA=otel" in deps and 'opt[os.environ["TRACING_EXTRA"]]' in deps
    otel = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["otel"]
    names = {pin.split("==")[0] for pin in otel}
    assert {
        "opentelemetry-sdk",
        "opentelemetry-exporter-otlp-proto-grpc",
        "opentelemetry-exporter-otlp-proto-http",
    } <= names
    assert not any("torch" in n for n in names)


def test_the_otel_variables_are_the_ones_trace_config_reads():
    assert {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SERVICE_NAME"} <= otel_variables()
    assert "OTEL_TRACE_SAMPLER" not in otel_variables()


# -- each check rejects a broken copy --------------------------------------------------------------------


def test_collector_check_rejects_typos_dangling_components_and_a_localhost_receiver():
    good = yaml.safe_load(COLLECTOR.read_text())
    config = copy.deepcopy(good)
    config["processors"]["batch"]["send_batch_sizee"] = config["processors"]["batch"].pop("send_batch_size")
    config["service"]["pipelines"]["traces"]["exporters"] = ["debug", "otlp_grpc/jaegr"]
    config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] = "localhost:4317"
    config["exporters"]["zipkin"] = {"endpoint": "http://jaeger:9411"}
    problems = collector_problems(config)
    assert any("processors batch:" in p and "send_batch_sizee" in p for p in problems), problems
    assert "collector: pipeline traces names exporter otlp_grpc/jaegr, which is not defined" in problems
    assert "collector: exporter otlp_grpc/jaeger is in no pipeline" in problems
    assert any("otlp grpc listens on localhost" in p for p in problems), problems
    assert any(p.startswith("collector: exporters zipkin: unknown type") for p in problems), problems
    config = copy.deepcopy(good)
    config["service"]["pipelines"]["traces"]["processors"] = ["memory_limiter"]
    config["service"]["pipelines"]["traces"]["exporters"] = ["otlp_grpc/jaeger"]
    problems = collector_problems(config)
    assert "collector: the traces pipeline must batch (processor batch, last)" in problems
    assert "collector: the traces pipeline must export to debug (the collector's log)" in problems


def test_compose_check_rejects_a_wrong_endpoint_variable_ratio_and_exemplar_link(deploy_copy):
    compose = deploy_copy / "deploy/compose/docker-compose.yml"
    edit(
        compose,
        "OTEL_EXPORTER_OTLP_ENDPOINT: http://otel-collector:4317",
        "OTEL_EXPORTER_OTLP_ENDPOINT: http://otel-colector:4318",
    )
    edit(compose, 'OTEL_TRACES_SAMPLER_ARG: "0.01"', 'OTEL_TRACES_SAMPLER_ARG: "1"\n  OTEL_TRACE_SAMPLER: always_on')
    edit(compose, "      - --enable-feature=exemplar-storage\n", "")
    edit(deploy_copy / "deploy/grafana/provisioning/datasources/prometheus.yml", "datasourceUid: jaeger",
         "datasourceUid: prometheus")  # fmt: skip
    problems = compose_tracing_problems(compose)
    for name in ("cellserve-gpu", "cellserve-cpu"):
        assert f"compose: {name}: endpoint http://otel-colector:4318 is not the collector (otel-collector)" in problems
        assert (
            f"compose: {name}: endpoint http://otel-colector:4318 is not the collector's OTLP/grpc port 4317"
            in problems
        )
        assert f"compose: {name}: OTEL_TRACE_SAMPLER is not a variable cellserve or the SDK reads" in problems
        assert f"compose: {name}: samples 100% of steps; at most 1% (README: cost)" in problems
    assert "compose: prometheus needs --enable-feature=exemplar-storage to keep cellserve's exemplars" in problems
    assert "grafana: exemplar link trace_id goes to 'prometheus', not traces" in problems


def test_compose_check_rejects_a_missing_collector_config_and_a_bad_sampler(deploy_copy):
    compose = deploy_copy / "deploy/compose/docker-compose.yml"
    edit(compose, "OTEL_TRACES_SAMPLER: parentbased_traceidratio", "OTEL_TRACES_SAMPLER: ratio")
    problems = compose_tracing_problems(compose)
    assert any("OTEL_TRACES_SAMPLER: 'ratio' is not one of" in p for p in problems), problems
    (deploy_copy / "deploy/otel-collector/otel-collector.yml").unlink()
    assert compose_tracing_problems(compose) == [
        "compose: otel-collector reads /etc/otelcol/config.yaml, which no volume provides from a file here"
    ]


def test_k8s_check_rejects_an_unordered_reference_a_wrong_port_and_a_misspelt_variable(tool, deploy_copy):
    patch = deploy_copy / "deploy" / COMPONENT / "deployment-tracing.yaml"
    edit(patch, "- name: POD_NAMESPACE", "- name: NAMESPACE")
    edit(patch, "observability.svc:4317", "observability.svc:4318")
    edit(patch, "- name: OTEL_SERVICE_NAME", "- name: OTEL_SERVICENAME")
    problems = k8s_tracing_problems(render(tool("kubectl"), traced(deploy_copy, "cpu")))
    assert "Deployment: OTEL_RESOURCE_ATTRIBUTES refers to $(POD_NAMESPACE), which no variable before it defines" in (
        problems
    )
    assert "Deployment: endpoint http://otel-collector.observability.svc:4318: OTLP/grpc is port 4317" in problems
    assert "Deployment: OTEL_SERVICENAME is not a variable cellserve or the SDK reads" in problems
    assert "Deployment: OTEL_RESOURCE_ATTRIBUTES needs k8s.namespace.name from the downward API" in problems
