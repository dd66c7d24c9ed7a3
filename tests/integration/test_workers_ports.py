"""A second server on a port that is taken (by a plain server, or by another server's workers) exits with one
line naming the address and the flag, with --workers 1 or 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cellserve.server.cli", "serve", "--host", "127.0.0.1", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_server_on_a_taken_port_exits_with_one_line_naming_it(spawn_server, tiny_model_dir, workers):
    first = spawn_server("--workers", "2")  # the port is shared on purpose by its own workers only
    taken = _serve("--model-dirs", str(tiny_model_dir), "--port", str(first.port), "--metrics-port", "0",
                   "--workers", workers)  # fmt: skip
    assert taken.returncode == 1
    lines = taken.stderr.strip().splitlines()
    assert len(lines) == 1, taken.stderr
    assert f"127.0.0.1:{first.port} is already in use" in lines[0] and "--port" in lines[0]
    metrics = _serve("--model-dirs", str(tiny_model_dir), "--port", "0", "--metrics-port", str(first.metrics_port),
                     "--metrics-host", "127.0.0.1", "--workers", workers)  # fmt: skip
    assert metrics.returncode == 1
    lines = metrics.stderr.strip().splitlines()
    assert len(lines) == 1, metrics.stderr
    assert f"127.0.0.1:{first.metrics_port} is already in use" in lines[0] and "--metrics-port" in lines[0]


def test_a_plain_second_server_on_a_plain_servers_port_is_refused(spawn_server, tiny_model_dir):
    first = spawn_server()
    taken = _serve("--model-dirs", str(tiny_model_dir), "--port", str(first.port), "--metrics-port", "0")
    assert taken.returncode == 1 and len(taken.stderr.strip().splitlines()) == 1, taken.stderr
    assert str(first.port) in taken.stderr and "Traceback" not in taken.stderr
