"""The image's runtime user has no home and a read-only root: the serving stack must import and serve anyway.

uid 10001 runs with HOME=/nonexistent and readOnlyRootFilesystem; only /tmp (a tmpfs/emptyDir) is
writable. CuPy (GPU image) writes ``~/.cupy/kernel_cache`` unless CUPY_CACHE_DIR points elsewhere, which
the image, the GPU overlay and compose set (checked in test_validate). Here the image's environment is
applied to a subprocess whose HOME cannot be created by anyone (it lies under a regular file, so even
root gets ENOTDIR): it imports the serving stack (and CuPy, where installed) and serves until SIGTERM.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from deploy_checks import dockerfile_env
from grpc_health.v1 import health_pb2, health_pb2_grpc

IMPORTS = "import cellserve.server, cellserve.server.app, cellserve.server.arrays, cellserve.server.engine"


def runtime_env(tmp_path: Path) -> dict[str, str]:
    """This interpreter's environment plus the image's (PATH and CELLSERVE_* aside), /tmp moved to tmp_path."""
    image = {k: v for k, v in dockerfile_env("").items() if k != "PATH" and not k.startswith("CELLSERVE_")}
    assert image["CUPY_CACHE_DIR"].startswith("/tmp/")
    image["CUPY_CACHE_DIR"] = str(tmp_path / image["CUPY_CACHE_DIR"].removeprefix("/tmp/"))
    blocker = tmp_path / "a-file"
    blocker.write_text("HOME lies under this regular file, so nothing can create it\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSERVE_")}
    return {**env, **image, "HOME": str(blocker / "home"), "XDG_CACHE_HOME": str(blocker / "home/.cache")}


def test_serving_stack_imports_with_an_unusable_home(tmp_path):
    env = runtime_env(tmp_path)
    code = IMPORTS
    if importlib.util.find_spec("cupy") is not None:  # GPU machines: the import that needs CUPY_CACHE_DIR
        code += "; import cupy"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not Path(env["HOME"]).exists()


def test_cellserve_serves_and_drains_with_an_unusable_home(spawn_server, tmp_path):
    env = runtime_env(tmp_path)
    server = spawn_server("--grace-s", "0", env=env)
    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    server.proc.send_signal(signal.SIGTERM)
    _, err = server.proc.communicate(timeout=60)
    assert server.proc.returncode == 0, err
    assert "Traceback" not in err and "Read-only" not in err and "Not a directory" not in err, err
