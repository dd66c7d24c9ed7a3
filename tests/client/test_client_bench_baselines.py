"""The bench's baselines do the real work: the echo server returns cellserve-sized replies, the naive
server runs the model from the state the client sends, and raw ORT counts calls honestly."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from cellserve.client.bench.baselines import echo, naive
from cellserve.client.bench.baselines.onnx_model import OnnxModel
from cellserve.client.bench.baselines.ort import ort_ceiling
from cellserve.client.bench.baselines.sizes import message_sizes
from cellserve.client.bench.load import DYNAMIC_DIM, LoadSpec
from cellserve.client.bench.metrics_scrape import histogram


def _spec(**overrides: object) -> LoadSpec:
    fields: dict = {"target": "echo", "address": "", "model": "m", "streams": 1, "t": 4, "input_kind": "tokens",
                    "input_size": 256, "output_size": 256, "layers": 2, "hidden": 32, "warmup_s": 0.0,
                    "duration_s": 0.0, "messages_per_stream": 1, "seed": 0}  # fmt: skip
    return LoadSpec(**{**fields, **overrides})


def test_echo_replies_with_the_requested_size():
    req_size, reply_size = message_sizes(_spec())
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


def test_message_sizes_follow_the_models_dtype_frame_and_output():
    """float16 x is half the bytes of float32; a dynamic frame dim is sent at the example's size; a per-frame
    model's output [T, 1] is far smaller than an LSTM's [T, V]."""
    f32 = _spec(input_kind="features", input_size=0, input_dtype="float32", frame=(-1, 8), output_frame=(1,), t=32)
    f16 = _spec(input_kind="features", input_size=0, input_dtype="float16", frame=(-1, 8), output_frame=(1,), t=32)
    wide = _spec(input_kind="features", input_size=0, input_dtype="float32", frame=(-1, 8), output_frame=(1,), t=32,
                 example=(100, 8))  # fmt: skip
    assert f32.step_shape() == (32, DYNAMIC_DIM, 8) and wide.step_shape() == (32, 100, 8)
    (r32, y32), (r16, y16), (rwide, _) = message_sizes(f32), message_sizes(f16), message_sizes(wide)
    assert r32 - r16 == pytest.approx(32 * DYNAMIC_DIM * 8 * 2, abs=16)  # the raw bytes, give or take a header
    assert rwide - r32 == pytest.approx(32 * (100 - DYNAMIC_DIM) * 8 * 4, abs=16)
    assert y32 == y16 < 32 * 4 + 32  # y is float32 [T, 1] whatever x is
    assert _spec().session_state_bytes == 2 * 2 * 32 * 4  # an LSTM caller that gives no state size: h and c


def test_naive_server_carries_state_through_the_client(tiny_model_dir, tiny_oracle):
    model = OnnxModel.load(tiny_model_dir)
    tokens = np.arange(10, 16, dtype=np.int64)[None, :]  # [1, 6]
    n_state = model.session_state_bytes
    assert n_state == 2 * model.lstm["layers"] * model.lstm["hidden"] * 4  # h and c, float32

    async def main() -> tuple[np.ndarray, bytes]:
        server, port = await naive.start(tiny_model_dir)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                method = ch.unary_unary(naive.METHOD, request_serializer=bytes, response_deserializer=bytes)
                state = bytes(n_state)
                ys = []
                for chunk in (tokens[:, :2], tokens[:, 2:3], tokens[:, 3:]):
                    request = naive.encode_request(chunk, state)
                    assert len(request) == 4 + chunk.nbytes + n_state  # uint32 T, x, h, c: the LSTM's format
                    y, state = naive.decode_reply(await method(request), n_state)
                    ys.append(y.reshape(chunk.shape[1], -1))
                return np.concatenate(ys), state
        finally:
            await server.stop(0)

    h0, c0 = tiny_oracle.init_state(1)
    want, hn, cn = tiny_oracle.run(tokens, h0, c0)
    y, state = asyncio.run(main())
    np.testing.assert_allclose(y, want[0], atol=1e-5)
    h, c = np.frombuffer(state, "<f4").reshape(2, *hn.shape)  # the state the client carried: h' then c'
    np.testing.assert_allclose(h, hn, atol=1e-5)
    np.testing.assert_allclose(c, cn, atol=1e-5)


def test_ort_ceiling_runs_the_requested_batch_and_t(tiny_model_dir):
    r = ort_ceiling(OnnxModel.load(tiny_model_dir), batch=3, t=2, seconds=0.05)
    assert (r.batch, r.t, r.fixed_batch) == (3, 2, None) and r.calls >= 5
    assert np.isclose(r.steps_per_s, 6 / r.s_per_call)
    assert r.to_json()["fixed_batch"] is None


def test_onnx_model_reads_a_format_1_manifest_as_our_lstm(tiny_model_dir, tmp_path):
    """An older export's manifest (format 1) gives the same model: h and c [L, B, H], names by role."""
    import json
    import shutil

    from manifest_helpers import format1_dict

    from cellserve.model.manifest import load_manifest

    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    (old / "manifest.json").write_text(json.dumps(format1_dict(load_manifest(tiny_model_dir))))
    a, b = OnnxModel.load(tiny_model_dir), OnnxModel.load(old)
    assert (b.states, b.vocab, b.time_axis, b.lstm, b.consts) == (a.states, a.vocab, True, a.lstm, {})
    assert [s.batch_axis for s in b.states] == [1, 1] and b.step_frame == a.step_frame == ()
    rng = np.random.default_rng(0)
    x = a.sample_input(rng, 2, 3)
    ya, sa = a.run(x, a.zero_states(2))
    yb, sb = b.run(x, b.zero_states(2))
    np.testing.assert_array_equal(ya, yb)
    assert all(np.array_equal(p, q) for p, q in zip(sa, sb, strict=True))


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
