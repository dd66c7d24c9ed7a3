"""export_module: a user's own torch module (forward(x, *states) -> (y, *next_states)) to a servable model dir."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import state_models as sm
import torch
import user_models as um
from torch import nn

from cellserve.model.export import ExportError, export_module
from cellserve.model.manifest import load_manifest


def _ort(model_dir, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def test_a_user_features_module_exports_checks_and_matches_torch(tmp_path):
    torch.manual_seed(3)
    module = um.SensorLSTM()  # left in training mode, float32: export must not change it
    before = {k: v.clone() for k, v in module.state_dict().items()}
    m = export_module(module, tmp_path / "sensor", name="sensor", input_size=um.FEATURES)
    assert module.training and all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    assert load_manifest(tmp_path / "sensor") == m
    assert (m.input_kind, m.input_size, m.output_size, m.layers, m.hidden) == ("features", 5, 3, 2, 16)
    assert m.provenance["kind"] == "exported_module"
    assert m.provenance["module"] == f"{um.SensorLSTM.__module__}.SensorLSTM"
    assert m.provenance["parity_max_scaled_diff"] <= 1e-5 and m.provenance["checks"]["chunks"]
    assert {"torch", "onnx", "onnxruntime"} <= set(m.versions)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50, um.FEATURES)).astype(np.float32)
    h0 = rng.standard_normal((um.LAYERS, 3, um.HIDDEN)).astype(np.float32)
    c0 = rng.standard_normal((um.LAYERS, 3, um.HIDDEN)).astype(np.float32)
    got = _ort(tmp_path / "sensor", ["y", "hn", "cn"], {"x": x, "h0": h0, "c0": c0})
    with torch.no_grad():
        want = module.eval()(torch.from_numpy(x), torch.from_numpy(h0), torch.from_numpy(c0))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=0)


def test_a_user_token_module_exports_with_its_vocabulary(tmp_path):
    m = export_module(um.TokenLSTM(vocab=40), tmp_path / "tok", name="tok", input_kind="tokens", input_size=40)
    assert (m.input_kind, m.input_size, m.output_size, m.layers, m.hidden) == ("tokens", 40, 40, 1, 12)
    assert m.provenance["vocab"] == "flag"
    y, hn, _ = _ort(tmp_path / "tok", ["y", "hn", "cn"], {"x": np.array([[0, 39, 7]], np.int64),
                                                          "h0": np.zeros((1, 1, 12), np.float32),
                                                          "c0": np.zeros((1, 1, 12), np.float32)})  # fmt: skip
    assert y.shape == (1, 3, 40) and hn.shape == (1, 1, 12)


class TwoLSTMs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.LSTM(5, 8, batch_first=True), nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seq, (h, c) = self.a(x, (h0, c0))
        return self.b(seq)[0], h, c


@pytest.mark.parametrize(
    ("module", "kwargs", "message"),
    [
        (um.NoStateOut(), {}, r"states \[2, B, 16\] \[2, B, 16\]: returned Tensor.*must return a tuple \(y, hn, cn\)"),
        (um.Bidirectional(), {}, "is bidirectional: its backward direction needs the whole sequence"),
        (
            TwoLSTMs(),
            {},
            r"holds 2 recurrent modules \(nn.LSTM, nn.GRU, .*\), so its state shapes are not known; pass "
            r"states=\[shape, ...\]",
        ),
        (um.IgnoresState(), {}, "breaks the serving contract: the graph ignores its state input 'h0'"),
        (um.SensorLSTM(), {"name": "no spaces please"}, "model name 'no spaces please' is not allowed"),
    ],
)
def test_a_module_that_breaks_the_contract_is_refused_and_nothing_is_written(module, kwargs, message, tmp_path):
    with pytest.raises((ExportError, ValueError), match=message):
        export_module(module, tmp_path / "out", **{"name": "m", "input_size": um.FEATURES, **kwargs})
    assert not (tmp_path / "out").exists()


def test_state_the_module_keeps_to_itself_is_caught_by_chunked_parity(tmp_path):
    """TwoLSTMs' second LSTM restarts from zeros every call: shapes are fine, chunked != whole is not."""
    with pytest.raises(ExportError, match=r"breaks the serving contract: chunked != whole: .* in 'y'"):
        export_module(TwoLSTMs(), tmp_path / "two", name="two", input_size=5, layers=1, hidden=8)
    assert not (tmp_path / "two").exists()


def test_sizes_given_explicitly_are_used_and_wrong_ones_refused(tmp_path):
    m = export_module(um.SensorLSTM(), tmp_path / "s", name="s", input_size=5, layers=2, hidden=16)
    assert (m.layers, m.hidden) == (2, 16)
    with pytest.raises(
        ExportError,
        match=r"SensorLSTM.forward\(x, h0, c0\) failed on example inputs x \[3, 4, 5\] "
        r"with every state layout tried \(states \[3, B, 16\] \[3, B, 16\]: Expected hidden",
    ):
        export_module(um.SensorLSTM(), tmp_path / "bad", name="s", input_size=5, layers=3, hidden=16)


def _states(m) -> list[tuple]:
    return [(s.input, s.output, s.dtype, s.shape) for s in m.states]


def _matches_torch(module: nn.Module, model_dir, x: torch.Tensor, states: list[torch.Tensor]) -> None:
    """The exported graph equals the module on fresh inputs, every output (y and each next state)."""
    m = load_manifest(model_dir)
    feeds = {m.input.name: x.numpy(), **{s.input: t.numpy() for s, t in zip(m.states, states, strict=True)}}
    got = _ort(model_dir, [m.output.name, *(s.output for s in m.states)], feeds)
    with torch.no_grad():
        want = module.eval()(x, *states)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=0)


def test_a_gru_exports_with_its_one_state(tmp_path):
    """Issue 25: a GRU got "holds 0 nn.LSTM modules ... pass layers= and hidden=", advice that then failed."""
    module = sm.GRUNet()
    m = export_module(module, tmp_path / "gru", name="gru", input_size=sm.FEATURES)
    assert _states(m) == [("h0", "hn", "float32", (sm.LAYERS, "B", sm.HIDDEN))] and m.lstm is None
    assert m.input.time_axis and m.output.frame == (sm.OUT,) and m.provenance["states"] == "nn.GRU"
    _matches_torch(module, tmp_path / "gru", torch.randn(2, 9, sm.FEATURES), [torch.randn(2, 2, 16)])


def test_an_lstm_with_stacked_state_exports_as_one_state(tmp_path):
    """Issue 25: a stacked-state LSTM was called "like a GRU"."""
    torch.manual_seed(1)
    module = sm.StackedLSTM()
    m = export_module(module, tmp_path / "st", name="st", input_size=sm.FEATURES)
    assert _states(m) == [("state", "next_state", "float32", (2, sm.LAYERS, "B", sm.HIDDEN))]
    _matches_torch(module, tmp_path / "st", torch.randn(3, 6, sm.FEATURES), [torch.randn(2, 2, 3, 16)])


def test_an_lstm_with_batch_first_state_exports_with_batch_axis_0(tmp_path):
    torch.manual_seed(2)
    module = sm.BatchFirstLSTM()
    m = export_module(module, tmp_path / "bf", name="bf", input_size=sm.FEATURES)
    assert _states(m) == [("h0", "hn", "float32", ("B", sm.LAYERS, sm.HIDDEN)),
                          ("c0", "cn", "float32", ("B", sm.LAYERS, sm.HIDDEN))]  # fmt: skip
    assert m.lstm is None  # not [L, B, H]
    _matches_torch(module, tmp_path / "bf", torch.randn(4, 5, sm.FEATURES), [torch.randn(4, 2, 16)] * 2)


def test_a_per_frame_cell_module_exports_without_a_time_axis(tmp_path):
    torch.manual_seed(3)
    module = um.OneStep()  # LSTMCell; takes h and c as [1, B, H]
    m = export_module(module, tmp_path / "cell", name="cell", input_size=um.FEATURES, time_axis=False)
    assert not m.input.time_axis and m.input.frame == (um.FEATURES,) and m.output.frame == (um.OUT,)
    assert _states(m) == [("h0", "hn", "float32", (1, "B", um.HIDDEN)), ("c0", "cn", "float32", (1, "B", um.HIDDEN))]
    assert "interleaved_max_scaled_diff" in m.provenance["checks"]
    _matches_torch(module, tmp_path / "cell", torch.randn(2, um.FEATURES), [torch.randn(1, 2, 16)] * 2)


def test_state_shapes_given_explicitly_override_inference(tmp_path):
    m = export_module(sm.StackedLSTM(), tmp_path / "st", name="st", input_size=sm.FEATURES,
                      states=[(2, sm.LAYERS, "B", sm.HIDDEN)])  # fmt: skip
    assert m.provenance["states"] == "given" and m.states[0].shape == (2, 2, "B", 16)
    with pytest.raises(ExportError, match=r"states= shape \[2, 2, 16\] needs exactly one 'B'"):
        export_module(sm.StackedLSTM(), tmp_path / "bad", name="st", input_size=sm.FEATURES, states=[(2, 2, 16)])
    assert not (tmp_path / "bad").exists()
