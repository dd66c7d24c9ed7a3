"""Podman for the image tests: build the images once (deploy/image/build.sh), run containers reachable on
loopback only, read their state, and always remove them.

Ports: every container port is published on 127.0.0.1 with the host port left to podman (``-p
127.0.0.1::50051``), read back with ``podman port``: no fixed ports, nothing on other interfaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
BUILD_SH = REPO / "deploy/image/build.sh"
SKIP_EXIT = 3  # build.sh: "skip: <reason>", nothing built
# The Dockerfile's run-time contract: a read-only root with a tmpfs on the /tmp volume, as compose and the
# Kubernetes manifests run it (plus what those add: no capabilities, no privilege escalation).
RUN_SECURE = ("--read-only", "--tmpfs", "/tmp:size=64m,mode=1777", "--cap-drop", "all",
              "--security-opt", "no-new-privileges")  # fmt: skip


@dataclass(frozen=True)
class Images:
    base: str
    cpu: str
    gpu: str
    containers_conf: str


def build_images(log: Path) -> Images | str:
    """Run build.sh (podman's output to ``log``): the images, or the one-line reason it skipped."""
    with log.open("w") as err:
        proc = subprocess.run(["bash", str(BUILD_SH)], stdout=subprocess.PIPE, stderr=err, text=True,
                              timeout=1500, check=False)  # fmt: skip
    if proc.returncode == SKIP_EXIT:
        return proc.stdout.strip().removeprefix("skip: ")
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise AssertionError(f"deploy/image/build.sh exited {proc.returncode}:\n{tail}")
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return Images(out["base_image"], out["cpu_image"], out["gpu_image"], out["containers_conf"])


class Podman:
    """``podman`` with build.sh's containers.conf (runc, ulimits the host allows)."""

    def __init__(self, containers_conf: str) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": containers_conf}

    def __call__(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env, timeout=timeout_s,
                              check=False)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def inspect_image(self, image: str) -> dict[str, Any]:
        return json.loads(self("image", "inspect", image).stdout)[0]

    @contextmanager
    def container(self, image: str, *serve_args: str, run_args: tuple[str, ...] = ()) -> Iterator[Container]:
        """A detached container of ``image`` (arguments after the image go to ``cellserve serve``), with its
        gRPC and metrics ports on loopback; removed (killed first if it still runs) however the test ends."""
        name = f"cellserve-test-{uuid.uuid4().hex[:12]}"
        self("run", "--detach", "--name", name, "-p", "127.0.0.1::50051", "-p", "127.0.0.1::9090",
             *run_args, image, *serve_args)  # fmt: skip
        try:
            yield Container(self, name)
        finally:
            self("rm", "--force", "--time", "0", name, check=False)


@dataclass
class Container:
    podman: Podman
    name: str

    def port(self, container_port: int) -> int:
        out = self.podman("port", self.name, f"{container_port}/tcp").stdout.strip()
        host, _, port = out.splitlines()[0].rpartition(":")
        assert host == "127.0.0.1", f"port {container_port} published on {host}, not loopback only"
        return int(port)

    @cached_property
    def address(self) -> str:
        """The gRPC address (read once: a stopping container no longer lists its ports)."""
        return f"127.0.0.1:{self.port(50051)}"

    def state(self) -> dict[str, Any]:
        return json.loads(self.podman("container", "inspect", self.name).stdout)[0]

    def running(self) -> bool:
        return bool(self.state()["State"]["Running"])

    def logs(self) -> str:
        proc = self.podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", self.name, *cmd, check=check)


def health(address: str, timeout_s: float = 2.0) -> str:
    """grpc.health.v1 status of the overall service "" at ``address`` ("UNREACHABLE" if it does not answer)."""
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=timeout_s)  # fmt: skip
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def serving_or_exited(container: Container) -> bool:
    """Poll for ``wait_until``: SERVING through the published port; fails at once if the container exited."""
    if health(container.address) == "SERVING":
        return True
    if not container.running():
        raise AssertionError(f"container {container.name} exited before SERVING:\n{container.logs()}")
    return False
