"""The numpy oracle implements the LSTM equations of its docstring and matches torch's nn.LSTM in float64."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from cellserve.model.model import LSTMConfig, LSTMModel
from cellserve.model.reference import ReferenceLSTM, sigmoid


def _model(layers: int, input_kind: str = "tokens", seed: int = 0) -> LSTMModel:
    torch.manual_seed(seed)
    size = 256 if input_kind == "tokens" else 6
    cfg = LSTMConfig(input_kind, size, 256 if input_kind == "tokens" else 4, layers, hidden=24, embed=12)
    model = LSTMModel(cfg).double().eval()
    with torch.no_grad():  # larger-than-default weights so the gates saturate differently and errors would show
        for p in model.lstm.parameters():
            p.mul_(3.0)
    return model


def _inputs(model: LSTMModel, batch: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cfg = model.cfg
    if cfg.input_kind == "tokens":
        x = rng.integers(0, cfg.input_size, size=(batch, steps))  # [B, T]
    else:
        x = rng.standard_normal((batch, steps, cfg.input_size))  # [B, T, I]
    h0 = rng.standard_normal((cfg.layers, batch, cfg.hidden))  # [L, B, H]
    c0 = 2 * rng.standard_normal((cfg.layers, batch, cfg.hidden))  # [L, B, H]
    return x, h0, c0


def _torch_run(model: LSTMModel, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        y, (hn, cn) = model(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    return y.numpy(), hn.numpy(), cn.numpy()


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("steps", [1, 50])
def test_oracle_matches_torch_in_float64(layers: int, batch: int, steps: int) -> None:
    model = _model(layers, seed=layers)
    oracle = ReferenceLSTM.from_torch(model)
    x, h0, c0 = _inputs(model, batch, steps, seed=batch * 100 + steps)
    want = _torch_run(model, x, h0, c0)
    got = oracle.run(x, h0, c0)
    for name, g, w in zip(("y", "hn", "cn"), got, want, strict=True):
        assert g.shape == w.shape, name
        assert np.max(np.abs(g - w)) <= 1e-6, f"{name}: max |oracle - torch| = {np.max(np.abs(g - w))}"


@pytest.mark.parametrize("layers", [1, 3])
def test_feature_model_oracle_matches_torch(layers: int) -> None:
    model = _model(layers, input_kind="features", seed=7)
    oracle = ReferenceLSTM.from_torch(model)
    x, h0, c0 = _inputs(model, 5, 50, seed=3)
    for g, w in zip(oracle.run(x, h0, c0), _torch_run(model, x, h0, c0), strict=True):
        assert np.max(np.abs(g - w)) <= 1e-6


def test_oracle_step_equals_the_seed_equations_by_hand() -> None:
    """One layer, H=1, one feature: set each gate's weights apart and compute f, i, C̃, o, C, h by hand.

    This pins PyTorch's packed gate order (i, f, g, o) independently of torch's own arithmetic.
    """
    cfg = LSTMConfig("features", 1, 1, layers=1, hidden=1, embed=1)
    model = LSTMModel(cfg).double()
    # gate pre-activation = w_ih * x + w_hh * h + b_ih + b_hh; rows packed (i, f, g, o)
    w_ih = {"i": 0.5, "f": -1.0, "g": 2.0, "o": 0.25}
    w_hh = {"i": 0.1, "f": 0.2, "g": -0.3, "o": 0.4}
    b = {"i": 0.05, "f": 1.0, "g": -0.2, "o": 0.3}
    with torch.no_grad():
        model.encoder.weight.fill_(1.0)
        model.encoder.bias.zero_()
        order = ("i", "f", "g", "o")
        model.lstm.weight_ih_l0.copy_(torch.tensor([[w_ih[g]] for g in order], dtype=torch.float64))
        model.lstm.weight_hh_l0.copy_(torch.tensor([[w_hh[g]] for g in order], dtype=torch.float64))
        model.lstm.bias_ih_l0.copy_(torch.tensor([b[g] for g in order], dtype=torch.float64))
        model.lstm.bias_hh_l0.zero_()
        model.head.weight.fill_(1.0)
        model.head.bias.zero_()
    x, h, c = 0.7, -0.4, 1.5

    def sig(z: float) -> float:
        return 1 / (1 + math.exp(-z))

    f = sig(w_hh["f"] * h + w_ih["f"] * x + b["f"])
    i = sig(w_hh["i"] * h + w_ih["i"] * x + b["i"])
    c_tilde = math.tanh(w_hh["g"] * h + w_ih["g"] * x + b["g"])
    c_new = f * c + i * c_tilde
    o = sig(w_hh["o"] * h + w_ih["o"] * x + b["o"])
    h_new = o * math.tanh(c_new)

    oracle = ReferenceLSTM.from_torch(model)
    y, hn, cn = oracle.run(np.array([[[x]]]), np.array([[[h]]]), np.array([[[c]]]))
    assert cn[0, 0, 0] == pytest.approx(c_new, abs=1e-12)
    assert hn[0, 0, 0] == pytest.approx(h_new, abs=1e-12)
    assert y[0, 0, 0] == pytest.approx(h_new, abs=1e-12)
    d = torch.float64
    _, (_, torch_c) = model.lstm(
        torch.tensor([[[x]]], dtype=d), (torch.tensor([[[h]]], dtype=d), torch.tensor([[[c]]], dtype=d))
    )
    assert float(torch_c.detach()) == pytest.approx(c_new, abs=1e-12)


def test_sigmoid_is_stable_for_large_inputs() -> None:
    z = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0])
    s = sigmoid(z)
    assert np.all(np.isfinite(s))
    assert s[0] == 0.0 and s[2] == 0.5 and s[4] == 1.0
    assert s[1] == pytest.approx(1 / (1 + math.exp(30.0)))


def test_oracle_from_checkpoint_equals_from_torch(tiny_model_dir, tiny_oracle) -> None:
    from cellserve.model.model import load_checkpoint

    model, _ = load_checkpoint(tiny_model_dir / "checkpoint.pt")
    direct = ReferenceLSTM.from_torch(model)
    x = np.arange(40).reshape(2, 20) % 256
    for a, b in zip(direct.run(x), tiny_oracle.run(x), strict=True):
        np.testing.assert_array_equal(a, b)


def test_oracle_rejects_bad_inputs(tiny_oracle) -> None:
    with pytest.raises(ValueError, match="tokens must be in"):
        tiny_oracle.run(np.array([[256]]))
    with pytest.raises(ValueError, match="integer x"):
        tiny_oracle.run(np.zeros((1, 2), dtype=np.float32))
    h, c = tiny_oracle.init_state(2)
    with pytest.raises(ValueError, match="h0/c0 must be"):
        tiny_oracle.run(np.zeros((1, 3), dtype=np.int64), h, c)


def test_pure_modules_import_without_torch_or_onnxruntime() -> None:
    """The server and a torch-free install import these: blocking torch and onnxruntime must not break them."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['onnxruntime'] = None\n"
        "import cellserve.model.reference, cellserve.model.sampling, cellserve.model.manifest, cellserve.model.cli\n"
        "import cellserve.model.data, cellserve.model.train_config\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
