"""Stateful equivalence: 300 steps run whole equal the same steps run in random chunks carrying h/c."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cellserve.model.model import load_checkpoint

STEPS = 300


def _chunks(rng: np.random.Generator, total: int) -> list[int]:
    """Random chunk lengths (1..40, with some single steps) summing to ``total``."""
    sizes = []
    while total:
        n = int(min(total, rng.choice([1, 1, 2, 5, 17, 40])))
        sizes.append(n)
        total -= n
    return sizes


@pytest.fixture(scope="module")
def sequence() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, size=(2, STEPS), dtype=np.int64)  # [B, T]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_chunked_equals_whole(tiny_oracle, sequence: np.ndarray, seed: int) -> None:
    y_all, h_all, c_all = tiny_oracle.run(sequence)
    h, c = tiny_oracle.init_state(2)
    ys, pos = [], 0
    for n in _chunks(np.random.default_rng(seed), STEPS):
        y, h, c = tiny_oracle.run(sequence[:, pos : pos + n], h, c)
        ys.append(y)
        pos += n
    np.testing.assert_allclose(np.concatenate(ys, axis=1), y_all, rtol=0, atol=1e-12)
    np.testing.assert_allclose(h, h_all, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c, c_all, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_chunked_equals_whole(tiny_model_dir: Path, tiny_oracle, sequence: np.ndarray, seed: int) -> None:
    model, _ = load_checkpoint(tiny_model_dir / "checkpoint.pt")
    model = model.double()
    x = torch.from_numpy(sequence)
    with torch.no_grad():
        y_all, (h_all, c_all) = model(x, model.init_state(2))
        state, ys, pos = model.init_state(2), [], 0
        for n in _chunks(np.random.default_rng(seed), STEPS):
            y, state = model(x[:, pos : pos + n], state)
            ys.append(y)
            pos += n
    np.testing.assert_allclose(torch.cat(ys, 1).numpy(), y_all.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(state[0].numpy(), h_all.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(state[1].numpy(), c_all.numpy(), rtol=0, atol=1e-10)
    # and the whole run is the oracle's
    np.testing.assert_allclose(y_all.numpy(), tiny_oracle.run(sequence)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_onnx_chunked_equals_whole_and_oracle(
    tiny_model_dir: Path, tiny_oracle, sequence: np.ndarray, seed: int
) -> None:
    sess = ort.InferenceSession(str(tiny_model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    zeros = np.zeros((2, 2, 32), np.float32)  # [L, B, H]
    y_all, h_all, c_all = sess.run(None, {"x": sequence, "h0": zeros, "c0": zeros})
    h, c, ys, pos = zeros, zeros, [], 0
    for n in _chunks(np.random.default_rng(seed), STEPS):
        y, h, c = sess.run(None, {"x": sequence[:, pos : pos + n], "h0": h, "c0": c})
        ys.append(y)
        pos += n
    np.testing.assert_allclose(np.concatenate(ys, axis=1), y_all, rtol=0, atol=1e-5)
    np.testing.assert_allclose(h, h_all, rtol=0, atol=1e-5)
    np.testing.assert_allclose(c, c_all, rtol=0, atol=1e-5)
    y_ref, h_ref, c_ref = tiny_oracle.run(sequence)
    np.testing.assert_allclose(np.concatenate(ys, axis=1), y_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(h, h_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(c, c_ref, rtol=0, atol=1e-5)
