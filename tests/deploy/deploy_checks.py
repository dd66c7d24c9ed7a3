"""The checks the deployment tests run: each ``*_problems`` function returns what is wrong with a deploy
file (or a rendered manifest, or settings), [] when nothing is; plus helpers to render and break the files
and to stop the processes the tests start.

Validators: hadolint (Dockerfile), yamllint (deploy/), `kubectl kustomize` + kubernetes-validate (strict,
pinned Kubernetes version) for every rendered manifest, explicit subset schemas for the custom
resources (deploy_crd_schemas), `promtool check config|rules`, `docker-compose config`, plus the
operational rules the manifests must keep (probes, grace periods, GPU limits, non-root, metric names).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_crd_schemas import CRD_SCHEMAS
from prometheus_client import CollectorRegistry

from cellserve.server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.33.0"  # native gRPC probes (GA 1.27) and the preStop sleep action (1.30) are in
# what the Dockerfile's builder stage copies, and test_serve_without_torch builds its wheel from
BUILD_INPUTS = ("pyproject.toml", "README.md", "proto", "server", "model", "client")


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def hadolint_problems(hadolint: str, dockerfile: Path) -> list[str]:
    proc = run([hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)])
    return [] if proc.returncode == 0 else [proc.stdout + proc.stderr]


def dockerfile_problems(dockerfile: Path) -> list[str]:
    """What the runtime stage must declare (hadolint cannot know our contract)."""
    text = dockerfile.read_text()
    runtime = text.split(" AS runtime", 1)[-1] if " AS runtime" in text else ""
    problems = []
    checks = {
        "runtime stage `FROM ... AS runtime`": bool(runtime),
        "non-root USER": re.search(r"^USER\s+(?!0\b|root\b)\S+", runtime, re.M),
        "EXPOSE 50051 9090": re.search(r"^EXPOSE\s+50051\s+9090\s*$", runtime, re.M),
        "exec-form ENTRYPOINT cellserve serve": re.search(r'^ENTRYPOINT \["cellserve", "serve"\]\s*$', runtime, re.M),
        "HEALTHCHECK via cellserve health": re.search(
            r'HEALTHCHECK[^\n]*(\\\n[^\n]*)*CMD \["cellserve", "health"', runtime
        ),
        "OCI title/version/revision labels": all(
            f"org.opencontainers.image.{k}=" in runtime for k in ("title", "version", "revision", "licenses")
        ),
        "model at /models/default": "CELLSERVE_MODEL_DIRS='[\"/models/default\"]'" in runtime,
        "gpu extra for the CUDA base, serve extra for the slim base": (
            "SERVING_EXTRA=gpu" in text and "SERVING_EXTRA=serve" in text
        ),
        "CUDA 13 + cuDNN runtime base (onnxruntime-gpu 1.31 links libcudart.so.13)": re.search(
            r"ARG CUDA_IMAGE=nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-", text
        ),
        # uid 10001 has no home and the root is read-only: CuPy's kernel cache must go to the /tmp volume.
        "CUPY_CACHE_DIR under the /tmp volume": re.search(r"^\s+CUPY_CACHE_DIR=/tmp/\S+", runtime, re.M)
        and 'VOLUME ["/tmp"]' in runtime,
    }
    problems += [f"Dockerfile: missing {what}" for what, ok in checks.items() if not ok]
    if re.search(r"\b(torch|gcc|g\+\+|build-essential)\b", runtime):
        problems.append("Dockerfile: runtime stage mentions torch or a compiler")
    return problems


def yamllint_problems(yamllint: str, root: Path) -> list[str]:
    proc = run([yamllint, "-c", str(root / ".yamllint.yaml"), "-f", "parsable", "--strict", str(root)])
    return [] if proc.returncode == 0 else [proc.stdout + proc.stderr]


def render(kubectl: str, kustomization: Path) -> list[dict[str, Any]]:
    proc = run([kubectl, "kustomize", str(kustomization)])
    if proc.returncode != 0:
        raise AssertionError(f"kustomize {kustomization}: {proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def manifest_problems(docs: list[dict[str, Any]]) -> list[str]:
    """kubernetes-validate (strict) for built-in kinds; the subset schemas for custom ones; nothing skipped."""
    problems = []
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        schema = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        try:
            if schema is not None:
                jsonschema.validate(doc, schema)
                hpa_cfg = doc["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
                if "behavior" in hpa_cfg:  # KEDA passes it to an autoscaling/v2 HPA: validate it as one
                    kubernetes_validate.validate(_hpa_with_behavior(hpa_cfg["behavior"]), K8S_VERSION, strict=True)
            else:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{what}: no schema (custom kinds need an entry in deploy_crd_schemas.CRD_SCHEMAS)")
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
            problems.append(f"{what}: {e.message}")
    return problems


def _hpa_with_behavior(behavior: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "keda-behavior"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 2, "behavior": behavior},
    }


def find_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment_problems(docs: list[dict[str, Any]], gpu: bool, tls: bool = False) -> list[str]:
    """The serving rules a rendered overlay must keep (with ``tls`` the probes are test_secure's to check)."""
    dep = find_kind(docs, "Deployment", "cellserve")
    config = find_kind(docs, "ConfigMap")["data"]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    limits = container.get("resources", {}).get("limits", {})
    sec = container.get("securityContext", {})
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    grace_s = float(config["CELLSERVE_GRACE_S"])
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    problems = []

    def need(ok: object, what: str) -> None:
        if not ok:
            problems.append(f"Deployment: {what}")

    need("replicas" not in dep["spec"], "no spec.replicas (the HPA owns the count)")
    need(pod.get("securityContext", {}).get("runAsNonRoot") is True, "pod runAsNonRoot")
    need(sec.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    need(sec.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation false")
    need("emptyDir" in volumes.get(mounts.get("/tmp", ""), {}), "an emptyDir at /tmp")
    for probe in () if tls else ("startupProbe", "readinessProbe", "livenessProbe"):
        need(container.get(probe, {}).get("grpc") == {"port": 50051, "service": ""}, f"{probe} grpc 50051 service ''")
    live = container.get("livenessProbe", {})
    need(live.get("periodSeconds", 10) * live.get("failureThreshold", 3) > grace_s,
         "liveness failure window longer than CELLSERVE_GRACE_S (a draining pod is NOT_SERVING)")
    need(pre_stop > 0, "a preStop sleep")
    need(pod.get("terminationGracePeriodSeconds", 30) > pre_stop + grace_s,
         f"terminationGracePeriodSeconds > preStop ({pre_stop}) + CELLSERVE_GRACE_S ({grace_s})")
    need(config.get("CELLSERVE_DEVICE") == ("cuda" if gpu else "cpu"), "CELLSERVE_DEVICE matching the overlay")
    workers = {e["name"]: e.get("valueFrom", {}) for e in container.get("env", [])}.get("CELLSERVE_WORKERS", {})
    need(workers.get("resourceFieldRef", {}).get("resource") == "requests.cpu" and "CELLSERVE_WORKERS" not in config,
         "CELLSERVE_WORKERS from the container's requests.cpu (downward API), one serving process per core")
    if gpu:
        need(str(limits.get("nvidia.com/gpu")) == "1", "nvidia.com/gpu: 1 limit")
        need(pod.get("nodeSelector") and pod.get("tolerations"), "GPU nodeSelector and tolerations")
        env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
        cache = env.get("CUPY_CACHE_DIR", "")
        on_empty_dir = any(cache.startswith(path.rstrip("/") + "/") and "emptyDir" in volumes.get(name, {})
                           for path, name in mounts.items())
        need(on_empty_dir, "CUPY_CACHE_DIR on an emptyDir (read-only root, no home: CuPy cannot import otherwise)")
    else:
        need("nvidia.com/gpu" not in limits, "no GPU limit in the CPU variant")
    svc = find_kind(docs, "Service", "cellserve")
    need(svc["spec"].get("clusterIP") == "None", "headless Service cellserve (client-side round-robin)")
    need(find_kind(docs, "Service", "cellserve-metrics")["spec"]["ports"][0]["port"] == 9090, "metrics Service :9090")
    hpa = find_kind(docs, "HorizontalPodAutoscaler")
    need(hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "cellserve_sessions_active", "HPA on sessions")
    find_kind(docs, "PodDisruptionBudget")
    return problems


def promtool_problems(promtool: str, what: str, path: Path) -> list[str]:
    proc = run([promtool, "check", what, str(path)])
    return [] if proc.returncode == 0 else [proc.stdout + proc.stderr]


def compose_problems(docker_compose: str, compose_file: Path) -> list[str]:
    problems = []
    for profile in ("gpu", "cpu"):
        proc = run([docker_compose, "-f", str(compose_file), "--profile", profile, "config", "-q"])
        if proc.returncode != 0:
            problems.append(f"docker-compose --profile {profile} config: {proc.stdout}{proc.stderr}")
    return problems


def compose_policy_problems(compose_file: Path) -> list[str]:
    doc = yaml.safe_load(compose_file.read_text())
    services = doc["services"]
    problems = []
    gpu = services.get("cellserve-gpu", {})
    devices = gpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        problems.append("compose: cellserve-gpu lacks an nvidia GPU reservation")
    cache = str(gpu.get("environment", {}).get("CUPY_CACHE_DIR", ""))
    tmpfs = [str(t).split(":", 1)[0].rstrip("/") + "/" for t in gpu.get("tmpfs", [])]
    if not any(cache.startswith(t) for t in tmpfs):
        problems.append("compose: cellserve-gpu needs CUPY_CACHE_DIR on its tmpfs (read-only root, no home)")
    for name in ("cellserve-gpu", "cellserve-cpu"):
        svc = services.get(name, {})
        if svc.get("read_only") is not True or not any(str(t).startswith("/tmp") for t in svc.get("tmpfs", [])):
            problems.append(f"compose: {name} must be read_only with a /tmp tmpfs")
        if svc.get("healthcheck", {}).get("test", [])[:3] != ["CMD", "cellserve", "health"]:
            problems.append(f"compose: {name} healthcheck must ask grpc health (cellserve health)")
        if str(svc.get("environment", {}).get("CELLSERVE_WORKERS")) != str(svc.get("cpus")):
            problems.append(f"compose: {name} must run one worker per core it is given (CELLSERVE_WORKERS = cpus)")
    if services.get("grafana", {}).get("depends_on", {}).get("prometheus", {}).get("condition") != "service_healthy":
        problems.append("compose: grafana must wait for a healthy prometheus")
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith(".") and not (compose_file.parent / src).exists():
                problems.append(f"compose: mounted path {src} does not exist")
    return problems


def exported_series_names() -> set[str]:
    """Every series name cellserve's Metrics can export (counters as _total, histograms as _bucket ...)."""
    names = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(family.name)
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_exprs(rules_file: Path) -> list[str]:
    return [r["expr"] for g in yaml.safe_load(rules_file.read_text())["groups"] for r in g["rules"]]


def metric_name_problems(exprs: list[str]) -> list[str]:
    known = exported_series_names()
    used = {name for e in exprs for name in re.findall(r"\bcellserve_[a-z_]+\b", e)}
    return [f"unknown metric {name} (not exported by cellserve.server.metrics)" for name in sorted(used - known)]


def dashboard_problems(path: Path) -> list[str]:
    dash = json.loads(path.read_text())
    problems = []
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("sessions active", "opened", "closed", "steps", "latency p50 / p99", "batch size", "queue wait",
                   "state pool", "errors"):
        if needed not in titles:
            problems.append(f"dashboard: no panel for {needed!r}")
    for p in dash["panels"]:
        if not p.get("targets") or p.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"dashboard: panel {p['title']!r} needs targets on the ${{datasource}} variable")
    return problems + metric_name_problems(dashboard_exprs(dash))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def settings_env_problems(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """CELLSERVE_* variables must name Settings fields (pydantic-settings ignores unknown ones) and parse."""
    from pydantic import ValidationError

    from cellserve.server.settings import Settings

    fields = Settings.model_fields
    unknown = [k for k in env if k.startswith("CELLSERVE_") and k.removeprefix("CELLSERVE_").lower() not in fields]
    problems = [f"{k}: not a cellserve setting" for k in unknown]
    with monkeypatch.context() as m:
        for k in [k for k in os.environ if k.startswith("CELLSERVE_")]:
            m.delenv(k)
        for k, v in env.items():
            m.setenv(k, v)
        try:
            Settings()
        except ValidationError as e:
            problems += [f"{err['loc']}: {err['msg']}" for err in e.errors()]
    return problems


def dockerfile_env(prefix: str = "CELLSERVE_") -> dict[str, str]:
    """The runtime stage's ENV variables whose names start with ``prefix`` ("" for all)."""
    runtime = (REPO / "Dockerfile").read_text().split(" AS runtime", 1)[1]
    block = re.search(r"^ENV (.*?)\n(?!\s)", runtime, re.M | re.S).group(1)
    pairs = re.findall(r"(\w+)=('[^']*'|\"[^\"]*\"|\S+)", block)
    return {k: v.strip("'\"") for k, v in pairs if k.startswith(prefix)}


def build_context_problems(dockerfile: Path, dockerignore: Path) -> list[str]:
    """The builder's COPY sources must be exactly what .dockerignore lets in (and what the no-torch test builds)."""
    builder = dockerfile.read_text().split(" AS builder", 1)[1].split("\nFROM ", 1)[0]
    copied = {src.rstrip("/") for line in re.findall(r"^COPY (?!--from)(.+)$", builder, re.M)
              for src in line.split()[:-1]}
    allowed = {line[1:].rstrip("/") for line in dockerignore.read_text().splitlines() if line.startswith("!")}
    problems = [f"builder copies {p} but .dockerignore excludes it" for p in sorted(copied - allowed)]
    problems += [f".dockerignore lets in {p} which the builder never copies" for p in sorted(allowed - copied)]
    if copied != set(BUILD_INPUTS):
        problems.append(f"builder copies {sorted(copied)}, the no-torch test builds from {sorted(BUILD_INPUTS)}")
    return problems


def stop_process(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM ``proc`` if it still runs; SIGKILL it when it has not exited ``timeout_s`` later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
