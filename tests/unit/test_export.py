"""ONNX export: graph contract, parity with torch and the oracle, manifest, refusal of tampered files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cellserve.model.export import ExportError, check_parity, export_onnx, export_random_model
from cellserve.model.manifest import ManifestError, load_manifest
from cellserve.model.model import LSTMConfig, LSTMModel, load_checkpoint
from cellserve.model.reference import ReferenceLSTM

GRID = [(b, t) for b in (1, 3, 64) for t in (1, 7, 128)]


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features-model")
    export_random_model(out, name="feat", input_kind="features", input_size=5, output_size=3, layers=3, hidden=20)
    return out


def _session(model_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])


def _feeds(cfg: LSTMConfig, batch: int, steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if cfg.input_kind == "tokens":
        x = rng.integers(0, cfg.input_size, size=(batch, steps), dtype=np.int64)
    else:
        x = rng.standard_normal((batch, steps, cfg.input_size)).astype(np.float32)
    shape = (cfg.layers, batch, cfg.hidden)
    return {
        "x": x,
        "h0": rng.standard_normal(shape).astype(np.float32),
        "c0": rng.standard_normal(shape).astype(np.float32),
    }


@pytest.mark.parametrize("kind", ["tokens", "features"])
def test_onnx_matches_torch_and_oracle_over_the_grid(kind: str, tiny_model_dir: Path, features_dir: Path) -> None:
    model_dir = tiny_model_dir if kind == "tokens" else features_dir
    model, _ = load_checkpoint(model_dir / "checkpoint.pt")
    oracle = ReferenceLSTM.from_torch(model)
    sess = _session(model_dir)
    rng = np.random.default_rng(42)
    for batch, steps in GRID:
        feeds = _feeds(model.cfg, batch, steps, rng)
        got = sess.run(["y", "hn", "cn"], feeds)
        with torch.no_grad():
            y, (hn, cn) = model(
                *[torch.from_numpy(feeds["x"])], (torch.from_numpy(feeds["h0"]), torch.from_numpy(feeds["c0"]))
            )
        want = oracle.run(feeds["x"], feeds["h0"], feeds["c0"])
        for name, g, t, o in zip(("y", "hn", "cn"), got, (y, hn, cn), want, strict=True):
            assert g.shape == tuple(t.shape) == o.shape, (name, batch, steps)
            assert np.max(np.abs(g - t.numpy())) <= 1e-5, f"ONNX vs torch {name} B={batch} T={steps}"
            assert np.max(np.abs(g - o)) <= 1e-5, f"ONNX vs oracle {name} B={batch} T={steps}"


@pytest.mark.parametrize("kind", ["tokens", "features"])
def test_graph_has_named_io_dynamic_batch_and_time(kind: str, tiny_model_dir: Path, features_dir: Path) -> None:
    model_dir = tiny_model_dir if kind == "tokens" else features_dir
    graph = onnx.load(str(model_dir / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: i for i in graph.graph.input}
    outputs = {o.name: o for o in graph.graph.output}
    assert list(inputs) == ["x", "h0", "c0"] and list(outputs) == ["y", "hn", "cn"]

    def dims(v: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert dims(inputs["x"])[:2] == ["B", "T"]
    assert dims(inputs["h0"])[1] == "B" and dims(outputs["cn"])[1] == "B"
    assert dims(outputs["y"])[:2] == ["B", "T"]
    x_type = inputs["x"].type.tensor_type.elem_type
    assert x_type == (onnx.TensorProto.INT64 if kind == "tokens" else onnx.TensorProto.FLOAT)


def test_manifest_describes_the_graph(tiny_model) -> None:
    m = tiny_model.manifest
    assert load_manifest(tiny_model.dir) == m
    assert (m.input_kind, m.input_size, m.output_size, m.layers, m.hidden) == ("tokens", 256, 256, 2, 32)
    assert [(t.name, t.role) for t in m.inputs] == [("x", "input"), ("h0", "state_h"), ("c0", "state_c")]
    assert [(t.name, t.role) for t in m.outputs] == [("y", "output"), ("hn", "next_state_h"), ("cn", "next_state_c")]
    assert m.tensor("input").dtype == "int64" and m.tensor("input").shape == ["B", "T"]
    assert m.tensor("state_h").shape == [2, "B", 32]
    assert m.tensor("output").shape == ["B", "T", 256]
    assert {"torch", "onnx", "onnxruntime", "numpy", "python"} <= set(m.versions)
    assert m.created_at and m.training["parity_max_scaled_diff"] <= 1e-5


def test_feature_manifest_declares_float_features(features_dir: Path) -> None:
    m = load_manifest(features_dir)
    assert m.input_kind == "features"
    assert m.tensor("input").dtype == "float32" and m.tensor("input").shape == ["B", "T", 5]
    assert m.tensor("output").shape == ["B", "T", 3] and m.layers == 3


def test_tampered_onnx_is_refused_with_a_clear_message(tiny_model_dir: Path, tmp_path: Path) -> None:
    for name in ("model.onnx", "manifest.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    data = bytearray((tmp_path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    (tmp_path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.onnx has sha256 .* changed after export"):
        load_manifest(tmp_path)
    assert load_manifest(tmp_path, verify=False).name == "tiny"


def test_parity_check_fails_loudly_for_a_graph_of_another_model(tiny_model_dir: Path) -> None:
    torch.manual_seed(123)
    other = LSTMModel(LSTMConfig("tokens", 256, 256, layers=2, hidden=32, embed=16)).eval()
    with pytest.raises(ExportError, match="parity check failed: output 'y'"):
        check_parity(other, tiny_model_dir / "model.onnx")


def test_export_records_training_info_and_version(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LSTMModel(LSTMConfig(layers=1, hidden=8, embed=4))
    m = export_onnx(model, tmp_path, name="small", version="7", training={"held_out_bpb": 3.5})
    again = load_manifest(tmp_path)
    assert again == m and again.version == "7" and again.training["held_out_bpb"] == 3.5


def test_checkpoint_holds_only_tensors_and_plain_data(tiny_model_dir: Path) -> None:
    payload = torch.load(tiny_model_dir / "checkpoint.pt", weights_only=True)
    assert set(payload) == {"state_dict", "config"}
    assert payload["config"] == {"input_kind": "tokens", "input_size": 256, "output_size": 256, "layers": 2,
                                 "hidden": 32, "embed": 16}  # fmt: skip


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        LSTMConfig(hidden=0)
    with pytest.raises(ValueError, match="input_kind"):
        LSTMConfig(input_kind="images")  # type: ignore[arg-type]
