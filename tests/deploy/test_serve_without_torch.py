"""The serving image's dependency set is enough: a clean venv with the wheel + `serve` extra, no torch.

Builds the wheel from the same sources the Dockerfile's builder stage copies (into tmp_path, so the
shared tree is untouched), installs it with its `serve` extra into a fresh venv through pip's configured
indexes, checks `import torch` fails there, then starts `cellserve serve` from that venv and gets
SERVING from grpc.health.v1, both with the venv's own `cellserve health` (the image's HEALTHCHECK) and
with a health stub from the test. In between, that venv's `cellserve import-onnx` imports the tiny model's
ONNX file as a second model, and the server serves both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import grpc
import pytest
from deploy_checks import BUILD_INPUTS, stop_process  # BUILD_INPUTS: what the Dockerfile's builder copies
from grpc_health.v1 import health_pb2, health_pb2_grpc
from waiting import ready_info

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def check(cmd: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(), check=False, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    # An isolated build, as the image's builder does: build requirements come from pip's indexes.
    check([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)], timeout=300)
    (wheel,) = (tmp / "dist").glob("cellserve-*.whl")
    return wheel


def test_serve_extra_serves_without_torch(tiny_model_dir, tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "cellserve/v1/cellserve_pb2.py" in names and "cellserve/server/app.py" in names
    if (REPO / "model/default/manifest.json").exists():
        assert "cellserve/model/default/manifest.json" in names, "the shipped model must be package data"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py, bin_dir = env_dir / "bin/python", env_dir / "bin"
    # pip's configured indexes/find-links (pip.conf); the wheel's `serve` extra decides what comes in.
    check([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[serve]"], timeout=600)

    no_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True, env=clean_env(),
                              timeout=60, check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    check([str(py), "-c", "import onnxruntime, grpc, prometheus_client, pydantic_settings"], timeout=60)

    # The serving image can import a user's ONNX LSTM (import-onnx needs no torch and no onnx) and serve it.
    no_onnx = subprocess.run([str(py), "-c", "import onnx"], capture_output=True, text=True, env=clean_env(),
                             timeout=60, check=False)  # fmt: skip
    assert no_onnx.returncode != 0, "the serve extra should not install onnx"
    imported = tmp_path / "imported"
    check([str(bin_dir / "cellserve"), "import-onnx", str(tiny_model_dir / "model.onnx"), "--out", str(imported),
           "--name", "imported"], timeout=120)  # fmt: skip

    ready = tmp_path / "ready.json"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(bin_dir / "cellserve"), "serve", "--model-dirs", str(tiny_model_dir), "--model-dirs", str(imported),
         "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--grace-s", "1", "--ready-file", str(ready)],
        stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
    )
    try:
        info = ready_info(ready, server, 90, (tmp_path / "serve.log").read_text)
        address = f"127.0.0.1:{info['port']}"

        check([str(bin_dir / "cellserve"), "health", "--server", address], timeout=60)
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop_process(server, timeout_s=20)
        log.close()
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()
