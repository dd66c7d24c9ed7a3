"""What operators touch: health, reflection, metrics, the serve CLI, and a client nobody here wrote."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from stream_helpers import run_session

from cellserve.server.app import build_server
from cellserve.server.settings import Settings
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def health_status(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_is_serving_overall_and_per_model(running_server):
    with running_server() as srv:
        assert health_status(srv.address, "") == health_pb2.HealthCheckResponse.SERVING
        assert health_status(srv.address, "tiny") == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            health_status(srv.address, "unknown-model")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_is_not_serving_until_models_are_warm(tiny_model_dir):
    """While the server starts (models loaded and warmed, services being added) health is NOT_SERVING."""
    from prometheus_client import CollectorRegistry

    seen: list[int] = []

    def hook(grpc_server, cell) -> list[str]:  # runs inside start(), after warm-up, before SERVING
        seen.append(cell.health.status)
        return []

    async def main() -> list[int]:
        settings = Settings(model_dirs=[tiny_model_dir], host="127.0.0.1", port=0, metrics_port=0)
        server = build_server(settings, CollectorRegistry())
        server.add_servicer(hook)
        await server.start()
        after = await server.health.servicer.Check(health_pb2.HealthCheckRequest(service="tiny"), None)
        await server.stop(0)
        stopped = await server.health.servicer.Check(health_pb2.HealthCheckRequest(service=""), None)
        return [after.status, stopped.status]

    statuses = asyncio.run(main())
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert seen == [not_serving]
    assert statuses == [serving, not_serving]


def test_list_models_and_model_info(running_server):
    with running_server() as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.CellServeStub(ch)
        listed = stub.ListModels(pb.ListModelsRequest())
        assert [m.name for m in listed.models] == ["tiny"]
        assert (listed.worker, listed.workers) == (0, 1)  # one process: worker 0 of 1
        info = stub.ModelInfo(pb.ModelInfoRequest(model="tiny"))
        assert info.model.layers == 2 and info.model.hidden == 32 and info.model.input_kind == "tokens"
        assert json.loads(info.manifest_json)["sha256"] == info.model.sha256
        assert {t.role for t in info.model.inputs} == {"input", "state_h", "state_c"}
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfo(pb.ModelInfoRequest(model="nope"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_endpoint_counts_what_the_test_sent(running_server):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, size=n, dtype=np.int64) for n in (5, 11, 17)]
    with running_server() as srv:

        async def main() -> None:
            await asyncio.gather(*(run_session(srv.address, s, [len(s)], __import__("random").Random(0)) for s in seqs))

        asyncio.run(main())
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }
    tiny = (("model", "tiny"),)
    assert samples[("cellserve_steps_total", tiny)] == 5 + 11 + 17
    assert samples[("cellserve_sessions_opened_total", tiny)] == 3
    assert samples[("cellserve_sessions_closed_total", (("model", "tiny"), ("reason", "client")))] == 3
    assert samples[("cellserve_sessions_active", tiny)] == 0
    assert samples[("cellserve_step_latency_seconds_count", tiny)] == 3
    assert samples[("cellserve_state_pool_slots", (("model", "tiny"), ("state", "free")))] == 4096
    assert samples[("cellserve_state_pool_bytes", tiny)] == 2 * 2 * 4096 * 32 * 4
    assert ("cellserve_build_info", (("version", "0.1.0"),)) in samples


def test_serve_help_lists_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "cellserve.server.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out, name
        assert "CELLSERVE_" + name.upper() in out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], "--port"),
        (["--capacity", "zero"], "--capacity"),
        (["--device", "tpu"], "invalid choice"),
        (["--model-dirs", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
def test_bad_serve_flags_give_a_one_line_error(args, words):
    proc = subprocess.run(
        [sys.executable, "-m", "cellserve.server.cli", "serve", "--metrics-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and words in error_lines[0], proc.stderr


def _grpcurl(address: str, *args: str, flags: tuple[str, ...] = (), stdin: str | None = None) -> str:
    """``grpcurl -plaintext [flags] address [args]`` (verbs and method names come after the address)."""
    proc = subprocess.run(
        [GRPCURL, "-plaintext", *flags, address, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(not Path(GRPCURL).exists(), reason="grpcurl binary not installed (dev extra)")
def test_grpcurl_lists_describes_checks_health_and_streams(running_server, tiny_oracle):
    with running_server() as srv:
        listed = _grpcurl(srv.address, "list")
        assert "cellserve.v1.CellServe" in listed and "grpc.health.v1.Health" in listed
        described = _grpcurl(srv.address, "describe", "cellserve.v1.CellServe")
        assert "rpc Stream ( stream .cellserve.v1.StreamRequest )" in described
        health = json.loads(_grpcurl(srv.address, "grpc.health.v1.Health/Check", flags=("-d", '{"service": "tiny"}')))
        assert health == {"status": "SERVING"}
        tokens = np.array([72, 105, 33], dtype=np.int64)
        requests = [
            {"open": {"model": "tiny"}},
            {
                "step": {
                    "seq": 1,
                    "input": {"dtype": "DTYPE_INT64", "shape": [3], "raw": base64.b64encode(tokens.tobytes()).decode()},
                }
            },
            {"close": {}},
        ]
        stdin = "\n".join(map(json.dumps, requests))
        out = _grpcurl(srv.address, "cellserve.v1.CellServe/Stream", flags=("-d", "@"), stdin=stdin)
    responses = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00")]
    assert list(responses[0]) == ["opened"] and list(responses[-1]) == ["closed"]
    output = responses[1]["output"]
    y = np.frombuffer(base64.b64decode(output["output"]["raw"]), dtype="<f4").reshape(3, 256)
    h, c = tiny_oracle.init_state(1)
    want, _, _ = tiny_oracle.run(tokens[None], h, c)
    np.testing.assert_allclose(y, want[0], atol=1e-5, rtol=0)


def readme_multiplex_example() -> str:
    """The JSON lines of README's grpcurl Multiplex example (between its heredoc's EOF markers)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- multiplex-grpcurl")[1]
    return block.split("<<'EOF'\n")[1].split("\nEOF\n")[0]


@pytest.mark.skipif(not Path(GRPCURL).exists(), reason="grpcurl binary not installed (dev extra)")
def test_grpcurl_runs_the_readme_multiplex_example(running_server, tiny_oracle):
    stdin = readme_multiplex_example()
    assert '"model"' not in stdin  # the example uses the server's default model: here tiny
    with running_server() as srv:
        out = _grpcurl(srv.address, "cellserve.v1.CellServe/Multiplex", flags=("-d", "@"), stdin=stdin)
    answers = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00")]
    assert [a["seq"] for a in answers] == ["1", "2", "3", "4"]
    assert [s["handle"] for s in answers[0]["opened"]["sessions"]] == [1, 2]
    ys = []
    for answer in answers[1:3]:
        tensor = answer["output"]["output"]
        ys.append(np.frombuffer(base64.b64decode(tensor["raw"]), "<f4").reshape([int(d) for d in tensor["shape"]]))
    # message 2: session 1 takes "h", session 2 "i"; message 3: session 2 takes "h" (its second step)
    np.testing.assert_allclose(ys[0][0], tiny_oracle.sequence([104]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ys[0][1], tiny_oracle.sequence([105]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ys[1][0], tiny_oracle.sequence([105, 104])[1:], atol=1e-5, rtol=0)
    assert not ys[1][1].any()  # handle 7's row: it failed
    assert answers[2]["errors"] == [
        {"index": 1, "code": 9, "message": "handle 7 names no open session on this stream (never opened, or closed)"}
    ]
    assert answers[3]["closed"]["handles"] == [1, 2] and answers[3]["closed"]["steps"] == ["1", "2"]
