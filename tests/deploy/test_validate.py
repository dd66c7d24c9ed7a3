"""Offline validation of the deployment files with the real tools, and proof that each check can fail.

The checks themselves are in deploy_checks.py; every one also runs here on a deliberately broken copy
(in tmp_path) and must reject it.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from deploy_checks import (
    DEPLOY,
    REPO,
    alert_exprs,
    build_context_problems,
    compose_policy_problems,
    compose_problems,
    dashboard_problems,
    deployment_problems,
    dockerfile_env,
    dockerfile_problems,
    edit,
    exported_series_names,
    find_kind,
    hadolint_problems,
    manifest_problems,
    metric_name_problems,
    promtool_problems,
    render,
    settings_env_problems,
    yamllint_problems,
)

KUSTOMIZATIONS = ("k8s/overlays/gpu", "k8s/overlays/cpu", "k8s/overlays/secure/gpu", "k8s/overlays/secure/cpu",
                  "k8s/monitoring", "k8s/autoscaling/keda")


def test_dockerfile_passes_hadolint_and_serving_contract(tool):
    assert hadolint_problems(tool("hadolint"), REPO / "Dockerfile") == []
    assert dockerfile_problems(REPO / "Dockerfile") == []


def test_deploy_yaml_passes_yamllint(tool):
    assert yamllint_problems(tool("yamllint"), DEPLOY) == []


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_manifests_validate_for_pinned_kubernetes(tool, kustomization):
    docs = render(tool("kubectl"), DEPLOY / kustomization)
    assert docs
    assert manifest_problems(docs) == []


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_overlays_keep_serving_rules(tool, overlay):
    docs = render(tool("kubectl"), DEPLOY / "k8s/overlays" / overlay)
    assert deployment_problems(docs, gpu=overlay == "gpu") == []


def test_custom_resources_are_validated_not_skipped(tool):
    kinds = {d["kind"] for k in ("k8s/monitoring", "k8s/autoscaling/keda") for d in render(tool("kubectl"), DEPLOY / k)}
    assert kinds == {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}
    assert manifest_problems([unknown]) == ["Widget/w: no schema (custom kinds need an entry in "
                                            "deploy_crd_schemas.CRD_SCHEMAS)"]


def test_prometheus_config_and_rules_pass_promtool(tool, tmp_path):
    promtool = tool("promtool")
    assert promtool_problems(promtool, "config", DEPLOY / "prometheus/prometheus.yml") == []
    assert promtool_problems(promtool, "rules", DEPLOY / "prometheus/alerts.yml") == []
    rule = yaml.safe_load((DEPLOY / "k8s/monitoring/prometheusrule.yaml").read_text())
    extracted = tmp_path / "prometheusrule-groups.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    assert promtool_problems(promtool, "rules", extracted) == []


def test_prometheusrule_is_the_alerts_file():
    rule = yaml.safe_load((DEPLOY / "k8s/monitoring/prometheusrule.yaml").read_text())
    alerts = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]


def test_compose_file_passes_docker_compose_config(tool):
    compose = DEPLOY / "compose/docker-compose.yml"
    assert compose_problems(tool("docker-compose"), compose) == []
    assert compose_policy_problems(compose) == []


def test_dashboard_and_alerts_use_only_exported_metrics():
    assert dashboard_problems(DEPLOY / "grafana/dashboards/cellserve.json") == []
    assert metric_name_problems(alert_exprs(DEPLOY / "prometheus/alerts.yml")) == []


def test_grafana_provisioning_matches_compose_mounts():
    compose = yaml.safe_load((DEPLOY / "compose/docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/cellserve.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert (DEPLOY / "compose" / mounts[dash_dir] / "cellserve.json").exists()
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    dash = json.loads((DEPLOY / "grafana/dashboards/cellserve.json").read_text())
    ds_var = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert datasource["datasources"][0]["uid"] == ds_var["current"]["value"]


def test_hpa_metric_is_served_by_the_adapter_rule():
    values = yaml.safe_load((DEPLOY / "k8s/autoscaling/prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    hpa = yaml.safe_load((DEPLOY / "k8s/base/hpa.yaml").read_text())
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == metric
    assert re.fullmatch(rule["name"]["matches"], metric)
    assert metric in exported_series_names()
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_hadolint_rejects_shell_form_entrypoint(tool, deploy_copy):
    dockerfile = deploy_copy / "Dockerfile"
    edit(dockerfile, 'ENTRYPOINT ["cellserve", "serve"]', "ENTRYPOINT cellserve serve")
    problems = hadolint_problems(tool("hadolint"), dockerfile)
    assert problems and "DL3025" in problems[0]
    assert "Dockerfile: missing exec-form ENTRYPOINT cellserve serve" in dockerfile_problems(dockerfile)


def test_dockerfile_contract_rejects_root_user_and_torch(deploy_copy):
    dockerfile = deploy_copy / "Dockerfile"
    edit(dockerfile, "USER 10001:10001", "USER root")
    edit(dockerfile, "COPY --from=app /stage/ /", "COPY --from=app /stage/ /\nRUN pip install torch")
    problems = dockerfile_problems(dockerfile)
    assert "Dockerfile: missing non-root USER" in problems
    assert "Dockerfile: runtime stage mentions torch or a compiler" in problems


def test_yamllint_rejects_duplicate_key(tool, deploy_copy):
    pdb = deploy_copy / "deploy/k8s/base/pdb.yaml"
    edit(pdb, "  maxUnavailable: 1\n", "  maxUnavailable: 1\n  maxUnavailable: 2\n")
    problems = yamllint_problems(tool("yamllint"), deploy_copy / "deploy")
    assert problems and "key-duplicates" in problems[0]


def test_kubernetes_validate_rejects_misspelt_probe_field(tool, deploy_copy):
    edit(deploy_copy / "deploy/k8s/base/deployment.yaml", "            periodSeconds: 5\n",
          "            periodSecond: 5\n")
    problems = manifest_problems(render(tool("kubectl"), deploy_copy / "deploy/k8s/overlays/gpu"))
    assert any(p.startswith("Deployment/cellserve:") and "periodSecond" in p for p in problems)


def test_crd_schema_rejects_bad_servicemonitor_and_scaledobject(tool, deploy_copy):
    edit(deploy_copy / "deploy/k8s/monitoring/servicemonitor.yaml", "interval: 15s", "intervall: 15s")
    problems = manifest_problems(render(tool("kubectl"), deploy_copy / "deploy/k8s/monitoring"))
    assert any(p.startswith("ServiceMonitor/cellserve:") and "intervall" in p for p in problems)
    edit(deploy_copy / "deploy/k8s/autoscaling/keda/scaledobject.yaml", "metricType: AverageValue", "metricType: Mean")
    problems = manifest_problems(render(tool("kubectl"), deploy_copy / "deploy/k8s/autoscaling/keda"))
    assert any(p.startswith("ScaledObject/cellserve:") for p in problems)


def test_serving_rules_reject_short_termination_grace_and_missing_gpu(tool, deploy_copy):
    edit(deploy_copy / "deploy/k8s/base/deployment.yaml", "terminationGracePeriodSeconds: 45",
          "terminationGracePeriodSeconds: 20")
    edit(deploy_copy / "deploy/k8s/base/deployment.yaml", "resource: requests.cpu", "resource: limits.memory")
    gpu_patch = deploy_copy / "deploy/k8s/overlays/gpu/deployment-gpu.yaml"
    edit(gpu_patch, "              memory: 8Gi\n              nvidia.com/gpu: 1", "              memory: 8Gi")
    problems = deployment_problems(render(tool("kubectl"), deploy_copy / "deploy/k8s/overlays/gpu"), gpu=True)
    assert "Deployment: terminationGracePeriodSeconds > preStop (5) + CELLSERVE_GRACE_S (20.0)" in problems
    assert "Deployment: nvidia.com/gpu: 1 limit" in problems
    assert any("CELLSERVE_WORKERS from the container's requests.cpu" in p for p in problems)


def test_cupy_cache_rules_reject_a_cache_on_the_read_only_root(tool, deploy_copy):
    edit(deploy_copy / "Dockerfile", "    CUPY_CACHE_DIR=/tmp/cupy-kernel-cache \\\n", "")
    assert "Dockerfile: missing CUPY_CACHE_DIR under the /tmp volume" in dockerfile_problems(deploy_copy / "Dockerfile")
    edit(deploy_copy / "deploy/k8s/overlays/gpu/deployment-gpu.yaml", "value: /tmp/cupy-kernel-cache",
          "value: /opt/cellserve/cupy")
    problems = deployment_problems(render(tool("kubectl"), deploy_copy / "deploy/k8s/overlays/gpu"), gpu=True)
    assert any("CUPY_CACHE_DIR on an emptyDir" in p for p in problems), problems
    compose = deploy_copy / "deploy/compose/docker-compose.yml"
    edit(compose, "CUPY_CACHE_DIR: /tmp/cupy-kernel-cache", "CUPY_CACHE_DIR: /nonexistent/.cupy")
    assert "compose: cellserve-gpu needs CUPY_CACHE_DIR on its tmpfs (read-only root, no home)" in (
        compose_policy_problems(compose)
    )


def test_promtool_rejects_bad_promql_and_bad_config(tool, deploy_copy):
    promtool = tool("promtool")
    alerts = deploy_copy / "deploy/prometheus/alerts.yml"
    edit(alerts, "rate(cellserve_step_latency_seconds_bucket[5m])", "rate(cellserve_step_latency_seconds_bucket)")
    assert promtool_problems(promtool, "rules", alerts)
    config = deploy_copy / "deploy/prometheus/prometheus.yml"
    edit(config, "scrape_interval: 15s", "scrape_interval: fast")
    assert promtool_problems(promtool, "config", config)


def test_docker_compose_rejects_misspelt_healthcheck(tool, deploy_copy):
    compose = deploy_copy / "deploy/compose/docker-compose.yml"
    edit(compose, "    start_period: 60s\n", "    start_periodd: 60s\n")
    assert compose_problems(tool("docker-compose"), compose)


def test_compose_policy_rejects_missing_gpu_reservation(deploy_copy):
    compose = deploy_copy / "deploy/compose/docker-compose.yml"
    edit(compose, "              capabilities: [gpu]\n", "              capabilities: [utility]\n")
    two, one = '      CELLSERVE_WORKERS: "2"\n      CELLSERVE_CAPACITY: "2048"', '      CELLSERVE_WORKERS: "1"\n'
    edit(compose, two, one + '      CELLSERVE_CAPACITY: "2048"')
    shutil.rmtree(deploy_copy / "deploy/grafana/dashboards")
    problems = compose_policy_problems(compose)
    assert "compose: cellserve-gpu lacks an nvidia GPU reservation" in problems
    assert "compose: mounted path ../grafana/dashboards does not exist" in problems
    assert "compose: cellserve-cpu must run one worker per core it is given (CELLSERVE_WORKERS = cpus)" in problems


def test_dashboard_check_rejects_unknown_metric(deploy_copy):
    path = deploy_copy / "deploy/grafana/dashboards/cellserve.json"
    edit(path, "cellserve_steps_total", "cellserve_step_total")
    assert "unknown metric cellserve_step_total (not exported by cellserve.server.metrics)" in dashboard_problems(path)


def test_prometheusrule_drift_is_detected(deploy_copy):
    edit(deploy_copy / "deploy/k8s/monitoring/prometheusrule.yaml", "> 0.9", "> 0.8")
    rule = yaml.safe_load((deploy_copy / "deploy/k8s/monitoring/prometheusrule.yaml").read_text())
    alerts = yaml.safe_load((deploy_copy / "deploy/prometheus/alerts.yml").read_text())
    assert rule["spec"]["groups"] != alerts["groups"]


def test_gpu_extra_is_the_tested_serve_extra_with_the_cuda_build():
    """The GPU image installs `gpu`; only `serve` is installed and served in CI (test_serve_without_torch)."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def name(req: str) -> str:
        return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower()

    gpu_only = {r for r in extras["gpu"] if name(r) == "onnxruntime-gpu" or name(r).startswith("cupy")}
    assert {r for r in extras["gpu"] if r not in gpu_only} == {r for r in extras["serve"] if name(r) != "onnxruntime"}
    ort = {name(r): r.split("==")[-1] for r in extras["serve"] + extras["gpu"] if name(r).startswith("onnxruntime")}
    assert ort["onnxruntime"] == ort["onnxruntime-gpu"], "CPU and GPU images must run the same onnxruntime"
    assert not any(name(r) == "torch" for r in extras["serve"] + extras["gpu"])


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_configmap_settings_are_real_and_parse(tool, overlay, monkeypatch):
    config = find_kind(render(tool("kubectl"), DEPLOY / "k8s/overlays" / overlay), "ConfigMap")["data"]
    assert settings_env_problems(config, monkeypatch) == []


def test_image_and_compose_settings_are_real_and_parse(monkeypatch):
    assert dockerfile_env()["CELLSERVE_MODEL_DIRS"] == '["/models/default"]'
    assert settings_env_problems(dockerfile_env(), monkeypatch) == []
    compose = yaml.safe_load((DEPLOY / "compose/docker-compose.yml").read_text())
    for name in ("cellserve-gpu", "cellserve-cpu"):
        env = {**dockerfile_env(), **compose["services"][name]["environment"]}
        assert settings_env_problems(env, monkeypatch) == [], name


def test_settings_check_rejects_misspelt_variable(monkeypatch):
    problems = settings_env_problems({"CELLSERVE_CAPACTY": "8", "CELLSERVE_GRACE_S": "soon"}, monkeypatch)
    assert "CELLSERVE_CAPACTY: not a cellserve setting" in problems
    assert any("grace_s" in p for p in problems)


def test_build_context_is_what_the_builder_copies():
    assert build_context_problems(REPO / "Dockerfile", REPO / ".dockerignore") == []


def test_build_context_check_rejects_an_excluded_source(deploy_copy):
    ignore = deploy_copy / ".dockerignore"
    shutil.copy2(REPO / ".dockerignore", ignore)
    edit(ignore, "!client/\n", "")
    problems = build_context_problems(deploy_copy / "Dockerfile", ignore)
    assert "builder copies client but .dockerignore excludes it" in problems
