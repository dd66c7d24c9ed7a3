"""Offline generation with onnxruntime: seeded, equal to the oracle's greedy path, and torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellserve.model.generate import Generator, generate_text
from cellserve.model.sampling import Sampler


def test_same_seed_same_text_different_seed_different_text(tiny_model_dir: Path) -> None:
    a = generate_text(tiny_model_dir, "def ", max_bytes=80, temperature=1.0, seed=7)
    b = generate_text(tiny_model_dir, "def ", max_bytes=80, temperature=1.0, seed=7)
    c = generate_text(tiny_model_dir, "def ", max_bytes=80, temperature=1.0, seed=8)
    assert len(a) == 80 and a == b and a != c


def test_generation_equals_the_oracle_with_the_same_sampler(tiny_model_dir: Path, tiny_oracle) -> None:
    """ONNX path == numpy oracle fed back byte by byte with the same seeded Sampler (greedy and sampled)."""
    for temperature, top_k in ((0.0, 0), (0.9, 20)):
        got = generate_text(tiny_model_dir, "import ", max_bytes=40, temperature=temperature, top_k=top_k, seed=5)
        sampler = Sampler(temperature, top_k, seed=5)
        y, h, c = tiny_oracle.run(np.frombuffer(b"import ", dtype=np.uint8).astype(np.int64)[None, :])
        want = []
        for _ in range(40):
            token = sampler.next_token(y[0, -1])
            want.append(token)
            y, h, c = tiny_oracle.run(np.array([[token]]), h, c)
        assert list(got) == want, (temperature, top_k)


def test_cli_generate_runs_without_torch_and_matches_the_library(tiny_model_dir: Path) -> None:
    code = (
        "import sys\nsys.modules['torch'] = None\nfrom cellserve.model.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    args = ["generate", "--model-dir", str(tiny_model_dir), "--prompt", "def ", "--max-bytes", "60",
            "--temperature", "0.8", "--seed", "1"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    want = generate_text(tiny_model_dir, "def ", max_bytes=60, temperature=0.8, seed=1)
    assert proc.stdout == b"def " + want + b"\n"


def test_empty_prompt_and_feature_models_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prompt must not be empty"):
        list(Generator(tiny_model_dir).generate("", max_bytes=3))
    from cellserve.model.export import export_random_model

    export_random_model(tmp_path, input_kind="features", input_size=3, output_size=2, layers=1, hidden=4)
    with pytest.raises(ValueError, match="takes features"):
        Generator(tmp_path)


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_max_bytes_below_one_is_refused_by_the_flag_offline_and_with_a_server(tiny_model_dir: Path, value: str) -> None:
    for where in (["--model-dir", str(tiny_model_dir)], ["--server", "127.0.0.1:9"]):  # nothing is contacted
        args = [sys.executable, "-m", "cellserve.server.cli", "generate", *where, "--max-bytes", value]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "argument --max-bytes: must be" in proc.stderr.splitlines()[-1]
