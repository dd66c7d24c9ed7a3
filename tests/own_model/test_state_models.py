"""import-onnx on every stateful class of issue 25 (tests/own_model/state_models.py): what it detects, what it
writes, what it prints, and the refusals that are specific to the general contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import state_models as sm
import torch
from torch import nn

from cellserve.model.contract import ContractError, RoleHints
from cellserve.model.importer import import_onnx
from cellserve.model.manifest import ConstSpec, load_manifest
from cellserve.server.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("state-models")
    return {k: m.build(d) for k, m in sm.MODELS.items()}


@pytest.mark.parametrize("case", list(sm.MODELS))
def test_each_class_imports_with_the_contract_it_was_built_with(case, built, tmp_path):
    spec = sm.MODELS[case]
    m, checked = import_onnx(built[case], tmp_path / case, name=case, **spec.import_kwargs)
    assert load_manifest(tmp_path / case) == m and m.format == "cellserve-manifest/2"
    x = m.input
    assert (x.name, x.dtype, x.time_axis, x.frame) == (spec.x, spec.x_dtype, spec.time_axis, spec.frame)
    assert (m.output.name, m.output.frame) == (spec.y, spec.out_frame)
    assert [(s.input, s.output, s.dtype, s.shape) for s in m.states] == list(spec.states)
    assert {c.name: (c.dtype, c.shape, c.value) for c in m.consts} == spec.consts
    assert m.fixed_batch == spec.fixed_batch
    if None in x.frame:  # a dynamic frame dim stays dynamic; the example frame is one the graph runs
        assert x.example is not None and len(x.example) == len(x.frame)
    else:
        assert x.example is None
    report = checked.report
    if spec.fixed_batch == 1:
        assert report["batch"].startswith("skipped") and "batch_rows_max_scaled_diff" not in report
        assert report["runs"] == [[1, 1], [1, 2], [1, 7]]
    elif spec.time_axis:
        assert report["batch_rows_max_scaled_diff"] <= report["tolerance"]
    else:
        assert report["interleaved_max_scaled_diff"] <= report["tolerance"]
    assert ("chunks" in report) == spec.time_axis
    assert m.lstm is None  # our LSTM's sizes are kept for the LSTM case only (float32 [L, B, H] h and c)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_the_per_frame_model_takes_any_frame_length_and_its_constant_changes_the_result(built, tmp_path, capsys):
    src = built["per_frame"]
    frame = np.random.default_rng(0).standard_normal((1, 100)).astype(np.float32)
    state = np.zeros((2, 1, sm.HIDDEN), np.float32)
    at16k = _run(src, {"input": frame, "state": state, "sr": np.array(16000)})[0]
    at8k = _run(src, {"input": frame, "state": state, "sr": np.array(8000)})[0]
    assert not np.allclose(at16k, at8k), "the constant input changes y"

    rc = main(["--log-level", "WARNING", "import-onnx", str(src), "--out", str(tmp_path / "vad"), "--name", "vad",
               "--const", "sr=8000"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "  input    input: float32 [B, N], one frame per call, no time axis  [rest; y's axis 1 does not " in out
    assert "  state    state -> stateN: float32 [2, B, 16], batch axis 1  [name; axis: only dynamic axis]" in out
    assert "  const    sr: int64 [] = 8000  [flag]" in out and "  output   output: float32 [B, 1]  [rest]" in out
    assert "frames one by one == interleaved with other sessions at B=3" in out and "chunked" not in out
    assert load_manifest(tmp_path / "vad").consts == (ConstSpec("sr", "int64", (), (8000,)),)


def test_a_constant_left_unset_is_refused_naming_it(built, tmp_path, capsys):
    rc = main(["--log-level", "WARNING", "import-onnx", str(built["per_frame"]), "--out", str(tmp_path / "o"),
               "--name", "vad"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "graph input 'sr' int64 [] is neither x nor a state" in err and "--const sr=VALUE" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("value", "problem"),
    [("16k", "'16k' is not a comma list of int64 values"), ("1,2", "gives 2 value(s); input 'sr' int64 [] takes 1")],
)
def test_a_constant_of_the_wrong_type_or_size_is_refused(value, problem, built, tmp_path):
    with pytest.raises(ContractError, match=problem.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        import_onnx(built["per_frame"], tmp_path / "o", name="vad", consts={"sr": value})
    assert not (tmp_path / "o").exists()


def test_the_fixed_batch_graph_prints_what_it_costs_and_skips_batch_checks(built, tmp_path, capsys):
    rc = main(["--log-level", "WARNING", "import-onnx", str(built["fixed_batch"]), "--out", str(tmp_path / "fb"),
               "--name", "fb"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "  batch    fixed at 1: served by batch-1 calls, one session per call" in out
    assert "batch checks skipped (batch fixed at 1)" in out and "runs at (B, T) in (1,1) (1,2) (1,7)" in out
    assert "  state    h -> h_n: float32 [2, B, 16], batch axis 1  [name; axis: only axis of size 1]" in out


def test_undeclared_dims_are_learned_by_running_the_graph(built, tmp_path):
    sess = ort.InferenceSession(str(built["lstm_stacked"]), providers=["CPUExecutionProvider"])
    assert [i.shape for i in sess.get_inputs()] == [[None, None, 5], [2, 2, None, 16]]  # as exported: undeclared
    m, checked = import_onnx(built["lstm_stacked"], tmp_path / "s", name="s")
    assert checked.detected["time_axis"] == "y's axis 1 follows x's (probed)"
    assert checked.detected["axis:state"] == "only dynamic axis"
    assert m.states[0].shape == (2, 2, "B", 16) and m.input.frame == (5,) and m.output.frame == (3,)


def test_the_float16_state_is_kept_float16_with_a_float16_tolerance(built, tmp_path):
    m, checked = import_onnx(built["fp16_state"], tmp_path / "h", name="h")
    assert {s.dtype for s in m.states} == {"float16"} and m.state_bytes == 2 * 2 * 2 * sm.HIDDEN
    assert checked.report["tolerance"] == 1e-2 and 0 < checked.report["chunked_max_scaled_diff"] <= 1e-2


def test_flags_name_the_batch_axis_where_it_cannot_be_told(built, tmp_path):
    """Undeclare every dim of the stacked state: its batch axis (and sizes) are then the user's to give."""
    src = sm.undeclare(Path(str(built["lstm_stacked"])), {"state": [1, 2]})  # [2, ?, ?, 16]: two open dims
    with pytest.raises(ContractError, match=r"cannot tell the batch axis of state 'state' float32 \[2, \?, \?, 16\]; "
                       r"name it: --state state:stateN:AXIS \(or --batch-axis AXIS"):  # fmt: skip
        import_onnx(src, tmp_path / "a", name="s")
    m, checked = import_onnx(src, tmp_path / "b", name="s", hints=RoleHints(states=("state:stateN:2",)))
    assert m.states[0].shape == (2, 2, "B", 16) and checked.detected["axis:state"] == "flag"
    m, checked = import_onnx(src, tmp_path / "c", name="s", hints=RoleHints(batch_axis=2))
    assert m.states[0].shape == (2, 2, "B", 16) and checked.detected["axis:state"] == "--batch-axis"


class MixesFrames(sm.FrameVAD):
    """A per-frame model whose output adds the batch mean: fine alone, wrong beside other sessions."""

    def forward(self, input: torch.Tensor, state: torch.Tensor, sr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, nxt = super().forward(input, state, sr)
        return y + y.mean(0, keepdim=True), nxt


def test_a_per_frame_graph_that_mixes_sessions_is_refused_by_the_interleaving_check(tmp_path):
    torch.manual_seed(0)
    args = (torch.randn(2, 64), torch.zeros(2, 2, sm.HIDDEN), torch.tensor(16000))
    axes = {"input": {0: "b", 1: "n"}, "state": {1: "b"}, "output": {0: "b"}, "stateN": {1: "b"}}
    src = sm._export(MixesFrames(), args, tmp_path / "mix.onnx", ["input", "state", "sr"], ["output", "stateN"], axes)
    with pytest.raises(ContractError, match=r"frames run at B=1 differ by .* interleaved with other sessions' at B=3"):
        import_onnx(src, tmp_path / "o", name="mix", consts={"sr": 16000})
    assert not (tmp_path / "o").exists()


class ThreeCaches(nn.Module):
    """A per-frame model with three same-shaped states whose names say nothing: no shape tells the pairs apart."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, a, b, c):  # x, a, b, c [B, 4]
        return self.lin(x + a + 2 * b + 3 * c), a + x, 0.5 * b + x, c - x  # y [B, 3]; next states [B, 4]


def test_ambiguous_pairs_without_flags_are_refused_and_flags_resolve_them(tmp_path):
    args = (torch.randn(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4))
    axes = {n: {0: "b"} for n in ("x", "a", "b", "c", "y", "p", "q", "r")}
    src = sm._export(ThreeCaches(), args, tmp_path / "three.onnx", ["x", "a", "b", "c"], ["y", "p", "q", "r"], axes)
    with pytest.raises(ContractError, match=r"state input 'a' float32 \[b, 4\] could pair with outputs p, q, r"):
        import_onnx(src, tmp_path / "o", name="t")
    assert not (tmp_path / "o").exists()
    m, checked = import_onnx(src, tmp_path / "o", name="t", hints=RoleHints(states=("a:p", "b:q", "c:r")))
    assert [(s.input, s.output, s.shape) for s in m.states] == [("a", "p", ("B", 4)), ("b", "q", ("B", 4)),
                                                                 ("c", "r", ("B", 4))]  # fmt: skip
    assert not m.input.time_axis and m.input.frame == (4,) and m.output.frame == (3,)
    assert checked.detected["time_axis"] == "x's axis 1 is fixed at 4: per-frame"


class TimeFirst(nn.Module):
    """An LSTM without batch_first: x is [T, B, 5]."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(sm.FEATURES, sm.HIDDEN, num_layers=sm.LAYERS)
        self.head = nn.Linear(sm.HIDDEN, sm.OUT)

    def forward(self, x, h0, c0):
        seq, (hn, cn) = self.lstm(x, (h0, c0))  # seq [T, B, H]
        return self.head(seq), hn, cn


def test_a_time_first_x_is_refused_with_how_to_fix_it(tmp_path):
    args = (torch.randn(4, 2, sm.FEATURES), torch.zeros(2, 2, sm.HIDDEN), torch.zeros(2, 2, sm.HIDDEN))
    axes = {"x": {0: "T", 1: "B"}, "y": {0: "T", 1: "B"}, **{n: {1: "B"} for n in ("h0", "c0", "hn", "cn")}}
    src = sm._export(TimeFirst(), args, tmp_path / "tf.onnx", ["x", "h0", "c0"], ["y", "hn", "cn"], axes)
    with pytest.raises(ContractError, match=r"input 'x' float32 \[T, B, 5\] is time-first: .* batch_first=True"):
        import_onnx(src, tmp_path / "o", name="tf")
