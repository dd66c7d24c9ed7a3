"""`cellserve import-onnx` on a user's own LSTM exported with plain torch.onnx.export: roles, checks, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import user_models as um

from cellserve.model.conformance import check_graph
from cellserve.model.contract import ContractError, RoleHints
from cellserve.model.importer import import_onnx
from cellserve.model.manifest import load_manifest, sha256_file
from cellserve.server.cli import main

# The `cellserve` entry point with torch and onnx made unimportable: import-onnx needs neither (serve extra only).
NO_TORCH = (
    "import sys; sys.modules.update(torch=None, onnx=None); from cellserve.server.cli import main; "
    "sys.exit(main(sys.argv[1:]))"
)


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main(["--log-level", "WARNING", "import-onnx", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_detects_unusual_names_prints_the_roles_and_writes_a_model_directory(sensor_onnx, tmp_path, capsys):
    out_dir = tmp_path / "sensor"
    rc, out, err = cli(capsys, sensor_onnx, "--out", out_dir, "--name", "sensor")
    assert rc == 0, err
    assert out.startswith("detected (set any of it with --input/--state/--output/--const/--batch-axis/--per-frame)")
    assert "  input    inp: float32 [B, T, 5], time axis  [rest; x and y share axis 1 ('time')]" in out
    assert "  state    h_in -> h_out: float32 [2, B, 16], batch axis 1  [name; axis: x's batch]" in out
    assert "  state    c_in -> c_out: float32 [2, B, 16], batch axis 1  [name; axis: x's batch]" in out
    assert "  output   out: float32 [B, T, 3]  [rest]" in out
    assert "  batch    dynamic: sessions share batched calls" in out
    assert "batch rows independent" in out and "chunked == whole" in out and f"--model-dirs {out_dir}" in out

    m = load_manifest(out_dir)  # sha-checked against the copy
    sizes = (m.input_kind, m.input_size, m.output_size, m.layers, m.hidden)
    assert m.name == "sensor" and sizes == ("features", 5, 3, 2, 16)
    assert m.format == "cellserve-manifest/2" and m.lstm == {"layers": 2, "hidden": 16}  # the LSTM case
    assert [(s.input, s.output, s.shape) for s in m.states] == [("h_in", "h_out", (2, "B", 16)),
                                                                ("c_in", "c_out", (2, "B", 16))]  # fmt: skip
    assert [(t.name, t.role) for t in m.inputs] == [("inp", "input"), ("h_in", "state_h"), ("c_in", "state_c")]
    assert [(t.name, t.role) for t in m.outputs] == [
        ("out", "output"),
        ("h_out", "next_state_h"),
        ("c_out", "next_state_c"),
    ]
    assert m.tensor("state_h").shape == [2, "B", 16] and m.tensor("input").shape == ["B", "T", 5]
    # Provenance: where it came from, not training data it never had.
    assert (out_dir / "model.onnx").read_bytes() == sensor_onnx.read_bytes()
    p = m.provenance
    assert p["kind"] == "imported" and p["source_file"] == "sensor.onnx"
    assert p["source_sha256"] == sha256_file(sensor_onnx) == m.sha256
    assert p["producer"] == "pytorch" and p["roles"]["input"] == "rest" and p["roles"]["h_in"] == "name"
    assert p["checks"]["chunked_max_scaled_diff"] <= 1e-5 and len(p["checks"]["chunks"]) == 5
    assert m.training == {} and "torch" not in m.versions


SWAPPED = {"inputs": ["i1", "i2", "i3"], "outputs": ["o1", "o2", "o3"]}
SWAPPED_AXES = {"i1": {0: "b", 1: "t"}, "o1": {0: "b", 1: "t"}, **{k: {1: "b"} for k in ("i2", "i3", "o2", "o3")}}


def test_same_shaped_states_with_meaningless_names_are_refused_as_ambiguous_and_paired_with_flags(tmp_path, capsys):
    """Outputs in (y, c, h) order and names that say nothing: detection cannot pair them, so it asks."""
    src = um.export(um.SwappedOutputs(), tmp_path / "swapped.onnx", dynamic_axes=SWAPPED_AXES, **SWAPPED)

    rc, _, err = cli(capsys, src, "--out", tmp_path / "bad", "--name", "swapped")
    assert rc == 2 and err.count("\n") == 1
    assert "state input 'i2' float32 [2, b, 16] could pair with outputs o2, o3" in err
    assert "(nor for i3)" in err and "--state i2:OUT" in err
    assert not (tmp_path / "bad").exists()

    rc, out, err = cli(capsys, src, "--out", tmp_path / "good", "--name", "swapped", "--input", "i1",
                       "--state", "i2:o3", "--state", "i3:o2:1", "--output", "o1")  # fmt: skip
    assert rc == 0, err
    assert "roles (from flags)" in out and "i2 -> o3" in out and "i3 -> o2" in out and "[flag; axis: flag]" in out
    m = load_manifest(tmp_path / "good")
    assert (m.tensor("next_state_h").name, m.tensor("next_state_c").name) == ("o3", "o2")


def test_states_paired_wrongly_by_flags_are_caught_by_chunked_parity(tmp_path, capsys):
    src = um.export(um.SwappedOutputs(), tmp_path / "swapped.onnx", dynamic_axes=SWAPPED_AXES, **SWAPPED)
    rc, _, err = cli(capsys, src, "--out", tmp_path / "bad", "--name", "swapped", "--state", "i2:o2", "--state",
                     "i3:o3")  # fmt: skip
    assert rc == 2 and err.count("\n") == 1
    assert "chunked != whole" in err and "(i2 -> o2, i3 -> o3)" in err and "--state IN:OUT" in err
    assert not (tmp_path / "bad").exists()


def test_flags_that_name_no_graph_tensor_are_refused_with_the_graph_names(sensor_onnx, tmp_path, capsys):
    rc, _, err = cli(capsys, sensor_onnx, "--out", tmp_path / "o", "--name", "s", "--state", "h_in:nope")
    assert rc == 2 and "does not name a graph input and a graph output as IN:OUT[:BATCH_AXIS]" in err
    assert "outputs are out, h_out, c_out" in err
    rc, _, err = cli(capsys, sensor_onnx, "--out", tmp_path / "o", "--name", "s", "--input", "x")
    assert rc == 2 and "--input 'x' is not an input of the graph" in err and "inp, h_in, c_in" in err
    rc, _, err = cli(capsys, sensor_onnx, "--out", tmp_path / "o", "--name", "bad name")
    assert rc == 2 and "model name 'bad name' is not allowed" in err
    assert not (tmp_path / "o").exists()


def test_token_model_vocabulary_is_probed_or_taken_from_the_flag(tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir / "model.onnx"
    rc, out, err = cli(capsys, src, "--out", tmp_path / "a", "--name", "tok")
    assert rc == 0, err
    assert "  input    x: int64 [B, T], token ids, vocabulary 256 (probed)  [rest; x and y share axis 1 ('T')]" in out
    m = load_manifest(tmp_path / "a")
    assert (m.input_kind, m.input_size, m.output_size) == ("tokens", 256, 256)
    assert m.provenance["vocab"] == "probed"

    rc, _, err = cli(capsys, src, "--out", tmp_path / "b", "--name", "tok", "--vocab", "300")
    assert rc == 2 and "--vocab 300, but the graph rejects token id 299" in err
    rc, _, err = cli(capsys, src, "--out", tmp_path / "c", "--name", "tok", "--vocab", "100")
    assert rc == 0, err
    assert load_manifest(tmp_path / "c").input_size == 100  # the server then refuses ids >= 100


class MixesRows(um.SensorLSTM):
    """Adds the batch mean to y: a session's output depends on who else is in its batch."""

    def forward(self, inp, h_in, c_in):
        y, h, c = super().forward(inp, h_in, c_in)
        return y + y.mean(0, keepdim=True), h, c


class ShortNextState(um.SensorLSTM):
    """Returns only half of h as its next value: h_in [2, B, 16] -> h_out [2, B, 8]."""

    def forward(self, inp, h_in, c_in):
        y, h, c = super().forward(inp, h_in, c_in)
        return y, h[:, :, :8], c


REFUSALS = {
    "static batch": (um.SensorLSTM(), {"dynamic_axes": None}, "the graph has a static batch: input 'inp'"),
    "missing state outputs": (
        um.NoStateOut(),
        {"outputs": ["out"], "dynamic_axes": um.axes(outputs=["out"])},
        "the graph returns no next state for h_in and c_in",
    ),
    "bidirectional": (um.Bidirectional(), {}, "chunked != whole"),
    "state ignored": (um.IgnoresState(), {}, "the graph ignores its state input 'h_in'"),
    "rows mixed": (MixesRows(), {}, "rows of a batch are not independent: row 0 of a B=3 run differs"),
    "state shapes disagree": (
        ShortNextState(),
        {},
        "state pair h_in -> h_out: shapes disagree ([2, batch, 16] vs [2, batch, 8])",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_graph_that_breaks_the_contract_is_refused_in_one_line_and_nothing_is_written(case, tmp_path, capsys):
    module, kw, problem = REFUSALS[case]
    src = um.export(module, tmp_path / "user.onnx", **kw)
    out_dir = tmp_path / "out"
    rc, out, err = cli(capsys, src, "--out", out_dir, "--name", "user")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"cellserve import-onnx: error: cannot import {src}: "), err
    assert problem in err
    assert any(w in err.split(problem, 1)[1] for w in ("export", "--state", "--const")), "it says what to do"
    assert not out_dir.exists()


def test_a_dynamically_quantized_graph_is_refused_because_its_batch_rows_mix(sensor_onnx, tmp_path, capsys):
    """onnxruntime's dynamic int8 quantization (about 2x faster on the CPU) takes one activation scale per
    run, over every row: a session's output would depend on who else is in its batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = tmp_path / "int8.onnx"
    quantize_dynamic(str(sensor_onnx), str(src), weight_type=QuantType.QInt8)
    assert "DynamicQuantizeLSTM" in {n.op_type for n in onnx.load(str(src)).graph.node}
    rc, out, err = cli(capsys, src, "--out", tmp_path / "out", "--name", "int8")
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert "rows of a batch are not independent" in err and "dynamic quantization" in err
    assert not (tmp_path / "out").exists()


def test_a_refused_import_leaves_an_existing_model_directory_untouched(sensor_model_dir, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in sensor_model_dir.iterdir()}
    src = um.export(um.SensorLSTM(), tmp_path / "static.onnx", dynamic_axes=None)
    rc, _, _ = cli(capsys, src, "--out", sensor_model_dir, "--name", "sensor")
    assert rc == 2
    assert {p.name: p.read_bytes() for p in sensor_model_dir.iterdir()} == before


def test_weights_in_external_data_files_are_refused_not_copied_half(sensor_onnx, tmp_path, capsys):
    src = tmp_path / "external.onnx"
    onnx.save_model(onnx.load(str(sensor_onnx)), str(src), save_as_external_data=True, location="external.data",
                    size_threshold=0)  # fmt: skip
    rc, _, err = cli(capsys, src, "--out", tmp_path / "out", "--name", "ext")
    assert rc == 2 and "its weights are in external data files" in err and "save_as_external_data=False" in err
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_onnx_is_refused(tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    rc, _, err = cli(capsys, tmp_path / "junk.onnx", "--out", tmp_path / "out", "--name", "junk")
    assert rc == 2 and "cannot load junk.onnx" in err and err.count("\n") == 1
    rc, _, err = cli(capsys, tmp_path / "missing.onnx", "--out", tmp_path / "out", "--name", "junk")
    assert rc == 2 and "missing.onnx does not exist" in err


def test_import_onnx_runs_without_torch_and_refuses_without_a_traceback(sensor_onnx, tmp_path):
    """The real command in a fresh interpreter where `import torch` and `import onnx` fail: exit status, output."""
    args = ["import-onnx", str(sensor_onnx), "--out", str(tmp_path / "ok"), "--name", "sensor"]
    ok = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "chunked == whole" in ok.stdout and load_manifest(tmp_path / "ok").provenance["kind"] == "imported"

    bad = um.export(um.SensorLSTM(), tmp_path / "static.onnx", dynamic_axes=None)
    refused = subprocess.run([sys.executable, "-c", NO_TORCH, "import-onnx", str(bad), "--out", str(tmp_path / "bf"),
                              "--name", "bf"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr and "static batch" in lines[0], refused.stderr


def test_check_graph_is_usable_as_a_library(sensor_onnx):
    checked = check_graph(sensor_onnx, RoleHints(output="out"))
    assert checked.roles.describe() == "input inp, state h_in -> h_out, state c_in -> c_out, output out"
    assert checked.detected["output"] == "flag" and checked.detected["h_in"] == "name"
    assert checked.report["runs"] == [[1, 1], [1, 2], [1, 7], [3, 1], [3, 2], [3, 7]]
    with pytest.raises(ContractError) as e:
        import_onnx(sensor_onnx, Path("unused"), name="s", hints=RoleHints(states=("h_in:out", "c_in:c_out")))
    assert "state pair h_in -> out: shapes disagree ([2, batch, 16] vs [batch, time, 3])" in str(e.value)
    assert json.loads(json.dumps(checked.provenance()))["checks"] == checked.report
    assert np.isfinite(checked.report["batch_rows_max_scaled_diff"])
