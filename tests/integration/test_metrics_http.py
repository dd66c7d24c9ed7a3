"""The metrics port serves /metrics only: an HTTP probe pointed at it elsewhere must fail, not pass."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from cellserve.server.metrics_http import start_metrics_server


def _get(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture
def metrics_server():
    registry = CollectorRegistry()
    Counter("probe_hits", "A counter the test increments.", registry=registry).inc(3)
    httpd = start_metrics_server("127.0.0.1", 0, registry)
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_metrics_path_serves_the_registry(metrics_server):
    status, body, headers = _get(metrics_server + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    values = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert values["probe_hits_total"] == 3
    # prometheus-client's exposition stays in charge: gzip and name filtering work.
    url = metrics_server + "/metrics?name[]=probe_hits_total"
    status, body, headers = _get(url, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert b"probe_hits_total 3.0" in gzip.decompress(body)


@pytest.mark.parametrize("path", ["/", "/healthz", "/v2/health/ready", "/metrics/extra", "/metricsx", "/readyz"])
def test_every_other_path_is_404_saying_where_metrics_and_health_are(metrics_server, path):
    status, body, _ = _get(metrics_server + path)
    assert status == 404
    text = body.decode()
    assert "/metrics" in text and "grpc.health.v1.Health/Check" in text
    assert "probe_hits" not in text
    assert _get(metrics_server + path, method="HEAD")[0] == 404


def test_server_metrics_port_answers_404_off_the_metrics_path(running_server):
    with running_server() as srv:
        base = f"http://127.0.0.1:{srv.metrics_port}"
        assert _get(base + "/metrics")[0] == 200 and b"cellserve_build_info" in _get(base + "/metrics")[1]
        assert _get(base + "/healthz")[0] == 404
