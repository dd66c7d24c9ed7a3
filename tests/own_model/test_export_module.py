"""export_module: a user's own torch module (forward(x, h0, c0) -> (y, hn, cn)) to a servable model directory."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
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
        (um.NoStateOut(), {}, r"must return a tuple \(y, hn, cn\) of tensors; it returned Tensor"),
        (um.Bidirectional(), {}, "is bidirectional: its backward direction needs the whole sequence"),
        (TwoLSTMs(), {}, r"holds 2 nn.LSTM modules, so the state shape \[L, B, H\] is not known"),
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
    with pytest.raises(ExportError, match=r"SensorLSTM.forward\(x, h0, c0\) failed on example inputs .* \[3, 2, 16\]"):
        export_module(um.SensorLSTM(), tmp_path / "bad", name="s", input_size=5, layers=3, hidden=16)
