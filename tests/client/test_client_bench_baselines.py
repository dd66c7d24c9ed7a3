"""The bench's baselines do the real work: the echo server returns cellserve-sized replies, the naive
server runs the model from the state the client sends, and raw ORT counts calls honestly."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import numpy as np

from cellserve.client.bench.baselines import echo, naive
from cellserve.client.bench.baselines.onnx_model import OnnxModel
from cellserve.client.bench.baselines.ort import ort_ceiling
from cellserve.client.bench.baselines.sizes import message_sizes
from cellserve.client.bench.metrics_scrape import histogram


def test_echo_replies_with_the_requested_size():
    spec = SimpleNamespace(t=4, input_kind="tokens", input_size=256, output_size=256)
    req_size, reply_size = message_sizes(spec)
    assert reply_size > 4 * 256 * 4 > req_size  # [T, V] float32 logits dominate the reply

    async def main() -> list[int]:
        server, port = await echo.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.stream_stream(echo.METHOD, request_serializer=bytes, response_deserializer=bytes)()
                sizes = []
                for n in (reply_size, 10, reply_size):
                    await call.write(echo.echo_request(req_size, n))
                    sizes.append(len(await call.read()))
                await call.done_writing()
                return sizes
        finally:
            await server.stop(0)

    assert asyncio.run(main()) == [reply_size, 10, reply_size]


def test_naive_server_carries_state_through_the_client(tiny_model_dir, tiny_oracle):
    model = OnnxModel.load(tiny_model_dir)
    tokens = np.arange(10, 16, dtype=np.int64)[None, :]  # [1, 6]
    n_state = model.layers * model.hidden
    shape = (model.layers, 1, model.hidden)

    async def main() -> np.ndarray:
        server, port = await naive.start(tiny_model_dir)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                method = ch.unary_unary(naive.METHOD, request_serializer=bytes, response_deserializer=bytes)
                h, c = model.zero_state(1)
                ys = []
                for chunk in (tokens[:, :2], tokens[:, 2:3], tokens[:, 3:]):
                    y, h, c = naive.decode_reply(await method(naive.encode_request(chunk, h, c)), n_state)
                    h, c = h.reshape(shape), c.reshape(shape)
                    ys.append(y.reshape(chunk.shape[1], model.output_size))
                return np.concatenate(ys)
        finally:
            await server.stop(0)

    h0, c0 = tiny_oracle.init_state(1)
    want, _, _ = tiny_oracle.run(tokens, h0, c0)
    np.testing.assert_allclose(asyncio.run(main()), want[0], atol=1e-5)


def test_ort_ceiling_runs_the_requested_batch_and_t(tiny_model_dir):
    r = ort_ceiling(OnnxModel.load(tiny_model_dir), batch=3, t=2, seconds=0.05)
    assert (r.batch, r.t) == (3, 2) and r.calls >= 5
    assert np.isclose(r.steps_per_s, 6 / r.s_per_call)


def test_histogram_totals_filter_by_model():
    text = "\n".join(
        [
            "# TYPE cellserve_batch_size histogram",
            'cellserve_batch_size_bucket{le="1.0",model="a"} 3.0',
            'cellserve_batch_size_sum{model="a"} 10.0',
            'cellserve_batch_size_count{model="a"} 4.0',
            'cellserve_batch_size_sum{model="b"} 5.0',
            'cellserve_batch_size_count{model="b"} 5.0',
        ]
    )
    assert histogram(text, "cellserve_batch_size", "a").mean == 2.5
    assert histogram(text, "cellserve_batch_size").mean == 15 / 9
    assert histogram(text, "cellserve_engine_run_seconds").mean is None


def test_sweep_covers_the_streams_by_t_grid_and_single_runs_one_config():
    import argparse

    from cellserve.client.bench.options import add_bench_flags
    from cellserve.client.bench.runner import bench_configs

    p = argparse.ArgumentParser()
    add_bench_flags(p)
    grid = bench_configs(p.parse_args(["--sweep"]))
    assert sorted(grid) == sorted((s, t) for s in (1, 16, 64, 256) for t in (1, 32))
    assert bench_configs(p.parse_args(["--streams", "5", "-T", "3"])) == [(5, 3)]


def test_bench_refuses_baselines_on_a_different_model_than_the_server_serves(running_server, tmp_path):
    """Against a running server, --model-dir must hold the served model: baselines run the same file."""
    import json
    import shutil

    from cellserve.server.cli import main as cellserve_main

    with running_server() as srv:
        other = tmp_path / "other"
        shutil.copytree(srv.server.settings.model_dirs[0], other)
        manifest = json.loads((other / "manifest.json").read_text())
        manifest["sha256"] = "0" * 64
        (other / "manifest.json").write_text(json.dumps(manifest))
        argv = ["bench", "--server", srv.address, "--model-dir", str(other), "--baselines", "ort", "--no-progress",
                "--out", str(tmp_path / "out")]  # fmt: skip
        assert cellserve_main(argv) == 2
    assert not (tmp_path / "out" / "bench.json").exists()


def test_the_bench_tells_an_output_from_every_other_reply_by_its_first_byte():
    from cellserve.client.bench.load import OUTPUT_TAG, _described
    from cellserve.server.tensors import encode_output
    from cellserve.v1 import cellserve_pb2 as pb

    assert encode_output(7, np.zeros((1, 4), np.float32))[:1] == OUTPUT_TAG
    assert pb.StreamResponse(output=pb.Output()).SerializeToString()[:1] == OUTPUT_TAG
    for kind in ("opened", "snapshot", "closed", "error", "draining"):
        reply = pb.StreamResponse()
        getattr(reply, kind).SetInParent()
        assert reply.SerializeToString()[:1] != OUTPUT_TAG, kind
    refused = pb.StreamResponse(error=pb.StepError(seq=3, message="token id 999 is out of range")).SerializeToString()
    assert "token id 999 is out of range" in _described(refused)
