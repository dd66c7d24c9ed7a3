"""Start-up checks of the engine that need no GPU: CUDA libraries named, first-run failures, run options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cellserve.model.manifest import load_manifest
from cellserve.server.engine import Engine, check_cuda_libraries, cuda_run_options
from cellserve.server.errors import EngineUnavailable
from cellserve.server.state_pool import StatePool


def test_a_missing_cudnn_is_named_before_warm_up():
    def load(name: str) -> None:
        if name.startswith("libcudnn"):
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    with pytest.raises(EngineUnavailable, match=r"cuDNN 9 \(libcudnn\.so\.9\).*cannot open shared object"):
        check_cuda_libraries(load)
    check_cuda_libraries(lambda name: None)  # everything loadable: no error


def test_a_failing_first_run_is_a_startup_error_naming_its_cause(tiny_model_dir: Path, monkeypatch):
    manifest = load_manifest(tiny_model_dir)
    engine = Engine(manifest, tiny_model_dir, StatePool(manifest.states, 4), intra_op_threads=1)

    def broken(*args: object) -> None:
        raise RuntimeError("Error in execution: libcudnn_ops.so.9: cannot open shared object file")

    monkeypatch.setattr(engine, "run_stateless", broken)
    with pytest.raises(EngineUnavailable, match=r"model 'tiny' failed its first run on cpu: .*libcudnn_ops\.so\.9"):
        engine.warmup([1, 4])


def test_cuda_run_options_set_the_graph_id_so_onnxruntime_never_looks_it_up_in_vain():
    options = cuda_run_options()
    assert options.get_run_config_entry("gpu_graph_id") == "-1"  # -1: no CUDA graph capture or replay
    assert options.get_run_config_entry("disable_synchronize_execution_providers") == "1"


def test_serve_on_cuda_without_cupy_is_one_line_naming_the_extra(tiny_model_dir: Path):
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:  # a GPU machine may serve: this test is about machines without CuPy
        pytest.skip("CuPy is installed here")
    argv = ["serve", "--device", "cuda", "--port", "0", "--metrics-port", "0", "--model-dirs", str(tiny_model_dir)]
    done = subprocess.run(
        [sys.executable, "-m", "cellserve.server.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "gpu` extra" in done.stderr, done.stderr
