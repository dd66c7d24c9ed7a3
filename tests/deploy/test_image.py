"""The serving images, built and run: deploy/image/build.sh builds both (podman, a debootstrapped Debian
bookworm base, no registry), then the CPU image is checked from outside as an operator would run it —
read-only root, a tmpfs /tmp, no capabilities, ports on loopback only:

- health SERVING through the published port; the image's HEALTHCHECK reports healthy;
- an SDK session of 100 tokens on the shipped model equals the numpy oracle (its weights read from the
  image's own /models/default ONNX file, onnx_oracle.py);
- the real Prometheus scrapes /metrics through the published metrics port;
- the server is PID 1 as uid 10001, and the root filesystem refuses writes;
- `podman stop` drains: a session moves to a second container of the image with the same token keys and
  still equals the oracle;

the GPU image (CUDA from NVIDIA's wheels) serves with --device cpu, its CUDA libraries are all there, and
--device cuda on this GPU-less machine fails with one line naming the device; both images export a span to an
OTLP receiver (the `otel` extra); and no image carries the host's CA bundle, pip configuration or mirror names.

Where build.sh cannot run (not Linux, not root, no podman) the tests skip with its one-line reason; under
CI they fail instead (.ci/run installs podman, runc and debootstrap).
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import yaml
from containers import RUN_SECURE, Container, Images, Podman, build_images, health, serving_or_exited
from deploy_checks import render
from onnx_oracle import reference_from_onnx
from prometheus_server import HTTP_POLL_S, prometheus_process, query
from waiting import WaitUntil

from cellserve.client import Client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # a first build on a fresh machine takes minutes

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
USER = "10001"
START_S = 90  # container start to SERVING (engine warm-up), generous for a busy 2-core machine
# float32 ONNX Runtime vs the float64 oracle over 100 steps of the 2x256 shipped model: ~2e-5 measured here
ATOL = 1e-4
KEYS = '{"active": "k1", "keys": {"k1": "' + "5a" * 32 + '"}}'  # test keys, shared by both containers
# Debian's and PyPI's public names: what an image may name; any other mirror the host uses it must not.
PUBLIC_HOSTS = {"deb.debian.org", "security.debian.org", "pypi.org", "files.pythonhosted.org"}


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    log = tmp_path_factory.mktemp("image-build") / "build.log"
    built = build_images(log)
    if isinstance(built, str):
        if os.environ.get("CI") == "true":
            pytest.fail(f"deploy/image/build.sh skipped under CI: {built}")
        pytest.skip(built)
    return built


@pytest.fixture(scope="module")
def podman(images: Images) -> Podman:
    return Podman(images.containers_conf)


@pytest.fixture(scope="module")
def cpu_server(images: Images, podman: Podman) -> Iterator[Container]:
    """One CPU container for the checks that do not stop it."""
    with podman.container(images.cpu, "--capacity", "64", run_args=RUN_SECURE) as c:
        WaitUntil()(lambda: serving_or_exited(c), START_S, poll_s=HTTP_POLL_S, what=lambda: c.logs())
        yield c


@pytest.fixture(scope="module")
def shipped_oracle(cpu_server: Container, podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The oracle of the model the image ships, read out of the image (manifest.json + ONNX)."""
    out = tmp_path_factory.mktemp("shipped-model")
    podman("cp", f"{cpu_server.name}:/models/default/.", str(out))
    return reference_from_onnx(out)


def step_tokens(session: Any, tokens: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Step ``tokens`` in chunks of 1-9; the outputs, one [T, O] array per chunk."""
    outputs, at = [], 0
    while at < len(tokens):
        n = int(rng.integers(1, 10))
        outputs.append(session.step(tokens[at : at + n]))
        at += n
    return outputs


# -- the oracle ----------------------------------------------------------------------------------------


def test_onnx_oracle_is_the_checkpoint_oracle(tiny_model, tiny_oracle):
    """The ONNX initializers, mapped back to nn.LSTM's layout, give exactly the checkpoint's oracle."""
    x = np.random.default_rng(1).integers(0, 256, size=64)
    np.testing.assert_array_equal(reference_from_onnx(tiny_model.dir).sequence(x), tiny_oracle.sequence(x))


# -- the CPU image -------------------------------------------------------------------------------------


def test_cpu_image_is_serving_on_its_loopback_port_with_the_shipped_model(cpu_server):
    assert health(cpu_server.address) == "SERVING"
    with Client(cpu_server.address) as client:
        assert [m.name for m in client.list_models()] == ["pychar"]


def test_cpu_image_session_of_100_tokens_equals_the_oracle(cpu_server, shipped_oracle):
    rng = np.random.default_rng(27)
    tokens = rng.integers(0, 256, size=100, dtype=np.int64)
    with Client(cpu_server.address) as client, client.session() as s:
        outputs = step_tokens(s, tokens, rng)
    np.testing.assert_allclose(np.concatenate(outputs), shipped_oracle.sequence(tokens), atol=ATOL, rtol=0)


def test_cpu_image_metrics_are_scraped_by_prometheus(cpu_server, tool, tmp_path, wait_until):
    metrics_port = cpu_server.port(9090)
    with Client(cpu_server.address) as client, client.session() as s:
        s.step(np.arange(12, dtype=np.int64))
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = re.findall(r'^cellserve_steps_total\{[^}]*model="pychar"[^}]*\} (\S+)$', text, re.M)
    exposed = sum(float(v) for v in samples)
    assert exposed >= 12, text[:2000]
    with prometheus_process(tool("prometheus"), metrics_port, tmp_path, wait_until) as prom:

        def scraped() -> bool:
            result = query(prom, 'sum(cellserve_steps_total{job="cellserve", model="pychar"})')
            return bool(result) and float(result[0]["value"][1]) == exposed

        wait_until(scraped, 60, poll_s=HTTP_POLL_S, what=f"prometheus to scrape cellserve_steps_total == {exposed}")
        (up,) = query(prom, 'up{job="cellserve"}')
        assert up["value"][1] == "1"


def test_cpu_image_runs_as_non_root_on_a_read_only_root(cpu_server, images, podman):
    assert podman.inspect_image(images.cpu)["Config"]["User"] == f"{USER}:{USER}"
    status = cpu_server.exec("cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
    assert set(uids) == {USER} and set(gids) == {USER}, status
    cmdline = cpu_server.exec("cat", "/proc/1/cmdline").stdout.split("\0")
    assert cmdline[1:3] == ["/opt/cellserve/bin/cellserve", "serve"], cmdline  # the server is PID 1
    assert cpu_server.state()["HostConfig"]["ReadonlyRootfs"] is True
    for path in ("/opt/cellserve/written", "/models/default/written", "/written"):
        refused = cpu_server.exec("touch", path, check=False)
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, (path, refused.stderr)
    assert cpu_server.exec("touch", "/tmp/written").returncode == 0  # the tmpfs the Dockerfile documents


def test_cpu_image_healthcheck_reports_healthy(cpu_server, images, podman):
    check = podman.inspect_image(images.cpu).get("Healthcheck") or {}  # podman: beside Config, not in it
    assert check.get("Test") == ["CMD", "cellserve", "health", "--server", "localhost:50051"], check
    run = podman("healthcheck", "run", cpu_server.name, check=False)
    state = cpu_server.state()["State"]
    status = (state.get("Health") or state.get("Healthcheck") or {}).get("Status")
    assert (run.returncode, status) == (0, "healthy"), (run.stdout, run.stderr, state)


def test_podman_stop_drains_a_session_to_a_second_container_exactly(
    images, podman, shipped_oracle, tmp_path, wait_until, caplog
):
    caplog.set_level(logging.INFO, logger="cellserve.client.core")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "token-keys.json").write_text(KEYS)
    keys.chmod(0o755)  # uid 10001 reads them through the read-only bind mount
    (keys / "token-keys.json").chmod(0o644)
    shared = (*RUN_SECURE, "-v", f"{keys}:/etc/cellserve/keys:ro",
              "-e", "CELLSERVE_TOKEN_KEYS_FILE=/etc/cellserve/keys/token-keys.json")  # fmt: skip
    rng = np.random.default_rng(2027)
    tokens = rng.integers(0, 256, size=100, dtype=np.int64)
    with podman.container(images.cpu, "--capacity", "8", run_args=shared) as a, \
            podman.container(images.cpu, "--capacity", "8", run_args=shared) as b:  # fmt: skip
        for c in (a, b):
            wait_until(lambda c=c: serving_or_exited(c), START_S, poll_s=HTTP_POLL_S, what=lambda c=c: c.logs())
        stop = None
        try:
            with Client([a.address, b.address]) as client, client.session() as s:
                outputs = step_tokens(s, tokens[:50], rng)
                assert s.target == a.address
                stop = subprocess.Popen(["podman", "stop", "--time", "60", a.name], env=podman.env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
                wait_until(lambda: health(a.address) != "SERVING", 30, poll_s=HTTP_POLL_S, what="a NOT_SERVING")
                outputs += step_tokens(s, tokens[50:], rng)
                assert s.target == b.address, "the session did not move to the second container"
            assert stop.wait(timeout=90) == 0, stop.stderr.read()
        finally:
            if stop is not None and stop.poll() is None:
                stop.kill()
                stop.wait()
        state, logs = a.state()["State"], a.logs()
        assert state["ExitCode"] == 0, logs  # SIGTERM -> drained -> exit 0, never podman's SIGKILL
        assert re.search(r"msg=drained .*left_within_grace=1 closed_at_grace_end=0", logs), logs
    np.testing.assert_allclose(np.concatenate(outputs), shipped_oracle.sequence(tokens), atol=ATOL, rtol=0)
    assert [r.getMessage() for r in caplog.records].count("session moved off a draining server") == 1


# -- the GPU image (CUDA from NVIDIA's wheels) ---------------------------------------------------------


def test_gpu_image_serves_with_device_cpu(images, podman, shipped_oracle):
    with podman.container(images.gpu, "--device", "cpu", "--capacity", "8", run_args=RUN_SECURE) as c:
        WaitUntil()(lambda: serving_or_exited(c), START_S, poll_s=HTTP_POLL_S, what=lambda: c.logs())
        tokens = np.arange(20, dtype=np.int64)
        with Client(c.address) as client, client.session() as s:
            y = s.step(tokens)
    np.testing.assert_allclose(y, shipped_oracle.sequence(tokens), atol=ATOL, rtol=0)


# What the GPU image's Python finds: onnxruntime's CUDA provider with every library it links (once
# onnxruntime.preload_dlls() has loaded NVIDIA's wheels), the server's own library check, and CuPy.
GPU_LIBRARY_PROBE = """
import json, os, subprocess
import onnxruntime as ort
ort.preload_dlls()
maps = open("/proc/self/maps").read().split()
dirs = sorted({os.path.dirname(p) for p in maps if "/site-packages/nvidia/" in p})
provider = os.path.join(os.path.dirname(ort.__file__), "capi", "libonnxruntime_providers_cuda.so")
ldd = subprocess.run(["ldd", provider], capture_output=True, text=True, env={"LD_LIBRARY_PATH": ":".join(dirs)})
from cellserve.server.engine import check_cuda_libraries
check_cuda_libraries()
import cupy
print(json.dumps({"providers": ort.get_available_providers(), "ldd": ldd.stdout, "cupy": cupy.__version__}))
"""


def test_gpu_image_has_every_cuda_library_but_the_driver(images, podman):
    out = podman("run", "--rm", *RUN_SECURE, "--entrypoint", "python3", images.gpu, "-c", GPU_LIBRARY_PROBE).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert "CUDAExecutionProvider" in probe["providers"]
    missing = re.findall(r"^\s*(\S+) => not found$", probe["ldd"], re.M)
    # libcuda.so.1 is the driver's: the NVIDIA container runtime mounts it from the host with the GPU.
    assert missing == ["libcuda.so.1"], probe["ldd"]


def test_gpu_image_with_device_cuda_and_no_gpu_fails_in_one_line_naming_the_device(images, podman, wait_until):
    with podman.container(images.gpu, "--device", "cuda", run_args=RUN_SECURE) as c:
        wait_until(lambda: not c.running(), START_S, poll_s=HTTP_POLL_S, what=lambda: c.logs())
        exit_code, logs = c.state()["State"]["ExitCode"], c.logs()
    errors = [line for line in logs.splitlines() if line.startswith("cellserve serve: error:")]
    assert exit_code == 1 and len(errors) == 1 and "Traceback" not in logs, logs
    (error,) = errors
    assert "device=cuda:0: no usable CUDA device" in error, error
    # a missing library would mean the image is incomplete
    assert not re.search(r"\.so\b|cannot open shared object|needs (cuDNN|cuBLAS|CuPy)", error), error


# -- tracing: the OpenTelemetry SDK and OTLP exporters in both images --------------------------------------

# otel_probe.py runs in each image, with its own Python (see its docstring).
OTEL_PROBE = (Path(__file__).parent / "otel_probe.py").read_text()


@pytest.mark.parametrize("which", ["cpu", "gpu"])
def test_image_exports_traces_with_the_otel_extra(images, podman, which):
    import tomllib

    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["otel"]
    image = getattr(images, which)
    run = podman("run", "--rm", *RUN_SECURE, "--entrypoint", "python3", image, "-c", OTEL_PROBE, json.dumps(pins))
    probe = json.loads(run.stdout.strip().splitlines()[-1])
    assert probe["spans"] == ["cellserve.session"], run.stderr
    assert probe["versions"] == dict(pin.split("==") for pin in pins)


# -- what the images carry -----------------------------------------------------------------------------


def test_compose_and_kubernetes_run_the_tags_build_sh_builds(tool):
    out = subprocess.run(["bash", str(DEPLOY / "image/build.sh"), "--print-tags"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    tags = dict(line.split("=", 1) for line in out.splitlines())
    compose = yaml.safe_load((DEPLOY / "compose/docker-compose.yml").read_text())["services"]
    for variant in ("cpu", "gpu"):
        assert compose[f"cellserve-{variant}"]["image"] == tags[f"{variant}_image"], variant
        docs = render(tool("kubectl"), DEPLOY / "k8s/overlays" / variant)
        (dep,) = [d for d in docs if d["kind"] == "Deployment"]
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert container["image"] == tags[f"{variant}_image"], variant


def _host_only_certificates() -> list[str]:
    """Lines of the host's CA bundle's certificates that no Debian package ships (a local or proxy CA)."""
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        return []
    pem = re.compile(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END CERTIFICATE-----", re.S)
    shipped = Path("/usr/share/ca-certificates").rglob("*.crt")
    packaged = {m.group(1) for f in shipped for m in pem.finditer(f.read_text())}
    # the second base64 line: inside the subject/issuer/serial, so one certificate's own
    return [m.group(1).splitlines()[1] for m in pem.finditer(bundle.read_text()) if m.group(1) not in packaged]


def _host_pip_and_mirror_values() -> list[str]:
    """Index, find-links and constraint values of the host's pip configuration and PIP_* variables, and the
    host names of its apt and pip mirrors (Debian's and PyPI's public names aside)."""
    values: list[str] = []
    files = [
        Path("/etc/pip.conf"),
        *Path("/etc/xdg/pip").glob("*.conf"),
        Path.home() / ".config/pip/pip.conf",
        Path.home() / ".pip/pip.conf",
        *(Path(p) for p in [os.environ.get("PIP_CONFIG_FILE", "")] if p),
    ]
    for f in [f for f in files if f.is_file()]:
        parser = configparser.ConfigParser()
        parser.read(f)
        values += [v for s in parser.sections() for k, v in parser[s].items() if k != "cert"]
    values += [v for k, v in os.environ.items() if k.startswith("PIP_") and k != "PIP_CERT" and "/" in v]
    hosts = {urlsplit(w).hostname for v in values for w in v.split() if "://" in w}
    sources = [*Path("/etc/apt").glob("sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for f in [f for f in sources if f.is_file()]:
        hosts |= {urlsplit(u).hostname for u in re.findall(r"\bhttps?://[^\s\]]+", f.read_text())}
    if os.environ.get("CELLSERVE_DEBIAN_MIRROR"):
        hosts.add(urlsplit(os.environ["CELLSERVE_DEBIAN_MIRROR"]).hostname)
    words = [w for v in values for w in v.split() if len(w) > 6 and "://" not in w]
    return sorted({*words, *(h for h in hosts if h and h not in PUBLIC_HOSTS)})


def _files_containing(root: Path, needles: list[bytes], max_bytes: int = 4 << 20) -> dict[str, str]:
    """{needle: a file under root holding it}, over every regular file up to ``max_bytes``."""
    found: dict[str, str] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > max_bytes:
                continue
            with open(path, "rb") as f:
                data = f.read()
            for needle in needles:
                if needle in data:
                    found.setdefault(needle.decode(), os.path.relpath(path, root))
    return found


@pytest.mark.parametrize("which", ["base", "cpu", "gpu"])
def test_image_carries_no_host_ca_pip_configuration_or_mirror(images, podman, which):
    image = getattr(images, which)
    config = podman.inspect_image(image)["Config"]
    assert not [e for e in config.get("Env") or [] if e.startswith("PIP_")], config["Env"]
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    needles = [*_host_only_certificates(), *_host_pip_and_mirror_values()]
    root = Path(podman("image", "mount", image).stdout.strip())
    try:
        assert [p for p in ("etc/pip.conf", "etc/xdg/pip", "root/.config/pip", "root/.pip", "opt/cellserve/pip.conf")
                if (root / p).exists()] == []  # fmt: skip
        assert (root / "etc/resolv.conf").read_text() == "" and (root / "etc/hostname").read_text() == ""
        sources = (root / "etc/apt/sources.list").read_text()
        assert set(re.findall(r"https?://([^/\s]+)", sources)) <= PUBLIC_HOSTS, sources
        bundle = (root / "etc/ssl/certs/ca-certificates.crt").read_text()
        packaged = "".join(f.read_text() for f in (root / "usr/share/ca-certificates").rglob("*.crt"))
        certs = re.findall(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END", bundle, re.S)
        strays = [c for c in certs if c not in packaged]
        assert strays == [], "the image's CA bundle has certificates no Debian package in it ships"
        found = _files_containing(root, [n.encode() for n in needles])
    finally:
        podman("image", "unmount", image, check=False)
    assert found == {}, f"host values found in {image}: {found}"
    assert [n for n in needles if n in history or n in json.dumps(config)] == []


def test_host_scan_finds_a_planted_host_certificate(tmp_path):
    """The scan above can fail: a copy of the host bundle planted in a tree is found."""
    needles = _host_only_certificates()
    if not needles:
        pytest.skip("this host's CA bundle has only Debian's certificates")
    (tmp_path / "etc/ssl").mkdir(parents=True)
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", tmp_path / "etc/ssl/cert.pem")
    assert set(_files_containing(tmp_path, [n.encode() for n in needles]).values()) == {"etc/ssl/cert.pem"}
