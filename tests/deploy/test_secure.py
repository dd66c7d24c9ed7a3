"""The secure Kubernetes variant (components/secure, components/mtls): TLS, bearer tokens, shared token keys.

Rendered with the real kustomize; checked for what makes it work in a cluster: no native gRPC probe left
(kubelet's cannot speak TLS), Secrets mounted as directories (subPath would freeze rotations), every
``CELLSERVE_*_FILE`` pointing at a file a Secret volume projects, and probe commands the real CLI accepts.
Then the rendered probe command runs against a real ``cellserve serve`` configured from the rendered
ConfigMap, with the files laid out as the kubelet lays out a Secret volume.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import (
    DEPLOY,
    deployment_problems,
    edit,
    find_kind,
    manifest_problems,
    render,
    settings_env_problems,
)

from cellserve.server.cli import build_parser

SECURE = ("k8s/overlays/secure/gpu", "k8s/overlays/secure/cpu")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
CELLSERVE_BIN = Path(sys.executable).parent / "cellserve"
REQUIRED_FILES = ("TLS_CERT_FILE", "TLS_KEY_FILE", "AUTH_TOKENS_FILE", "TOKEN_KEYS_FILE")
MTLS_OVERLAY = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../cpu
components:
  - ../../../components/secure
  - ../../../components/mtls
"""


def _container(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = find_kind(docs, "Deployment", "cellserve")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def secret_files(docs: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Absolute path in the container -> (Secret name, key), for every file a mounted Secret volume projects."""
    pod, container = _container(docs)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"], {}).get("secret")
        if secret is None:
            continue
        for item in secret.get("items", []):
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = (secret["secretName"], item["key"])
    return files


def file_settings(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Every CELLSERVE_*_FILE the pod gets, from the ConfigMap and from the container's own env."""
    _, container = _container(docs)
    env = dict(find_kind(docs, "ConfigMap")["data"])
    env.update({e["name"]: e.get("value", "") for e in container.get("env", [])})
    return {k: v for k, v in env.items() if k.startswith("CELLSERVE_") and k.endswith("_FILE")}


def _flags(command: list[str]) -> dict[str, str]:
    return {command[i]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}


def secure_problems(docs: list[dict[str, Any]]) -> list[str]:
    """What the TLS variant must keep, beyond deployment_problems' serving rules."""
    pod, container = _container(docs)
    projected = secret_files(docs)
    settings = file_settings(docs)
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    problems = []
    for c in pod["containers"] + pod.get("initContainers", []):
        for mount in c.get("volumeMounts", []):
            if "subPath" in mount or "subPathExpr" in mount:
                problems.append(f"mount {mount['name']} uses subPath: Secret updates would never reach the pod")
    for name in REQUIRED_FILES:
        if f"CELLSERVE_{name}" not in settings:
            problems.append(f"CELLSERVE_{name} is not set")
    for key, path in sorted(settings.items()):
        if path not in projected:
            problems.append(f"{key}={path} is no file a mounted Secret volume projects")
    mutual = "CELLSERVE_TLS_CLIENT_CA_FILE" in settings
    for name in PROBES:
        probe = container.get(name, {})
        command = probe.get("exec", {}).get("command", [])
        if set(probe) & {"grpc", "httpGet", "tcpSocket"} or command[:2] != ["cellserve", "health"]:
            problems.append(f"{name}: must exec `cellserve health` (kubelet's gRPC probe cannot speak TLS)")
            continue
        try:
            build_parser().parse_args(command[1:])
        except SystemExit:
            problems.append(f"{name}: `cellserve health` rejects {command[2:]}")
        flags = _flags(command)
        needed = ["--tls-root-cert"] + (["--tls-client-cert", "--tls-client-key"] if mutual else [])
        for flag in needed:
            if flags.get(flag) not in projected:
                problems.append(f"{name}: {flag} {flags.get(flag)} is no file a mounted Secret volume projects")
        if flags.get("--server") != f"localhost:{grpc_port}" or not flags.get("--tls-server-name"):
            problems.append(f"{name}: needs --server localhost:{grpc_port} and the certificate's --tls-server-name")
        if "--token" in flags:
            problems.append(f"{name}: health needs no bearer token (and the pod spec is no place for one)")
        timeout, period = probe.get("timeoutSeconds", 1), probe.get("periodSeconds", 10)
        if not 2 <= timeout <= period or float(flags.get("--timeout", 10)) >= timeout:
            problems.append(f"{name}: need 2 <= timeoutSeconds ({timeout}) <= periodSeconds ({period}) and "
                            f"--timeout < timeoutSeconds (a Python start takes ~0.5 s)")
    for port in find_kind(docs, "Service", "cellserve")["spec"]["ports"]:
        if port["name"] == "grpc" and port.get("appProtocol") == "kubernetes.io/h2c":
            problems.append("Service cellserve: the grpc port speaks TLS, not h2c")
    return problems


def _mtls_copy(deploy_copy: Path) -> Path:
    overlay = deploy_copy / "deploy/k8s/overlays/secure/cpu-mtls"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(MTLS_OVERLAY)
    return overlay


# -- the shipped variants pass -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", SECURE)
def test_secure_overlays_keep_serving_rules_and_tls_rules(tool, overlay):
    docs = render(tool("kubectl"), DEPLOY / overlay)
    assert deployment_problems(docs, gpu=overlay.endswith("gpu"), tls=True) == []
    assert secure_problems(docs) == []


def test_secure_overlay_differs_from_its_base_only_where_it_should(tool):
    """Same device settings as the plain overlay; the secret values themselves are never in the manifests."""
    kubectl = tool("kubectl")
    plain, secure = render(kubectl, DEPLOY / "k8s/overlays/gpu"), render(kubectl, DEPLOY / "k8s/overlays/secure/gpu")
    plain_cfg, secure_cfg = find_kind(plain, "ConfigMap")["data"], find_kind(secure, "ConfigMap")["data"]
    added = set(file_settings(secure)) - set(file_settings(plain))
    assert {k: v for k, v in secure_cfg.items() if k not in added} == plain_cfg
    assert {d["kind"] for d in secure} == {d["kind"] for d in plain}  # no Secret objects shipped
    assert {s for s, _ in secret_files(secure).values()} == {"cellserve-tls", "cellserve-auth", "cellserve-token-keys"}


@pytest.mark.parametrize("overlay", ["k8s/overlays/gpu", "k8s/overlays/cpu", *SECURE])
def test_every_variant_shares_resume_token_keys_from_a_secret(tool, overlay):
    """Without shared keys a drained session cannot resume on another pod: every variant mounts them."""
    docs = render(tool("kubectl"), DEPLOY / overlay)
    path = file_settings(docs)["CELLSERVE_TOKEN_KEYS_FILE"]
    assert secret_files(docs)[path] == ("cellserve-token-keys", "token-keys.json")


def test_mtls_component_validates_and_probes_present_a_client_certificate(tool, deploy_copy):
    docs = render(tool("kubectl"), _mtls_copy(deploy_copy))
    assert manifest_problems(docs) == []
    assert deployment_problems(docs, gpu=False, tls=True) == []
    assert secure_problems(docs) == []
    assert file_settings(docs)["CELLSERVE_TLS_CLIENT_CA_FILE"] == "/etc/cellserve/tls/ca.crt"


@pytest.mark.parametrize("overlay", SECURE)
def test_secure_configmap_settings_are_real_and_parse(tool, overlay, monkeypatch, tmp_path):
    docs = render(tool("kubectl"), DEPLOY / overlay)
    config = find_kind(docs, "ConfigMap")["data"]
    files = file_settings(docs)
    for key, path in files.items():  # FilePath settings must exist: stand-ins at the same names
        local = tmp_path / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("stand-in\n")
        config[key] = str(local)
    assert settings_env_problems(config, monkeypatch) == []


# -- each rule rejects a deliberately broken copy -------------------------------------------------------


def test_secure_rules_reject_subpath_leftover_grpc_probe_and_unmounted_file(tool, deploy_copy):
    component = deploy_copy / "deploy/k8s/components/secure"
    edit(component / "deployment-secure.yaml", "              mountPath: /etc/cellserve/auth\n",
          "              mountPath: /etc/cellserve/auth\n              subPath: auth\n")
    edit(component / "deployment-secure.yaml", "          livenessProbe:\n            $patch: replace\n"
          "            exec:\n              command: *health\n", "          livenessProbe:\n")
    edit(component / "kustomization.yaml", "/etc/cellserve/tls/tls.key", "/etc/cellserve/tls/tls.pem")
    problems = secure_problems(render(tool("kubectl"), deploy_copy / "deploy/k8s/overlays/secure/cpu"))
    assert "mount auth uses subPath: Secret updates would never reach the pod" in problems
    assert "livenessProbe: must exec `cellserve health` (kubelet's gRPC probe cannot speak TLS)" in problems
    assert "CELLSERVE_TLS_KEY_FILE=/etc/cellserve/tls/tls.pem is no file a mounted Secret volume projects" in problems


def test_secure_rules_reject_misspelt_flag_and_missing_client_certificate(tool, deploy_copy):
    edit(deploy_copy / "deploy/k8s/components/secure/deployment-secure.yaml", "- --tls-server-name",
          "- --tls-servername")
    problems = secure_problems(render(tool("kubectl"), deploy_copy / "deploy/k8s/overlays/secure/cpu"))
    assert any(p.startswith("readinessProbe: `cellserve health` rejects") for p in problems)
    edit(deploy_copy / "deploy/k8s/components/mtls/deployment-mtls.yaml", "- --tls-client-cert",
          "- --tls-root-cert")
    problems = secure_problems(render(tool("kubectl"), _mtls_copy(deploy_copy)))
    assert "livenessProbe: --tls-client-cert None is no file a mounted Secret volume projects" in problems


# -- the rendered probe command against a real TLS server ----------------------------------------------


def _secret_volume(directory: Path, files: dict[str, bytes], generation: int) -> None:
    """Write or update a Secret volume as the kubelet does: name -> ..data/name, ..data -> a timestamped
    directory, an update writes a new directory and swaps the ..data symlink in one rename."""
    stamp = directory / f"..2026_01_01_00_00_00.{generation:09d}"
    stamp.mkdir(parents=True)
    for name, data in files.items():
        (stamp / name).write_bytes(data)
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(Path("..data") / name)
    (directory / "..data_tmp").symlink_to(stamp.name)
    os.replace(directory / "..data_tmp", directory / "..data")


def _write_secrets(root: Path, docs: list[dict[str, Any]], contents: dict[str, bytes], generation: int) -> None:
    """Every Secret volume of the rendered pod under ``root``, each key's bytes from ``contents``."""
    by_mount: dict[str, dict[str, bytes]] = {}
    for path, (_, key) in secret_files(docs).items():
        mount, name = path.rsplit("/", 1)
        by_mount.setdefault(mount, {})[name] = contents[key]
    for mount, files in by_mount.items():
        _secret_volume(root / mount.lstrip("/"), files, generation)


def _tls_contents(ca: Any, server_name: str) -> dict[str, bytes]:
    leaf = ca.issue("cellserve", sans=(server_name,))  # no localhost: the probe's server name is what is checked
    return {"tls.crt": leaf.cert, "tls.key": leaf.key, "ca.crt": ca.pem}


def _run_probe(command: list[str], port: int, remap: Callable[[str], str]) -> subprocess.CompletedProcess[str]:
    argv = [str(CELLSERVE_BIN), *command[1:]]
    argv = [f"localhost:{port}" if a.startswith("localhost:") else remap(a) for a in argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_rendered_probe_passes_against_a_real_tls_server_across_a_secret_update(
    tool, deploy_copy, tmp_path, pki, spawn_server, monkeypatch, mutual, wait_until
):
    overlay = _mtls_copy(deploy_copy) if mutual else DEPLOY / "k8s/overlays/secure/cpu"
    docs = render(tool("kubectl"), overlay)
    _, container = _container(docs)
    command = container["readinessProbe"]["exec"]["command"]
    assert all(container[p]["exec"]["command"] == command for p in PROBES)
    server_name = _flags(command)["--tls-server-name"]
    contents = {
        **_tls_contents(pki.ca, server_name),
        "auth-tokens": f"# test\n{secrets.token_urlsafe(32)}\n".encode(),
        "token-keys.json": json.dumps({"active": "k1", "keys": {"k1": secrets.token_hex(32)}}).encode(),
    }
    root = tmp_path / "pod"
    _write_secrets(root, docs, contents, generation=1)
    projected = secret_files(docs)

    def remap(arg: str) -> str:
        return str(root / arg.lstrip("/")) if arg in projected else arg

    for key in [k for k in os.environ if k.startswith("CELLSERVE_")]:
        monkeypatch.delenv(key)
    for key, path in file_settings(docs).items():  # configured as the pod is: CELLSERVE_* from the ConfigMap
        monkeypatch.setenv(key, remap(path))
    server = spawn_server()
    ok = _run_probe(command, server.port, remap)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    plaintext = _run_probe(["cellserve", "health", "--server", server.address, "--timeout", "2"],
                           server.port, remap)  # what kubelet's native gRPC probe would do (no TLS)
    assert plaintext.returncode == 1 and "UNREACHABLE" in plaintext.stdout

    # cert-manager renews with another CA; the kubelet swaps the volume: the same probe stays green, no restart
    old_ca = tmp_path / "old-ca.crt"
    old_ca.write_bytes(pki.ca.pem)
    _write_secrets(root, docs, {**contents, **_tls_contents(pki.other_ca, server_name)}, generation=2)
    probes = []

    def renewed_ok() -> bool:  # the server's watcher re-reads the files about once a second
        probes.append(_run_probe(command, server.port, remap))
        return probes[-1].returncode == 0

    wait_until(renewed_ok, 20, poll_s=0, what=lambda: f"the probe to pass again: {probes[-1].stderr}")
    renewed = probes[-1]
    assert (renewed.returncode, renewed.stdout.strip()) == (0, "SERVING"), renewed.stderr
    stale = _run_probe(command, server.port, lambda a: str(old_ca) if a.endswith("/ca.crt") else remap(a))
    assert stale.returncode == 1, "the server still presents the old certificate"
    assert server.proc.poll() is None


# -- the compose recipe in deploy/README.md -------------------------------------------------------------


def readme_compose_override() -> str:
    """The YAML block under "### docker compose" in deploy/README.md's TLS section."""
    text = (DEPLOY / "README.md").read_text().split("## TLS, tokens and key rotation", 1)[1]
    section = text.split("### docker compose", 1)[1]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_readme_compose_override_merges_and_configures_tls(tool, deploy_copy, monkeypatch, tmp_path):
    compose_dir = deploy_copy / "deploy/compose"
    (compose_dir / "docker-compose.override.yml").write_text(readme_compose_override())
    proc = subprocess.run([tool("docker-compose"), "--profile", "cpu", "config"], cwd=compose_dir,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    service = yaml.safe_load(proc.stdout)["services"]["cellserve-cpu"]
    mounts = {}
    for vol in service["volumes"]:
        source, target = (vol["source"], vol["target"]) if isinstance(vol, dict) else vol.split(":")[:2]
        mounts[target] = source
    env = {k: str(v) for k, v in service["environment"].items()}
    files = {k: v for k, v in env.items() if k.endswith("_FILE")}
    assert set(files) == {f"CELLSERVE_{name}" for name in REQUIRED_FILES}
    for key, path in files.items():  # each under a mounted directory; stand-ins so FilePath settings parse
        assert path.rsplit("/", 1)[0] in mounts, f"{key}={path} is not under a mounted directory"
        local = tmp_path / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("stand-in\n")
        env[key] = str(local)
    assert settings_env_problems(env, monkeypatch) == []
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "cellserve", "health"]
    build_parser().parse_args(test[2:])
    assert _flags(test)["--tls-root-cert"].rsplit("/", 1)[0] in mounts
