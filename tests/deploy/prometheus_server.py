"""A real Prometheus (Debian's `prometheus` binary) scraping one cellserve metrics port, and its HTTP API.

Used by test_prometheus_e2e (a `cellserve serve` process) and test_image (a container's published port).
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from deploy_checks import stop_process

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
HTTP_POLL_S = 0.2  # between polls of an HTTP API: there is no event to wait on


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unless_exited(proc: subprocess.Popen, condition: Callable[[], Any], what: str) -> Callable[[], Any]:
    """``condition`` for ``wait_until``, failing at once if ``proc`` exits first (a crash ends the wait)."""

    def check() -> Any:
        value = condition()
        if not value and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited ({proc.returncode}) while waiting for {what}")
        return value

    return check


@contextmanager
def prometheus_process(
    prometheus: str, metrics_port: int, tmp: Path, wait_until: Any, extra_args: tuple[str, ...] = ()
) -> Iterator[str]:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "cellserve"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn", *extra_args]
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = unless_exited(proc, lambda: http_ok(base + "/-/ready"), "prometheus /-/ready")
        wait_until(ready, 60, poll_s=HTTP_POLL_S, what="prometheus /-/ready")
        yield base
    finally:
        stop_process(proc)
        log.close()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def api(base: str, path: str, **params: str) -> Any:
    """GET a Prometheus API path; returns ``data``, raises with Prometheus's error text otherwise."""
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    if body.get("status") != "success":
        raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(base: str, expr: str) -> list[dict[str, Any]]:
    data = api(base, "/api/v1/query", query=expr)
    assert data["resultType"] == "vector", (expr, data["resultType"])
    return data["result"]
