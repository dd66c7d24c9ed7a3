"""The shipped default model: present, verified, small, better than gzip on held-out text, and usable."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import cellserve.model
from cellserve.model.data import load_corpus
from cellserve.model.generate import generate_text
from cellserve.model.manifest import load_manifest

DEFAULT = Path(cellserve.model.__file__).parent / "default"


def test_default_model_is_complete_verified_and_small() -> None:
    names = {p.name for p in DEFAULT.iterdir()}
    assert {"model.onnx", "manifest.json", "training_curve.png", "metrics.json"} <= names
    assert sum(p.stat().st_size for p in DEFAULT.iterdir()) <= 8 * 1024 * 1024
    m = load_manifest(DEFAULT)  # checks the ONNX file's sha256
    assert (m.input_kind, m.input_size, m.output_size) == ("tokens", 256, 256)
    assert m.training["parity_max_scaled_diff"] <= 1e-4  # float32 drift of a trained c over T=128; see export.py


def test_default_model_beats_gzip_on_the_held_out_split_it_names() -> None:
    t = load_manifest(DEFAULT).training
    assert t["held_out_bpb"] < t["held_out_gzip_9_bpb"]
    assert t["held_out_xz_9_bpb"] < t["held_out_gzip_9_bpb"]  # sanity of the baselines


def test_default_model_generates_python_looking_text() -> None:
    text = generate_text(DEFAULT, "import os\ndef ", max_bytes=300, temperature=0.8, seed=1)
    assert len(text) == 300
    assert text.count(b"\n") >= 2 and (b"(" in text or b"=" in text)
    printable = sum(32 <= b < 127 or b in (9, 10) for b in text)
    assert printable / len(text) > 0.95


@pytest.mark.slow
def test_default_model_held_out_score_is_reproducible_with_onnxruntime() -> None:
    """Re-score the held-out split with the shipped ONNX graph (no torch) and compare with the manifest."""
    m = load_manifest(DEFAULT)
    corpus = load_corpus()
    if corpus.sha256("test") != m.training["data"]["test"]["sha256"]:
        pytest.skip("this Python's stdlib differs from the one the default model was scored on")
    data = corpus.text["test"][: m.training["held_out_bytes"]]
    sess = ort.InferenceSession(str(DEFAULT / m.onnx_file), providers=["CPUExecutionProvider"])
    batch = 16  # the same stream layout as cellserve.model.train.evaluate_bpb
    per = len(data) // batch
    rows = np.frombuffer(data[: per * batch], dtype=np.uint8).astype(np.int64).reshape(batch, per)  # [B, N]
    h = np.zeros((m.layers, batch, m.hidden), np.float32)
    c = np.zeros_like(h)
    total, count = 0.0, 0
    for i in range(0, per - 1, 256):
        y_true = rows[:, i + 1 : i + 257]  # [B, T]
        logits, h, c = sess.run(None, {"x": rows[:, i : i + y_true.shape[1]], "h0": h, "c0": c})  # [B, T, V]
        z = logits.astype(np.float64)
        logz = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))  # [B, T]
        total += float((logz - np.take_along_axis(z, y_true[..., None], -1)[..., 0]).sum())
        count += y_true.size
    assert total / count / math.log(2) == pytest.approx(m.training["held_out_bpb"], abs=2e-3)
