"""A user's own features LSTM (plain PyTorch, unusual tensor names), exported with plain torch.onnx.export; and
every stateful class of issue 25 built, imported and served by one server (shared by the modules that test them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from state_model_oracle import Batch1
from state_models import MODELS
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


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each class built, exported and imported as a user would: name -> model directory."""
    dirs = {}
    for name, spec in MODELS.items():
        tmp = tmp_path_factory.mktemp(name)
        import_onnx(spec.build(tmp), tmp / "model", name=name, **spec.import_kwargs)
        dirs[name] = tmp / "model"
    return dirs


@pytest.fixture(scope="session")
def oracles(model_dirs: dict[str, Path]) -> dict[str, Batch1]:
    return {name: Batch1(d) for name, d in model_dirs.items()}


@pytest.fixture(scope="session")
def server(model_dirs: dict[str, Path]) -> Iterator[Any]:
    """One in-process server serving every class."""
    from server_helpers import serve_in_thread

    from cellserve.server.settings import Settings

    settings = Settings(model_dirs=list(model_dirs.values()), host="127.0.0.1", port=0, metrics_port=0)
    with serve_in_thread(settings) as srv:
        yield srv
