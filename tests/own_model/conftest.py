"""A user's own features LSTM (plain PyTorch, unusual tensor names), exported with plain torch.onnx.export."""

from __future__ import annotations

from pathlib import Path

import pytest
from user_models import SensorLSTM, export

from cellserve.model.importer import import_onnx


@pytest.fixture(scope="session")
def sensor_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``SensorLSTM`` as ``sensor.onnx``: inp [B, T, 5], h_in/c_in [2, B, 16] → out [B, T, 3], h_out, c_out."""
    return export(SensorLSTM(), tmp_path_factory.mktemp("user-export") / "sensor.onnx")


@pytest.fixture(scope="session")
def sensor_model_dir(sensor_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sensor.onnx`` imported as model ``sensor`` (roles detected)."""
    out = tmp_path_factory.mktemp("sensor-model")
    import_onnx(sensor_onnx, out, name="sensor")
    return out
